// Study (not used by the engine): causal GQA prefill attention with AVX-512 BF16, one thread,
// against torch's flash CPU kernel, which takes 0.21 of a 512-token prefill's 1.1 s here
// (bench/README.md, "Serving under load"). Build and run (from the repository root):
//
//     gcc -O3 -march=native -mavx512bf16 -fPIC -shared bench/prefill_attention_study.c \
//         -o /tmp/libprefill_attention_study.so -lm
//     .venv/bin/python bench/prefill_attention_study.py
//
// Per KV head, K is packed as key pairs [block][D/2][16 keys][2] and V as [block][8 key pairs]
// [D][2]; for each query head of the group and block of 16 query rows, a 16x16 score block is
// 32 vdpbf16ps per row (a broadcast query pair against 16 keys' pair), then an online softmax
// per row (float32, a polynomial exp), then P (rounded to bf16) times V, 4 accumulators of 16
// dimensions per row. q [n][hq][64], k and v [n][hk][64] contiguous (no paged gather, no cached
// prefix, no window, one thread): what an engine kernel would add around it.
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#define D 64
#define QB 16
#define KB 16

static inline __m512 exp_ps(__m512 x) {  // x <= 0
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504f));
    __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_sub_ps(t, n);  // [0,1)
    __m512 p = _mm512_set1_ps(1.8775767e-3f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(8.9893397e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5826318e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4015361e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9315308e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.9999994e-1f));
    __m512i e = _mm512_slli_epi32(_mm512_cvtps_epi32(n), 23);
    return _mm512_castsi512_ps(_mm512_add_epi32(_mm512_castps_si512(p), e));
}

// kp: [nblocks][D/2][KB][2] bf16 ; vp: [nblocks][KB/2][D][2] bf16 (per kv head)
void attention(const uint16_t *q, const uint16_t *k, const uint16_t *v, float *out,
               int n, int hq, int hk, float scale, uint16_t *kp, uint16_t *vp) {
    int nb = (n + KB - 1) / KB;
    int group = hq / hk;
    for (int h = 0; h < hk; h++) {
        memset(kp, 0, sizeof(uint16_t) * nb * KB * D);
        memset(vp, 0, sizeof(uint16_t) * nb * KB * D);
        for (int j = 0; j < n; j++) {
            int b = j / KB, c = j % KB;
            const uint16_t *kr = k + ((size_t)j * hk + h) * D, *vr = v + ((size_t)j * hk + h) * D;
            for (int d = 0; d < D; d++) {
                kp[(((size_t)b * (D / 2) + d / 2) * KB + c) * 2 + (d & 1)] = kr[d];
                vp[(((size_t)b * (KB / 2) + c / 2) * D + d) * 2 + (c & 1)] = vr[d];
            }
        }
        for (int g = 0; g < group; g++) {
            int head = h * group + g;
            for (int q0 = 0; q0 < n; q0 += QB) {
                int rows = n - q0 < QB ? n - q0 : QB;
                float m[QB], l[QB];
                __m512 acc[QB][4];
                uint32_t qpair[QB][D / 2];
                for (int r = 0; r < rows; r++) {
                    m[r] = -INFINITY; l[r] = 0;
                    for (int i = 0; i < 4; i++) acc[r][i] = _mm512_setzero_ps();
                    memcpy(qpair[r], q + ((size_t)(q0 + r) * hq + head) * D, D * 2);
                }
                int last_key = q0 + rows - 1;
                for (int b = 0; b <= last_key / KB; b++) {
                    __m512 s[QB];
                    for (int r = 0; r < QB; r++) s[r] = _mm512_setzero_ps();
                    const uint16_t *kb = kp + (size_t)b * (D / 2) * KB * 2;
                    for (int dp = 0; dp < D / 2; dp++) {
                        __m512bh kv = (__m512bh)_mm512_loadu_si512(kb + dp * KB * 2);
                        for (int r = 0; r < QB; r++)
                            s[r] = _mm512_dpbf16_ps(s[r], (__m512bh)_mm512_set1_epi32(qpair[r][dp]), kv);
                    }
                    const uint16_t *vb = vp + (size_t)b * (KB / 2) * D * 2;
                    __m512i keypos = _mm512_add_epi32(_mm512_set1_epi32(b * KB),
                        _mm512_setr_epi32(0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15));
                    for (int r = 0; r < rows; r++) {
                        __mmask16 ok = _mm512_cmple_epi32_mask(keypos, _mm512_set1_epi32(q0 + r));
                        if (!ok) continue;
                        __m512 x = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), ok,
                                                      _mm512_mul_ps(s[r], _mm512_set1_ps(scale)));
                        float bm = _mm512_reduce_max_ps(x);
                        float nm = bm > m[r] ? bm : m[r];
                        float corr = expf(m[r] - nm);
                        m[r] = nm;
                        __m512 p = _mm512_maskz_mov_ps(ok, exp_ps(_mm512_sub_ps(x, _mm512_set1_ps(nm))));
                        l[r] = l[r] * corr + _mm512_reduce_add_ps(p);
                        __m512 c = _mm512_set1_ps(corr);
                        for (int i = 0; i < 4; i++) acc[r][i] = _mm512_mul_ps(acc[r][i], c);
                        __m256bh pb = _mm512_cvtneps_pbh(p);
                        uint32_t pp[8];
                        _mm256_storeu_si256((__m256i *)pp, (__m256i)pb);
                        for (int kp2 = 0; kp2 < KB / 2; kp2++) {
                            __m512bh bp = (__m512bh)_mm512_set1_epi32(pp[kp2]);
                            const uint16_t *vrow = vb + (size_t)kp2 * D * 2;
                            for (int i = 0; i < 4; i++)
                                acc[r][i] = _mm512_dpbf16_ps(acc[r][i], bp,
                                    (__m512bh)_mm512_loadu_si512(vrow + i * 32));
                        }
                    }
                }
                for (int r = 0; r < rows; r++) {
                    float *o = out + ((size_t)(q0 + r) * hq + head) * D;
                    __m512 inv = _mm512_set1_ps(1.0f / l[r]);
                    for (int i = 0; i < 4; i++) _mm512_storeu_ps(o + 16 * i, _mm512_mul_ps(acc[r][i], inv));
                }
            }
        }
    }
}
