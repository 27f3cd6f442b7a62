// Small fused ops for the CPU decode path: RMS norm (alone, or after the residual add),
// rotary + KV-cache store, decode attention over the paged KV cache, SiLU-and-multiply, dynamic
// logit fusion's passes and choice, and sampling's thresholds, draw, argmax and Gumbel keys.
// Each replaces several torch ops whose fixed cost per call (5-20 us) dominated a decoding
// step's non-linear time; here one call costs about a microsecond plus its arithmetic.
// decode_layers runs a whole decode step's layers with them (and the projections of
// kernels/csrc/cpu_linear.c, by address) in one call, from the token ids' embedding rows to
// the LM head.
//
// One module, both element types: every op is written once as an always-inline function with a
// constant `bf16` flag and instantiated twice, so the branches on the type fold away.
// Rounding follows torch's ops step by step (see kernels/cpu_ops.py for the references):
// bf16 results are rounded to nearest even wherever torch rounds a bf16 op's result.

#define PY_SSIZE_T_CLEAN
#include <Python.h>  // first, as Python requires

#include <float.h>
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define INLINE static inline __attribute__((always_inline))
// Elements per AVX2 vector of fp32; rows are processed 8 at a time, their tails one at a time.
#define VEC 8
// Below this many elements an op runs on the calling thread: waking the team costs more.
#define PARALLEL_MIN_ELEMENTS (64 * 1024)

// ---------------------------------------------------------------------------------------------
// Element access, scalar and 8 lanes at a time. bf16 widens exactly to fp32; fp32 narrows to
// bf16 by round to nearest even, as torch does (NaN payloads stay NaN: see cpu_linear.c).

INLINE float bf16_to_f32(uint16_t value) {
    uint32_t bits = (uint32_t)value << 16;
    float result;
    memcpy(&result, &bits, sizeof(result));
    return result;
}

INLINE uint16_t f32_to_bf16(float value) {
    uint32_t bits;
    memcpy(&bits, &value, sizeof(bits));
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

INLINE float load(const int bf16, const void *base, int64_t i) {
    return bf16 ? bf16_to_f32(((const uint16_t *)base)[i]) : ((const float *)base)[i];
}

INLINE void store(const int bf16, void *base, int64_t i, float value) {
    if (bf16) {
        ((uint16_t *)base)[i] = f32_to_bf16(value);
    } else {
        ((float *)base)[i] = value;
    }
}

// What a torch op on tensors of this type returns for an fp32 result: rounded to bf16 or kept.
INLINE float rounded(const int bf16, float value) {
    return bf16 ? bf16_to_f32(f32_to_bf16(value)) : value;
}

INLINE __m256 load8(const int bf16, const void *base, int64_t i) {
    if (bf16) {
        const __m128i half = _mm_loadu_si128((const __m128i *)((const uint16_t *)base + i));
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
    }
    return _mm256_loadu_ps((const float *)base + i);
}

// fp32 bits plus the round-to-nearest-even increment: the bf16 result is the top 16 bits.
INLINE __m256i rounding_bits(__m256 value) {
    const __m256i bits = _mm256_castps_si256(value);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    return _mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff)));
}

INLINE __m256 rounded8(const int bf16, __m256 value) {
    if (!bf16) return value;
    const __m256i top = _mm256_set1_epi32((int)0xffff0000u);
    return _mm256_castsi256_ps(_mm256_and_si256(rounding_bits(value), top));
}

INLINE void store8(const int bf16, void *base, int64_t i, __m256 value) {
    if (bf16) {
        const __m256i halves = _mm256_srli_epi32(rounding_bits(value), 16);  // < 65536: no saturation
        const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(halves),
                                                _mm256_extracti128_si256(halves, 1));
        _mm_storeu_si128((__m128i *)((uint16_t *)base + i), packed);
    } else {
        _mm256_storeu_ps((float *)base + i, value);
    }
}

INLINE float sum8(__m256 v) {
    __m128 folded = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    folded = _mm_add_ps(folded, _mm_movehl_ps(folded, folded));
    folded = _mm_add_ss(folded, _mm_movehdup_ps(folded));
    return _mm_cvtss_f32(folded);
}

INLINE float max8(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

// e^x to about 2 ulp: x = n ln2 + r with |r| <= ln2 / 2, e^r by its degree-6 Taylor polynomial,
// 2^n put into the exponent. Below -87 (where e^x is under 2^-125) the result is 0, so e^-inf
// is 0 as it must be; above 88 it stays e^88 (no caller goes there but silu's large -x, whose
// quotient x / (1 + e^88) rounds to 0 either way).
INLINE __m256 exp8(__m256 x) {
    const __m256 underflow = _mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_LT_OQ);
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  // ln 2, high part
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);      // and the rest
    __m256 p = _mm256_set1_ps(1.0f / 720);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    const __m256i exponent = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
    const __m256 result = _mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32(exponent, 23)));
    return _mm256_andnot_ps(underflow, result);
}

INLINE size_t element_size(const int bf16) { return bf16 ? 2 : 4; }

// ---------------------------------------------------------------------------------------------
// RMS norm of rows (t, h) of x [T, H, D] (strides ldx_t, ldx_h, 1) into out [T, H, D]
// contiguous: y = weight * round(x * rsqrt(mean(x^2) + eps)), the variance in fp32. Head h
// takes the weight at weight + h * ld_w (ld_w 0: one weight for every head; D: one per head,
// as Qwen3's q and k norms are stored).

INLINE void rms_norm_row(const int bf16, const void *x, const void *weight, void *out, int64_t d,
                         float eps) {
    __m256 squares = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + VEC <= d; i += VEC) {
        const __m256 v = load8(bf16, x, i);
        squares = _mm256_fmadd_ps(v, v, squares);
    }
    float sum = sum8(squares);
    for (; i < d; i++) sum += load(bf16, x, i) * load(bf16, x, i);
    const float inverse = 1.0f / sqrtf(sum / (float)d + eps);
    const __m256 inverse8 = _mm256_set1_ps(inverse);
    for (i = 0; i + VEC <= d; i += VEC) {
        const __m256 normed = rounded8(bf16, _mm256_mul_ps(load8(bf16, x, i), inverse8));
        store8(bf16, out, i, _mm256_mul_ps(load8(bf16, weight, i), normed));
    }
    for (; i < d; i++) {
        const float normed = rounded(bf16, load(bf16, x, i) * inverse);
        store(bf16, out, i, load(bf16, weight, i) * normed);
    }
}

INLINE void rms_norm(const int bf16, const char *x, int64_t ldx_t, int64_t ldx_h,
                     const char *weight, int64_t ld_w, char *out, int64_t t, int64_t h, int64_t d,
                     float eps, int threads) {
    const size_t size = element_size(bf16);
    const int64_t rows = t * h;
    if (threads <= 1 || rows < 2 || rows * d < PARALLEL_MIN_ELEMENTS) {
        for (int64_t r = 0; r < rows; r++) {
            const char *row = x + ((r / h) * ldx_t + (r % h) * ldx_h) * size;
            rms_norm_row(bf16, row, weight + (r % h) * ld_w * size, out + r * d * size, d, eps);
        }
        return;
    }
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < rows; r++) {
        const char *row = x + ((r / h) * ldx_t + (r % h) * ldx_h) * size;
        rms_norm_row(bf16, row, weight + (r % h) * ld_w * size, out + r * d * size, d, eps);
    }
}

// hidden[t] += delta[t], each sum rounded as torch's add_ rounds it, then out[t] = the RMS norm
// of the updated row (as rms_norm): the residual add and the next norm of a decoder layer in one
// call and one pass over the row. hidden and delta have row strides ld_h and ld_d; out [T, D] is
// contiguous.

INLINE void add_row(const int bf16, void *hidden, const void *delta, int64_t d) {
    int64_t i = 0;
    for (; i + VEC <= d; i += VEC) {
        store8(bf16, hidden, i, _mm256_add_ps(load8(bf16, hidden, i), load8(bf16, delta, i)));
    }
    for (; i < d; i++) store(bf16, hidden, i, load(bf16, hidden, i) + load(bf16, delta, i));
}

INLINE void add_rms_norm_row(const int bf16, char *hidden, const char *delta, const void *weight,
                             char *out, int64_t d, float eps) {
    add_row(bf16, hidden, delta, d);
    rms_norm_row(bf16, hidden, weight, out, d, eps);
}

INLINE void add_rms_norm(const int bf16, char *hidden, int64_t ld_h, const char *delta,
                         int64_t ld_d, const void *weight, char *out, int64_t t, int64_t d,
                         float eps, int threads) {
    const size_t size = element_size(bf16);
    if (threads <= 1 || t < 2 || t * d < PARALLEL_MIN_ELEMENTS) {
        for (int64_t r = 0; r < t; r++) {
            add_rms_norm_row(bf16, hidden + r * ld_h * size, delta + r * ld_d * size, weight,
                             out + r * d * size, d, eps);
        }
        return;
    }
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < t; r++) {
        add_rms_norm_row(bf16, hidden + r * ld_h * size, delta + r * ld_d * size, weight,
                         out + r * d * size, d, eps);
    }
}

// ---------------------------------------------------------------------------------------------
// Rotary embedding (neox style) of q [T, Hq, D] and k [T, Hk, D] in place, then k and v
// [T, Hk, D] copied into the caches [slots, Hk, D] at slot_mapping[t]. q, k and v have row
// strides ld_q, ld_k, ld_v with heads contiguous; cos and sin are [T, D / 2] contiguous.
// Per pair (x1, x2): x2s = x2 * sin, x1s = x1 * sin, x1 = x1 * cos - x2s, x2 = x2 * cos + x1s,
// every product and sum rounded as torch's elementwise ops round it.

INLINE void rotate_heads(const int bf16, char *x, int64_t heads, int64_t d, const void *cos,
                         const void *sin) {
    const size_t size = element_size(bf16);
    const int64_t half = d / 2;
    for (int64_t h = 0; h < heads; h++) {
        void *head = x + h * d * size;
        int64_t i = 0;
        for (; i + VEC <= half; i += VEC) {
            const __m256 c = load8(bf16, cos, i), s = load8(bf16, sin, i);
            const __m256 x1 = load8(bf16, head, i), x2 = load8(bf16, head, i + half);
            const __m256 x2_sin = rounded8(bf16, _mm256_mul_ps(x2, s));
            const __m256 x1_sin = rounded8(bf16, _mm256_mul_ps(x1, s));
            store8(bf16, head, i, _mm256_sub_ps(rounded8(bf16, _mm256_mul_ps(x1, c)), x2_sin));
            store8(bf16, head, i + half,
                   _mm256_add_ps(rounded8(bf16, _mm256_mul_ps(x2, c)), x1_sin));
        }
        for (; i < half; i++) {
            const float c = load(bf16, cos, i), s = load(bf16, sin, i);
            const float x1 = load(bf16, head, i), x2 = load(bf16, head, i + half);
            const float x2_sin = rounded(bf16, x2 * s), x1_sin = rounded(bf16, x1 * s);
            store(bf16, head, i, rounded(bf16, x1 * c) - x2_sin);
            store(bf16, head, i + half, rounded(bf16, x2 * c) + x1_sin);
        }
    }
}

INLINE void rope_store_kv(const int bf16, char *q, int64_t ld_q, char *k, int64_t ld_k,
                          const char *v, int64_t ld_v, const char *cos, const char *sin,
                          char *key_cache, char *value_cache, const int64_t *slot_mapping,
                          int64_t t, int64_t hq, int64_t hk, int64_t d) {
    const size_t size = element_size(bf16);
    const size_t kv_row = (size_t)(hk * d) * size;
    for (int64_t i = 0; i < t; i++) {
        const char *c = cos + i * (d / 2) * size, *s = sin + i * (d / 2) * size;
        rotate_heads(bf16, q + i * ld_q * size, hq, d, c, s);
        char *k_row = k + i * ld_k * size;
        rotate_heads(bf16, k_row, hk, d, c, s);
        memcpy(key_cache + slot_mapping[i] * kv_row, k_row, kv_row);
        memcpy(value_cache + slot_mapping[i] * kv_row, v + i * ld_v * size, kv_row);
    }
}

// ---------------------------------------------------------------------------------------------
// Decode attention: one new query per sequence. q [S, Hq, D] (row stride ld_q, heads
// contiguous), caches [slots, Hk, D], slots [S, L] (sequence s attends slots[s, :lengths[s]]),
// out [S, Hq, D] contiguous. Query head h reads KV head h / (Hq / Hk). In fp32: scores
// q.k * scale, a max-subtracted softmax, then the probability-weighted sum of values, rounded
// once at the end. One task per (sequence, KV head); its query heads share every K/V row load.

typedef struct {
    const char *q, *key_cache, *value_cache;
    const int64_t *slots, *lengths;
    char *out;
    int64_t ld_q, hq, hk, d, max_len;
    float scale;
} attention_t;

// [sum(a[0]), ..., sum(a[7])]: eight horizontal sums at once.
INLINE __m256 sum8x8(const __m256 *a) {
    const __m256 pairs0 = _mm256_hadd_ps(a[0], a[1]), pairs1 = _mm256_hadd_ps(a[2], a[3]);
    const __m256 pairs2 = _mm256_hadd_ps(a[4], a[5]), pairs3 = _mm256_hadd_ps(a[6], a[7]);
    // Per 128-bit half: the partial sums of a[0..3] in quads0, of a[4..7] in quads1.
    const __m256 quads0 = _mm256_hadd_ps(pairs0, pairs1), quads1 = _mm256_hadd_ps(pairs2, pairs3);
    return _mm256_add_ps(_mm256_permute2f128_ps(quads0, quads1, 0x20),
                         _mm256_permute2f128_ps(quads0, quads1, 0x31));
}

// scores[j] = query . keys[j] * scale for eight key rows: eight independent accumulator chains
// (one chain per dot product would wait on its own FMA latency), summed together at the end.
INLINE void score8(const int bf16, const float *query, const char *const *keys, int64_t d,
                   float scale, float *scores) {
    __m256 acc[VEC];
    for (int j = 0; j < VEC; j++) acc[j] = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + VEC <= d; i += VEC) {
        const __m256 q = _mm256_loadu_ps(query + i);
        for (int j = 0; j < VEC; j++) acc[j] = _mm256_fmadd_ps(q, load8(bf16, keys[j], i), acc[j]);
    }
    float tails[VEC] = {0};
    for (; i < d; i++) {
        for (int j = 0; j < VEC; j++) tails[j] += query[i] * load(bf16, keys[j], i);
    }
    const __m256 sums = _mm256_add_ps(sum8x8(acc), _mm256_loadu_ps(tails));
    _mm256_storeu_ps(scores, _mm256_mul_ps(sums, _mm256_set1_ps(scale)));
}

// Elements of a value row accumulated in registers at once (8 vectors).
#define VALUE_BLOCK (8 * VEC)

// out[g][i] = sum_j p[g][j] * value_j[i] for i in [i0, i0 + VALUE_BLOCK) (or to d): the sums
// live in registers across all rows j, one chain per vector of elements.
INLINE void weigh_values(const int bf16, const float *scores, int64_t stride, int64_t group,
                         const char *values, const int64_t *slots, size_t kv_stride, int64_t length,
                         int64_t i0, int64_t d, float *out) {
    const int64_t vectors = (d - i0 >= VALUE_BLOCK ? VALUE_BLOCK : (d - i0) / VEC * VEC) / VEC;
    for (int64_t g = 0; g < group; g++) {
        const float *p = scores + g * stride;
        __m256 acc[VALUE_BLOCK / VEC];
        for (int64_t v = 0; v < VALUE_BLOCK / VEC; v++) acc[v] = _mm256_setzero_ps();
        for (int64_t j = 0; j < length; j++) {
            const __m256 weight = _mm256_set1_ps(p[j]);
            const char *row = values + slots[j] * kv_stride;
            for (int64_t v = 0; v < vectors; v++) {
                acc[v] = _mm256_fmadd_ps(weight, load8(bf16, row, i0 + v * VEC), acc[v]);
            }
        }
        for (int64_t v = 0; v < vectors; v++) _mm256_storeu_ps(out + g * d + i0 + v * VEC, acc[v]);
    }
}

// As weigh_values for the last d % 8 elements, one at a time.
INLINE void weigh_value_tail(const int bf16, const float *scores, int64_t stride, int64_t group,
                             const char *values, const int64_t *slots, size_t kv_stride,
                             int64_t length, int64_t i0, int64_t d, float *out) {
    for (int64_t g = 0; g < group; g++) {
        for (int64_t i = i0; i < d; i++) {
            float sum = 0.0f;
            for (int64_t j = 0; j < length; j++) {
                sum += scores[g * stride + j] * load(bf16, values + slots[j] * kv_stride, i);
            }
            out[g * d + i] = sum;
        }
    }
}

// Scores per query head: max_len rounded up to whole vectors, so exp runs 8 lanes at a time
// (lanes past the length compute unused values and are never summed).
INLINE int64_t score_stride(int64_t max_len) { return (max_len + VEC - 1) / VEC * VEC; }

// Scratch: G query rows, G accumulators, G score rows.
INLINE void attend(const int bf16, const attention_t *a, int64_t task, float *scratch) {
    const size_t size = element_size(bf16);
    const int64_t s = task / a->hk, kv_head = task % a->hk, group = a->hq / a->hk, d = a->d;
    const int64_t length = a->lengths[s], stride = score_stride(a->max_len);
    const int64_t *slots = a->slots + s * a->max_len;
    float *query = scratch, *acc = query + group * d, *scores = acc + group * d;
    for (int64_t g = 0; g < group; g++) {
        const char *q_head = a->q + (s * a->ld_q + (kv_head * group + g) * d) * size;
        for (int64_t i = 0; i < d; i++) query[g * d + i] = load(bf16, q_head, i);
    }
    const size_t kv_stride = (size_t)(a->hk * d) * size;
    const size_t head_offset = (size_t)(kv_head * d) * size;
    for (int64_t j0 = 0; j0 < length; j0 += VEC) {
        // Past the length the last row repeats; its scores land in the padding of the row.
        const char *keys[VEC];
        for (int64_t j = 0; j < VEC; j++) {
            const int64_t slot = slots[j0 + j < length ? j0 + j : length - 1];
            keys[j] = a->key_cache + slot * kv_stride + head_offset;
        }
        for (int64_t g = 0; g < group; g++) {
            score8(bf16, query + g * d, keys, d, a->scale, scores + g * stride + j0);
        }
    }
    // Past the length the scores repeat the last key's, so the max may read whole vectors.
    const int64_t padded = score_stride(length), whole = length / VEC * VEC;
    float totals[group];
    for (int64_t g = 0; g < group; g++) {
        float *p = scores + g * stride;
        __m256 top8 = _mm256_loadu_ps(p);
        for (int64_t j = VEC; j < padded; j += VEC) top8 = _mm256_max_ps(top8, _mm256_loadu_ps(p + j));
        __m128 top4 = _mm_max_ps(_mm256_castps256_ps128(top8), _mm256_extractf128_ps(top8, 1));
        top4 = _mm_max_ps(top4, _mm_movehl_ps(top4, top4));
        top4 = _mm_max_ss(top4, _mm_movehdup_ps(top4));
        const __m256 top = _mm256_set1_ps(_mm_cvtss_f32(top4));
        __m256 sum8_acc = _mm256_setzero_ps();
        for (int64_t j = 0; j < padded; j += VEC) {
            const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p + j), top));
            _mm256_storeu_ps(p + j, e);
            if (j < whole) sum8_acc = _mm256_add_ps(sum8_acc, e);
        }
        float total = sum8(sum8_acc);
        for (int64_t j = whole; j < length; j++) total += p[j];
        totals[g] = total;
    }
    const char *values = a->value_cache + head_offset;
    int64_t i0 = 0;
    for (; i0 + VEC <= d; i0 += VALUE_BLOCK) {
        weigh_values(bf16, scores, stride, group, values, slots, kv_stride, length, i0, d, acc);
    }
    i0 = d / VEC * VEC;
    if (i0 < d) {
        weigh_value_tail(bf16, scores, stride, group, values, slots, kv_stride, length, i0, d,
                         acc);
    }
    for (int64_t g = 0; g < group; g++) {
        char *out = a->out + ((s * a->hq) + kv_head * group + g) * d * size;
        for (int64_t i = 0; i < d; i++) store(bf16, out, i, acc[g * d + i] / totals[g]);
    }
}

// Returns 0, or -1 when scratch memory cannot be allocated.
INLINE int decode_attention(const int bf16, const attention_t *a, int64_t sequences,
                            int threads) {
    const int64_t tasks = sequences * a->hk, group = a->hq / a->hk;
    const size_t scratch_bytes =
        (size_t)(2 * group * a->d + group * score_stride(a->max_len)) * sizeof(float);
    const int64_t work = sequences * a->max_len * a->hq * a->d;
    if (threads <= 1 || tasks < 2 || work < PARALLEL_MIN_ELEMENTS) {
        float *scratch = malloc(scratch_bytes);
        if (scratch == NULL) return -1;
        for (int64_t task = 0; task < tasks; task++) attend(bf16, a, task, scratch);
        free(scratch);
        return 0;
    }
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        float *scratch = malloc(scratch_bytes);
        failed = scratch == NULL;
        // Every thread reaches the loop, so the team never waits on a missing member.
#pragma omp for schedule(static)
        for (int64_t task = 0; task < tasks; task++) {
            if (scratch != NULL) attend(bf16, a, task, scratch);
        }
        free(scratch);
    }
    return failed ? -1 : 0;
}

// ---------------------------------------------------------------------------------------------
// out [T, F] = round(silu(gate)) * up, where gate_up [T, 2F] (row stride ld) holds gate then up;
// silu(x) = x / (1 + exp(-x)) in fp32, rounded as torch's silu rounds it.

INLINE void silu_mul_row(const int bf16, const void *gate, const void *up, void *out,
                         int64_t f) {
    const __m256 one = _mm256_set1_ps(1.0f);
    int64_t i = 0;
    for (; i + VEC <= f; i += VEC) {
        const __m256 g = load8(bf16, gate, i);
        const __m256 denominator = _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), g)));
        const __m256 activated = rounded8(bf16, _mm256_div_ps(g, denominator));
        store8(bf16, out, i, _mm256_mul_ps(activated, load8(bf16, up, i)));
    }
    for (; i < f; i++) {
        const float g = load(bf16, gate, i);
        store(bf16, out, i, rounded(bf16, g / (1.0f + expf(-g))) * load(bf16, up, i));
    }
}

INLINE void silu_mul(const int bf16, const char *gate_up, int64_t ld, char *out, int64_t t,
                     int64_t f, int threads) {
    const size_t size = element_size(bf16);
    if (threads <= 1 || t < 2 || t * f < PARALLEL_MIN_ELEMENTS) {
        for (int64_t r = 0; r < t; r++) {
            const char *gate = gate_up + r * ld * size;
            silu_mul_row(bf16, gate, gate + f * size, out + r * f * size, f);
        }
        return;
    }
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < t; r++) {
        const char *gate = gate_up + r * ld * size;
        silu_mul_row(bf16, gate, gate + f * size, out + r * f * size, f);
    }
}

// ---------------------------------------------------------------------------------------------
// Dynamic logit fusion's sweep (kernels/fusion.py): for every pair p (row b = p / E of a [B, V],
// row p of d [P, V]) and every alpha of the grid, z = a + alpha * d and
//     lse[p, g] = m + log(s),  mean[p, g] = w / s,  s = sum exp(z - m),  w = sum exp(z - m) d,
// m = max z (0 where no z is finite; where s is 0, s counts as 1). fp32; a is finite or -inf.
// One task per (pair, alpha): a pass for the max, a pass for the sums. (An evenly spaced grid
// takes the chained sweep below instead.)

typedef struct {
    const float *a, *d, *alphas;
    float *lse, *mean;
    int64_t lda, ldd, experts, vocab, num_alphas;
    const int64_t *rows;  // row b of a is a + rows[b] * lda where given, else a + b * lda
} sweep_t;

INLINE const float *sweep_a(const sweep_t *job, int64_t pair) {
    const int64_t b = pair / job->experts;
    return job->a + (job->rows ? job->rows[b] : b) * job->lda;
}

static void sweep(const sweep_t *job, int64_t task) {
    const int64_t pair = task / job->num_alphas, g = task % job->num_alphas, v = job->vocab;
    const float *a = sweep_a(job, pair), *d = job->d + pair * job->ldd;
    const float alpha = job->alphas[g];
    const __m256 alpha8 = _mm256_set1_ps(alpha);
    __m256 top8 = _mm256_set1_ps(-INFINITY);
    int64_t i = 0;
    for (; i + VEC <= v; i += VEC) {
        const __m256 z = _mm256_add_ps(_mm256_loadu_ps(a + i),
                                       _mm256_mul_ps(alpha8, _mm256_loadu_ps(d + i)));
        top8 = _mm256_max_ps(top8, z);
    }
    __m128 top4 = _mm_max_ps(_mm256_castps256_ps128(top8), _mm256_extractf128_ps(top8, 1));
    top4 = _mm_max_ps(top4, _mm_movehl_ps(top4, top4));
    top4 = _mm_max_ss(top4, _mm_movehdup_ps(top4));
    float top = _mm_cvtss_f32(top4);
    for (int64_t j = i; j < v; j++) {
        const float z = a[j] + alpha * d[j];
        top = z > top ? z : top;
    }
    if (!isfinite(top)) top = 0.0f;
    const __m256 top_8 = _mm256_set1_ps(top);
    __m256 sum8_acc = _mm256_setzero_ps(), weighted8 = _mm256_setzero_ps();
    for (i = 0; i + VEC <= v; i += VEC) {
        const __m256 dv = _mm256_loadu_ps(d + i);
        const __m256 z = _mm256_add_ps(_mm256_loadu_ps(a + i), _mm256_mul_ps(alpha8, dv));
        const __m256 e = exp8(_mm256_sub_ps(z, top_8));
        sum8_acc = _mm256_add_ps(sum8_acc, e);
        weighted8 = _mm256_fmadd_ps(e, dv, weighted8);
    }
    float total = sum8(sum8_acc), weighted = sum8(weighted8);
    for (; i < v; i++) {
        const float e = expf(a[i] + alpha * d[i] - top);
        total += e;
        weighted += e * d[i];
    }
    const float safe = total > 0.0f ? total : 1.0f;
    job->lse[pair * job->num_alphas + g] = top + logf(safe);
    job->mean[pair * job->num_alphas + g] = weighted / safe;
}

// The sweep again with AVX-512 where the CPU has it (chosen at run time; the module is built for
// AVX2): the exponentials are the sweep's cost, and 16 lanes do them at twice the rate. exp16 is
// exp8 lane for lane (the same operations), so only the order of the sums differs.
#define AVX512 __attribute__((target("avx512f")))

AVX512 static inline __m512 exp16(__m512 x) {
    const __mmask16 underflow = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_LT_OQ);
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.0f / 720);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    const __m512i exponent = _mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127));
    const __m512 result = _mm512_mul_ps(p, _mm512_castsi512_ps(_mm512_slli_epi32(exponent, 23)));
    return _mm512_maskz_mov_ps((__mmask16)~underflow, result);
}

AVX512 static void sweep16(const sweep_t *job, int64_t task) {
    const int64_t pair = task / job->num_alphas, g = task % job->num_alphas, v = job->vocab;
    const float *a = sweep_a(job, pair), *d = job->d + pair * job->ldd;
    const float alpha = job->alphas[g];
    const __m512 alpha16 = _mm512_set1_ps(alpha);
    __m512 top16 = _mm512_set1_ps(-INFINITY);
    int64_t i = 0;
    for (; i + 16 <= v; i += 16) {
        const __m512 z = _mm512_add_ps(_mm512_loadu_ps(a + i),
                                       _mm512_mul_ps(alpha16, _mm512_loadu_ps(d + i)));
        top16 = _mm512_max_ps(top16, z);
    }
    float top = _mm512_reduce_max_ps(top16);
    for (int64_t j = i; j < v; j++) {
        const float z = a[j] + alpha * d[j];
        top = z > top ? z : top;
    }
    if (!isfinite(top)) top = 0.0f;
    const __m512 top_16 = _mm512_set1_ps(top);
    __m512 sum16 = _mm512_setzero_ps(), weighted16 = _mm512_setzero_ps();
    for (i = 0; i + 16 <= v; i += 16) {
        const __m512 dv = _mm512_loadu_ps(d + i);
        const __m512 z = _mm512_add_ps(_mm512_loadu_ps(a + i), _mm512_mul_ps(alpha16, dv));
        const __m512 e = exp16(_mm512_sub_ps(z, top_16));
        sum16 = _mm512_add_ps(sum16, e);
        weighted16 = _mm512_fmadd_ps(e, dv, weighted16);
    }
    float total = _mm512_reduce_add_ps(sum16), weighted = _mm512_reduce_add_ps(weighted16);
    for (; i < v; i++) {
        const float e = expf(a[i] + alpha * d[i] - top);
        total += e;
        weighted += e * d[i];
    }
    const float safe = total > 0.0f ? total : 1.0f;
    job->lse[pair * job->num_alphas + g] = top + logf(safe);
    job->mean[pair * job->num_alphas + g] = weighted / safe;
}

// The sweep over an evenly spaced grid (alpha_g = alpha_0 + g * step, as the default is) with two
// exponentials per token for CHAIN alphas instead of one per alpha. The shift of alpha g is not
// max z_g but the chord between the two ends' maxima, s_g = m_0 + g * slope: the maximum is convex
// in alpha, so the chord lies above it, every term e_g = exp(z_g - s_g) is at most 1, and log e_g
// is linear in g: e_{g+1} = e_g * rho with rho = exp(step * d - slope) per token. A chunk starts at
// one exponential of its first alpha and multiplies its way through the rest; the terms agree
// with one exponential each to about CHAIN ulps. Two cases fall back to the exponential per
// alpha: a vector with a lane whose chain would start from an underflowed term and climb back
// into range, and an alpha whose terms all sit far below the chord (its total under 2^-100).
#define CHAIN 11
#define CHAIN_FLOOR (-80.0f)  // an anchor below this may have lost its value to underflow

static int evenly_spaced(const float *alphas, int64_t count) {
    if (count < CHAIN) return 0;
    const double step = ((double)alphas[count - 1] - alphas[0]) / (double)(count - 1);
    if (!(step > 0.0)) return 0;
    for (int64_t g = 0; g < count; g++) {
        const double expected = alphas[0] + step * (double)g;
        if (fabs(alphas[g] - expected) > 1e-6 * fmax(1.0, fabs(expected))) return 0;
    }
    return 1;
}

// The 16 tokens at i: their terms of CHAIN alphas from `alpha` (shifted from `shift` on) added
// to sum[g], and times d to weighted[g].
AVX512 static inline void chain16(const float *a, const float *d, int64_t i, float alpha,
                                  float shift, float step, float slope, __m512 *sum,
                                  __m512 *weighted) {
    const __m512 dv = _mm512_loadu_ps(d + i);
    const __m512 anchor = _mm512_sub_ps(
        _mm512_fmadd_ps(_mm512_set1_ps(alpha), dv, _mm512_loadu_ps(a + i)), _mm512_set1_ps(shift));
    // log e rises by step * d - slope per alpha: CHAIN - 1 steps on, still under the floor?
    const __m512 rise = _mm512_fmsub_ps(_mm512_set1_ps(step), dv, _mm512_set1_ps(slope));
    const __m512 last = _mm512_fmadd_ps(_mm512_set1_ps((float)(CHAIN - 1)), rise, anchor);
    const __mmask16 climbs = _mm512_cmp_ps_mask(anchor, _mm512_set1_ps(CHAIN_FLOOR), _CMP_LT_OQ) &
                             _mm512_cmp_ps_mask(last, _mm512_set1_ps(CHAIN_FLOOR), _CMP_GE_OQ);
    if (climbs) {
        for (int g = 0; g < CHAIN; g++) {
            const __m512 z = _mm512_fmadd_ps(_mm512_set1_ps(alpha + step * (float)g), dv,
                                             _mm512_loadu_ps(a + i));
            const __m512 e =
                exp16(_mm512_sub_ps(z, _mm512_set1_ps(shift + slope * (float)g)));
            sum[g] = _mm512_add_ps(sum[g], e);
            weighted[g] = _mm512_fmadd_ps(e, dv, weighted[g]);
        }
        return;
    }
    const __m512 rho = exp16(rise);
    __m512 e = exp16(anchor);
#pragma GCC unroll 11
    for (int g = 0; g < CHAIN; g++) {
        sum[g] = _mm512_add_ps(sum[g], e);
        weighted[g] = _mm512_fmadd_ps(e, dv, weighted[g]);
        e = _mm512_mul_ps(e, rho);
    }
}

// One (pair, chunk) task of the chained sweep: alphas [first, first + CHAIN) computed, [own, end)
// written (chunks may overlap at the grid's end; each alpha is written by one task only). Its
// vector passes are per instruction set (sweep_chained16, sweep_chained8); the rest is here.
typedef struct {
    const sweep_t *job;
    const float *a, *d;
    int64_t pair, first, own, end;
    float step;          // the grid's
    float slope;         // the chord's, per step
    float alpha, shift;  // those of alpha `first`
} chain_task_t;

static chain_task_t chain_task(const sweep_t *job, int64_t pair, int64_t first, int64_t own,
                               int64_t end) {
    const int64_t last_g = job->num_alphas - 1;
    const chain_task_t t = {
        .job = job,
        .a = sweep_a(job, pair),
        .d = job->d + pair * job->ldd,
        .pair = pair,
        .first = first,
        .own = own,
        .end = end,
        .step = (job->alphas[last_g] - job->alphas[0]) / (float)last_g,
    };
    return t;
}

// The ends' maxima m0 and mn, given over the tokens before i, finished over the rest; the chord
// from them. Returns 0, having written lse = mean = 0, where no z is finite.
static int chain_chord(chain_task_t *t, int64_t i, float m0, float mn) {
    const sweep_t *job = t->job;
    const float alpha_0 = job->alphas[0], alpha_n = job->alphas[job->num_alphas - 1];
    for (int64_t j = i; j < job->vocab; j++) {
        const float z0 = t->a[j] + alpha_0 * t->d[j], zn = t->a[j] + alpha_n * t->d[j];
        m0 = z0 > m0 ? z0 : m0;
        mn = zn > mn ? zn : mn;
    }
    if (!isfinite(m0) || !isfinite(mn)) {
        for (int64_t g = t->own; g < t->end; g++) {
            job->lse[t->pair * job->num_alphas + g] = 0.0f;
            job->mean[t->pair * job->num_alphas + g] = 0.0f;
        }
        return 0;
    }
    t->slope = (mn - m0) / (float)(job->num_alphas - 1);
    t->alpha = job->alphas[t->first];
    t->shift = m0 + t->slope * (float)t->first;
    return 1;
}

// The owned alphas' results from the chained sums over the tokens before i (totals[c], moments[c]
// for alpha first + c), the rest of the tokens added one exponential each; an alpha far below the
// chord (total under 2^-100) goes to `exact`, the sweep with its own shift.
static void chain_finish(const chain_task_t *t, int64_t i, const float *totals,
                         const float *moments, void (*exact)(const sweep_t *, int64_t)) {
    const sweep_t *job = t->job;
    for (int64_t g = t->own; g < t->end; g++) {
        const int c = (int)(g - t->first);
        const float alpha_g = t->alpha + t->step * (float)c;
        const float shift_g = t->shift + t->slope * (float)c;
        float total = totals[c], moment = moments[c];
        for (int64_t j = i; j < job->vocab; j++) {
            const float e = expf(t->a[j] + alpha_g * t->d[j] - shift_g);
            total += e;
            moment += e * t->d[j];
        }
        if (total < 0x1p-100f) {
            exact(job, t->pair * job->num_alphas + g);
            continue;
        }
        job->lse[t->pair * job->num_alphas + g] = shift_g + logf(total);
        job->mean[t->pair * job->num_alphas + g] = moment / total;
    }
}

AVX512 static void sweep_chained16(const sweep_t *job, int64_t pair, int64_t first, int64_t own,
                                   int64_t end) {
    chain_task_t t = chain_task(job, pair, first, own, end);
    const int64_t v = job->vocab;
    const float alpha_0 = job->alphas[0], alpha_n = job->alphas[job->num_alphas - 1];
    __m512 top0 = _mm512_set1_ps(-INFINITY), top_n = top0;
    int64_t i = 0;
    for (; i + 16 <= v; i += 16) {
        const __m512 av = _mm512_loadu_ps(t.a + i), dv = _mm512_loadu_ps(t.d + i);
        top0 = _mm512_max_ps(top0, _mm512_fmadd_ps(_mm512_set1_ps(alpha_0), dv, av));
        top_n = _mm512_max_ps(top_n, _mm512_fmadd_ps(_mm512_set1_ps(alpha_n), dv, av));
    }
    if (!chain_chord(&t, i, _mm512_reduce_max_ps(top0), _mm512_reduce_max_ps(top_n))) return;
    __m512 sum[CHAIN], weighted[CHAIN];
    for (int g = 0; g < CHAIN; g++) sum[g] = weighted[g] = _mm512_setzero_ps();
    for (i = 0; i + 16 <= v; i += 16) {
        chain16(t.a, t.d, i, t.alpha, t.shift, t.step, t.slope, sum, weighted);
    }
    float totals[CHAIN], moments[CHAIN];
    for (int g = 0; g < CHAIN; g++) {
        totals[g] = _mm512_reduce_add_ps(sum[g]);
        moments[g] = _mm512_reduce_add_ps(weighted[g]);
    }
    chain_finish(&t, i, totals, moments, sweep16);
}

// The chained sweep with AVX2. Its 22 accumulators do not fit in 16 registers, but chains of
// CHAIN alphas still ran faster than those of 6, 8 or 16 (2.3x the exponential per alpha at
// B = 1 and 8 on a Zen 4; 21 alphas in one chain left B = 1 one task).
static void chain8(const float *a, const float *d, int64_t i, float alpha, float shift,
                   float step, float slope, __m256 *sum, __m256 *weighted) {
    const __m256 dv = _mm256_loadu_ps(d + i);
    const __m256 anchor = _mm256_sub_ps(
        _mm256_fmadd_ps(_mm256_set1_ps(alpha), dv, _mm256_loadu_ps(a + i)), _mm256_set1_ps(shift));
    const __m256 rise = _mm256_fmsub_ps(_mm256_set1_ps(step), dv, _mm256_set1_ps(slope));
    const __m256 last = _mm256_fmadd_ps(_mm256_set1_ps((float)(CHAIN - 1)), rise, anchor);
    const __m256 climbs =
        _mm256_and_ps(_mm256_cmp_ps(anchor, _mm256_set1_ps(CHAIN_FLOOR), _CMP_LT_OQ),
                      _mm256_cmp_ps(last, _mm256_set1_ps(CHAIN_FLOOR), _CMP_GE_OQ));
    if (_mm256_movemask_ps(climbs)) {
        for (int g = 0; g < CHAIN; g++) {
            const __m256 z = _mm256_fmadd_ps(_mm256_set1_ps(alpha + step * (float)g), dv,
                                             _mm256_loadu_ps(a + i));
            const __m256 e = exp8(_mm256_sub_ps(z, _mm256_set1_ps(shift + slope * (float)g)));
            sum[g] = _mm256_add_ps(sum[g], e);
            weighted[g] = _mm256_fmadd_ps(e, dv, weighted[g]);
        }
        return;
    }
    const __m256 rho = exp8(rise);
    __m256 e = exp8(anchor);
#pragma GCC unroll 11
    for (int g = 0; g < CHAIN; g++) {
        sum[g] = _mm256_add_ps(sum[g], e);
        weighted[g] = _mm256_fmadd_ps(e, dv, weighted[g]);
        e = _mm256_mul_ps(e, rho);
    }
}

static void sweep_chained8(const sweep_t *job, int64_t pair, int64_t first, int64_t own,
                           int64_t end) {
    chain_task_t t = chain_task(job, pair, first, own, end);
    const int64_t v = job->vocab;
    const float alpha_0 = job->alphas[0], alpha_n = job->alphas[job->num_alphas - 1];
    __m256 top0 = _mm256_set1_ps(-INFINITY), top_n = top0;
    int64_t i = 0;
    for (; i + VEC <= v; i += VEC) {
        const __m256 av = _mm256_loadu_ps(t.a + i), dv = _mm256_loadu_ps(t.d + i);
        top0 = _mm256_max_ps(top0, _mm256_fmadd_ps(_mm256_set1_ps(alpha_0), dv, av));
        top_n = _mm256_max_ps(top_n, _mm256_fmadd_ps(_mm256_set1_ps(alpha_n), dv, av));
    }
    if (!chain_chord(&t, i, max8(top0), max8(top_n))) return;
    __m256 sum[CHAIN], weighted[CHAIN];
    for (int g = 0; g < CHAIN; g++) sum[g] = weighted[g] = _mm256_setzero_ps();
    for (i = 0; i + VEC <= v; i += VEC) {
        chain8(t.a, t.d, i, t.alpha, t.shift, t.step, t.slope, sum, weighted);
    }
    float totals[CHAIN], moments[CHAIN];
    for (int g = 0; g < CHAIN; g++) {
        totals[g] = sum8(sum[g]);
        moments[g] = sum8(weighted[g]);
    }
    chain_finish(&t, i, totals, moments, sweep);
}

// A chained task: pair task / chunks, chunk task % chunks of CHAIN alphas (the last one ends at
// the grid's end, overlapping the one before).
INLINE void chained_task(const sweep_t *job, int64_t task,
                         void (*run)(const sweep_t *, int64_t, int64_t, int64_t, int64_t)) {
    const int64_t chunks = (job->num_alphas + CHAIN - 1) / CHAIN;
    const int64_t pair = task / chunks, own = task % chunks * CHAIN;
    const int64_t end = own + CHAIN < job->num_alphas ? own + CHAIN : job->num_alphas;
    run(job, pair, end - CHAIN, own, end);
}
static void chained_task16(const sweep_t *job, int64_t task) {
    chained_task(job, task, sweep_chained16);
}
static void chained_task8(const sweep_t *job, int64_t task) {
    chained_task(job, task, sweep_chained8);
}

// Whether the fusion's sweep and statistics may take their AVX-512 code where the CPU has it
// (kernels/cpu_ops.py turns it off to test the AVX2 code on such CPUs).
static atomic_int fusion_avx512 = 1;

typedef void (*sweep_task_fn)(const sweep_t *, int64_t);

// The sweep's task function for this CPU and grid, and how many tasks `pairs` pairs make.
static sweep_task_fn sweep_tasks(const sweep_t *job, int64_t pairs, int64_t *tasks) {
    const int wide = atomic_load(&fusion_avx512) && __builtin_cpu_supports("avx512f");
    if (evenly_spaced(job->alphas, job->num_alphas)) {
        *tasks = pairs * ((job->num_alphas + CHAIN - 1) / CHAIN);
        return wide ? chained_task16 : chained_task8;
    }
    *tasks = pairs * job->num_alphas;
    return wide ? sweep16 : sweep;
}

static void fusion_sweep(const sweep_t *job, int64_t pairs, int threads) {
    int64_t tasks;
    const sweep_task_fn run = sweep_tasks(job, pairs, &tasks);
    if (threads <= 1 || tasks < 2 || pairs * job->num_alphas * job->vocab < PARALLEL_MIN_ELEMENTS) {
        for (int64_t task = 0; task < tasks; task++) run(job, task);
        return;
    }
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t task = 0; task < tasks; task++) run(job, task);
}

// Dynamic logit fusion's statistics (kernels/fusion.py) for every pair p = (b, t), with a the
// large logits [B, V], s the small base's [B, V] and e expert t's [B, E, V]; fp32:
//   d[p] = e - s where both are finite, else 0 (written to d [P, V]);
//   over the tokens where both are finite: LSE and softmax-mean of d of s and of e (0, 0 where
//   there is none), and whether any d != 0;
//   whether any d != 0 where a > -inf; LSE(a) and whether a has a finite entry; E_softmax(a)[d]
//   (the plain mean of d where a has none).
// stats [P, STATS] holds them in that order (flags as 0 or 1). One task per pair, two passes.

enum {
    STAT_LSE_S, STAT_MEAN_S, STAT_LSE_E, STAT_MEAN_E, STAT_VALID, STAT_MOVED,
    STAT_MOVED_A, STAT_LSE_A, STAT_VALID_A, STAT_MEAN_A, STATS
};

typedef struct {
    const float *a, *small, *experts;
    float *d, *stats;
    int64_t lda, lds, ld_expert_row, ld_expert, experts_per_row, vocab;
    // Where given, row b of a is a + rows[b] * lda, the small base's row small_rows[b] and the
    // expert's of pair p expert_rows[p] (rows anywhere, as the engine's small models leave them).
    const int64_t *rows;
    const float *const *small_rows, *const *expert_rows;
} stats_t;

INLINE __m256 finite8(__m256 x) {
    return _mm256_cmp_ps(_mm256_sub_ps(x, x), _mm256_setzero_ps(), _CMP_EQ_OQ);
}

// m where finite, else 0: the shift that keeps exp in range (and exp(-inf - 0) = 0).
INLINE float shift(float m) { return isfinite(m) ? m : 0.0f; }

// One pair's rows: the large model's a, the small base's s, the expert's e, and d to write.
typedef struct {
    const float *a, *s, *e;
    float *d;
    int64_t v;
} pair_rows_t;

INLINE pair_rows_t pair_rows(const stats_t *job, int64_t pair) {
    const int64_t b = pair / job->experts_per_row, t = pair % job->experts_per_row;
    const pair_rows_t r = {
        .a = job->a + (job->rows ? job->rows[b] : b) * job->lda,
        .s = job->small_rows ? job->small_rows[b] : job->small + b * job->lds,
        .e = job->expert_rows ? job->expert_rows[pair]
                              : job->experts + b * job->ld_expert_row + t * job->ld_expert,
        .d = job->d + pair * job->vocab,
        .v = job->vocab,
    };
    return r;
}

// The first pass's maxima (then the shifts) and flags, and the second pass's sums. Each pass's
// vector part is per instruction set (pair_stats8, pair_stats16), its tail and the rest here.
typedef struct {
    float top_s, top_e, top_a;
    int moved, moved_a;
} stats_tops_t;

typedef struct {
    float sum_s, w_s, sum_e, w_e, sum_a, w_a, sum_d;
} stats_sums_t;

static void tops_tail(const pair_rows_t *r, int64_t i, stats_tops_t *t) {
    const float *a = r->a, *s = r->s, *e = r->e;
    for (int64_t j = i; j < r->v; j++) {
        const int both = isfinite(s[j]) && isfinite(e[j]);
        r->d[j] = both ? e[j] - s[j] : 0.0f;
        if (both) {
            t->top_s = s[j] > t->top_s ? s[j] : t->top_s;
            t->top_e = e[j] > t->top_e ? e[j] : t->top_e;
        }
        t->top_a = a[j] > t->top_a ? a[j] : t->top_a;
        t->moved |= r->d[j] != 0.0f;
        t->moved_a |= r->d[j] != 0.0f && a[j] > -INFINITY;
    }
    t->top_s = shift(t->top_s), t->top_e = shift(t->top_e), t->top_a = shift(t->top_a);
}

static void sums_tail(const pair_rows_t *r, int64_t i, const stats_tops_t *t, stats_sums_t *u) {
    const float *a = r->a, *s = r->s, *e = r->e, *d = r->d;
    for (; i < r->v; i++) {
        const int both = isfinite(s[i]) && isfinite(e[i]);
        const float es = both ? expf(s[i] - t->top_s) : 0.0f;
        const float ee = both ? expf(e[i] - t->top_e) : 0.0f;
        const float ea = expf(a[i] - t->top_a);
        u->sum_s += es, u->w_s += es * d[i];
        u->sum_e += ee, u->w_e += ee * d[i];
        u->sum_a += ea, u->w_a += ea * d[i];
        u->sum_d += d[i];
    }
}

static void stats_write(const stats_t *job, int64_t pair, const stats_tops_t *t,
                        const stats_sums_t *u) {
    float *out = job->stats + pair * STATS;
    const int valid = u->sum_s > 0.0f, valid_a = u->sum_a > 0.0f;
    out[STAT_LSE_S] = valid ? t->top_s + logf(u->sum_s) : 0.0f;
    out[STAT_MEAN_S] = valid ? u->w_s / u->sum_s : 0.0f;
    out[STAT_LSE_E] = u->sum_e > 0.0f ? t->top_e + logf(u->sum_e) : 0.0f;
    out[STAT_MEAN_E] = u->sum_e > 0.0f ? u->w_e / u->sum_e : 0.0f;
    out[STAT_VALID] = (float)valid;
    out[STAT_MOVED] = (float)t->moved;
    out[STAT_MOVED_A] = (float)t->moved_a;
    out[STAT_LSE_A] = valid_a ? t->top_a + logf(u->sum_a) : 0.0f;
    out[STAT_VALID_A] = (float)valid_a;
    // Where a has no finite entry its softmax is taken of zeros: the plain mean.
    out[STAT_MEAN_A] = valid_a ? u->w_a / u->sum_a : u->sum_d / (float)job->vocab;
}

static void pair_stats8(const stats_t *job, int64_t pair) {
    const pair_rows_t r = pair_rows(job, pair);
    const float *a = r.a, *s = r.s, *e = r.e;
    float *d = r.d;
    const int64_t v = r.v;
    const __m256 neg_inf = _mm256_set1_ps(-INFINITY), zero = _mm256_setzero_ps();
    __m256 top_s8 = neg_inf, top_e8 = neg_inf, top_a8 = neg_inf;
    __m256 moved8 = zero, moved_a8 = zero;
    int64_t i = 0;
    for (; i + VEC <= v; i += VEC) {
        const __m256 sv = _mm256_loadu_ps(s + i), ev = _mm256_loadu_ps(e + i);
        const __m256 av = _mm256_loadu_ps(a + i);
        const __m256 both = _mm256_and_ps(finite8(sv), finite8(ev));
        const __m256 dv = _mm256_and_ps(both, _mm256_sub_ps(ev, sv));
        _mm256_storeu_ps(d + i, dv);
        top_s8 = _mm256_max_ps(top_s8, _mm256_blendv_ps(neg_inf, sv, both));
        top_e8 = _mm256_max_ps(top_e8, _mm256_blendv_ps(neg_inf, ev, both));
        top_a8 = _mm256_max_ps(top_a8, av);
        const __m256 nonzero = _mm256_cmp_ps(dv, zero, _CMP_NEQ_OQ);
        moved8 = _mm256_or_ps(moved8, nonzero);
        moved_a8 = _mm256_or_ps(moved_a8,
                                _mm256_and_ps(nonzero, _mm256_cmp_ps(av, neg_inf, _CMP_GT_OQ)));
    }
    stats_tops_t t = {max8(top_s8), max8(top_e8), max8(top_a8),
                      _mm256_movemask_ps(moved8) != 0, _mm256_movemask_ps(moved_a8) != 0};
    tops_tail(&r, i, &t);
    const __m256 ts = _mm256_set1_ps(t.top_s), te = _mm256_set1_ps(t.top_e);
    const __m256 ta = _mm256_set1_ps(t.top_a);
    __m256 sum_s8 = zero, w_s8 = zero, sum_e8 = zero, w_e8 = zero, sum_a8 = zero, w_a8 = zero;
    __m256 sum_d8 = zero;
    for (i = 0; i + VEC <= v; i += VEC) {
        const __m256 sv = _mm256_loadu_ps(s + i), ev = _mm256_loadu_ps(e + i);
        const __m256 dv = _mm256_loadu_ps(d + i);
        const __m256 both = _mm256_and_ps(finite8(sv), finite8(ev));
        const __m256 es = _mm256_and_ps(both, exp8(_mm256_sub_ps(sv, ts)));
        const __m256 ee = _mm256_and_ps(both, exp8(_mm256_sub_ps(ev, te)));
        const __m256 ea = exp8(_mm256_sub_ps(_mm256_loadu_ps(a + i), ta));
        sum_s8 = _mm256_add_ps(sum_s8, es), w_s8 = _mm256_fmadd_ps(es, dv, w_s8);
        sum_e8 = _mm256_add_ps(sum_e8, ee), w_e8 = _mm256_fmadd_ps(ee, dv, w_e8);
        sum_a8 = _mm256_add_ps(sum_a8, ea), w_a8 = _mm256_fmadd_ps(ea, dv, w_a8);
        sum_d8 = _mm256_add_ps(sum_d8, dv);
    }
    stats_sums_t u = {sum8(sum_s8), sum8(w_s8), sum8(sum_e8), sum8(w_e8),
                      sum8(sum_a8), sum8(w_a8), sum8(sum_d8)};
    sums_tail(&r, i, &t, &u);
    stats_write(job, pair, &t, &u);
}

// The same with AVX-512 where the CPU has it: the exponentials are the passes' cost, and 16
// lanes do them at twice the rate (exp16 is exp8 lane for lane; only the sums' order differs).
AVX512 static inline __mmask16 finite16(__m512 x) {
    return _mm512_cmp_ps_mask(_mm512_sub_ps(x, x), _mm512_setzero_ps(), _CMP_EQ_OQ);
}

AVX512 static void pair_stats16(const stats_t *job, int64_t pair) {
    const pair_rows_t r = pair_rows(job, pair);
    const float *a = r.a, *s = r.s, *e = r.e;
    float *d = r.d;
    const int64_t v = r.v;
    const __m512 neg_inf = _mm512_set1_ps(-INFINITY), zero = _mm512_setzero_ps();
    __m512 top_s16 = neg_inf, top_e16 = neg_inf, top_a16 = neg_inf;
    __mmask16 moved = 0, moved_a = 0;
    int64_t i = 0;
    for (; i + 16 <= v; i += 16) {
        const __m512 sv = _mm512_loadu_ps(s + i), ev = _mm512_loadu_ps(e + i);
        const __m512 av = _mm512_loadu_ps(a + i);
        const __mmask16 both = finite16(sv) & finite16(ev);
        const __m512 dv = _mm512_maskz_sub_ps(both, ev, sv);
        _mm512_storeu_ps(d + i, dv);
        top_s16 = _mm512_mask_max_ps(top_s16, both, top_s16, sv);
        top_e16 = _mm512_mask_max_ps(top_e16, both, top_e16, ev);
        top_a16 = _mm512_max_ps(top_a16, av);
        const __mmask16 nonzero = _mm512_cmp_ps_mask(dv, zero, _CMP_NEQ_OQ);
        moved |= nonzero;
        moved_a |= nonzero & _mm512_cmp_ps_mask(av, neg_inf, _CMP_GT_OQ);
    }
    stats_tops_t t = {_mm512_reduce_max_ps(top_s16), _mm512_reduce_max_ps(top_e16),
                      _mm512_reduce_max_ps(top_a16), moved != 0, moved_a != 0};
    tops_tail(&r, i, &t);
    const __m512 ts = _mm512_set1_ps(t.top_s), te = _mm512_set1_ps(t.top_e);
    const __m512 ta = _mm512_set1_ps(t.top_a);
    __m512 sum_s16 = zero, w_s16 = zero, sum_e16 = zero, w_e16 = zero, sum_a16 = zero;
    __m512 w_a16 = zero, sum_d16 = zero;
    for (i = 0; i + 16 <= v; i += 16) {
        const __m512 sv = _mm512_loadu_ps(s + i), ev = _mm512_loadu_ps(e + i);
        const __m512 dv = _mm512_loadu_ps(d + i);
        const __mmask16 both = finite16(sv) & finite16(ev);
        const __m512 es = _mm512_maskz_mov_ps(both, exp16(_mm512_sub_ps(sv, ts)));
        const __m512 ee = _mm512_maskz_mov_ps(both, exp16(_mm512_sub_ps(ev, te)));
        const __m512 ea = exp16(_mm512_sub_ps(_mm512_loadu_ps(a + i), ta));
        sum_s16 = _mm512_add_ps(sum_s16, es), w_s16 = _mm512_fmadd_ps(es, dv, w_s16);
        sum_e16 = _mm512_add_ps(sum_e16, ee), w_e16 = _mm512_fmadd_ps(ee, dv, w_e16);
        sum_a16 = _mm512_add_ps(sum_a16, ea), w_a16 = _mm512_fmadd_ps(ea, dv, w_a16);
        sum_d16 = _mm512_add_ps(sum_d16, dv);
    }
    stats_sums_t u = {_mm512_reduce_add_ps(sum_s16), _mm512_reduce_add_ps(w_s16),
                      _mm512_reduce_add_ps(sum_e16), _mm512_reduce_add_ps(w_e16),
                      _mm512_reduce_add_ps(sum_a16), _mm512_reduce_add_ps(w_a16),
                      _mm512_reduce_add_ps(sum_d16)};
    sums_tail(&r, i, &t, &u);
    stats_write(job, pair, &t, &u);
}

typedef void (*stats_task_fn)(const stats_t *, int64_t);

static stats_task_fn stats_task(void) {
    const int wide = atomic_load(&fusion_avx512) && __builtin_cpu_supports("avx512f");
    return wide ? pair_stats16 : pair_stats8;
}

static void fusion_stats(const stats_t *job, int64_t pairs, int threads) {
    const stats_task_fn run = stats_task();
    if (threads <= 1 || pairs < 2 || pairs * job->vocab < PARALLEL_MIN_ELEMENTS) {
        for (int64_t p = 0; p < pairs; p++) run(job, p);
        return;
    }
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t p = 0; p < pairs; p++) run(job, p);
}

// The dynamic choice from fusion_stats' statistics [B * E, STATS] and fusion_sweep's lse and
// mean [B * E, G] over alphas [G] (ascending): per row, the expert and alpha of the lowest cost,
// the first in expert-major then alpha order (a NaN cost wins, as torch.argmin has it); the
// costs [B, E, G] too where `costs` is not NULL. They are kernels.cpu_ops.fusion_costs_ref's
// float32 operations in its order (no contraction: -ffp-contract=off), so the same bits.
// torch.where(keep, value.clamp_min(0), 0): a NaN value stays NaN where kept.
INLINE float clamp_kept(int keep, float value) {
    return keep ? (value < 0.0f ? 0.0f : value) : 0.0f;
}

static void fusion_choose(const float *stats, const float *lse, const float *mean,
                          const float *alphas, int64_t batch, int64_t experts, int64_t num_alphas,
                          int64_t *index, float *alpha, float *costs) {
    for (int64_t b = 0; b < batch; b++) {
        int64_t best = 0;
        float lowest = INFINITY;
        for (int64_t t = 0; t < experts; t++) {
            const int64_t pair = b * experts + t;
            const float *st = stats + pair * STATS;
            const int keep_q = st[STAT_VALID] > 0.0f && st[STAT_MOVED] > 0.0f;
            const float lse_s = st[STAT_LSE_S], lse_e = st[STAT_LSE_E], lse_a = st[STAT_LSE_A];
            const float kl_eq = clamp_kept(keep_q, st[STAT_MEAN_E] - lse_e + lse_s);
            const float kl_qe = clamp_kept(keep_q, lse_e - lse_s - st[STAT_MEAN_S]);
            const int moves = st[STAT_VALID_A] > 0.0f && st[STAT_MOVED_A] > 0.0f;
            for (int64_t g = 0; g < num_alphas; g++) {
                const int64_t at = pair * num_alphas + g;
                const float a = alphas[g];
                const int keep = moves && a != 0.0f;
                const float kl_zp = clamp_kept(keep, a * mean[at] - lse[at] + lse_a);
                const float kl_pz = clamp_kept(keep, lse[at] - lse_a - a * st[STAT_MEAN_A]);
                const float u = kl_zp - kl_eq, w = kl_pz - kl_qe;
                const float cost = u * u + w * w;
                if (costs) costs[at] = cost;
                if (cost < lowest || (isnan(cost) && !isnan(lowest))) {
                    lowest = cost;
                    best = t * num_alphas + g;
                }
            }
        }
        index[b] = best / num_alphas;
        alpha[b] = alphas[best % num_alphas];
    }
}

// ---------------------------------------------------------------------------------------------
// Fused logits, in place: for each row b, logits[rows[b], v] += alphas[b, t] * d_bt[v] for the
// experts t in ascending order, d_bt = expert_bt - small_b (0 wherever either is not finite),
// over v < vocab; the row's columns from vocab to width become -inf. The products and sums
// round as kernels.cpu_ops.fusion_apply_ref's do (one product, then one sum, per expert); an
// expert whose alpha is 0 in every row is skipped, as there.

typedef struct {
    float *logits;
    const int64_t *rows;         // [batch] rows of logits
    const float *const *small;   // [batch] rows of vocab floats
    const float *const *experts; // [batch * num_experts]
    const float *alphas;         // [batch, num_experts]
    int64_t ld, batch, num_experts, vocab, width;
} apply_t;

static void apply_row(const apply_t *job, const int *active, int64_t b) {
    const int64_t e = job->num_experts;
    float *restrict out = job->logits + job->rows[b] * job->ld;
    const float *restrict small = job->small[b];
    for (int64_t t = 0; t < e; t++) {
        if (!active[t]) continue;
        const float alpha = job->alphas[b * e + t];
        const float *restrict expert = job->experts[b * e + t];
        for (int64_t v = 0; v < job->vocab; v++) {
            // |x| <= FLT_MAX is isfinite(x) in a form the compiler vectorises.
            const int both = (fabsf(small[v]) <= FLT_MAX) & (fabsf(expert[v]) <= FLT_MAX);
            const float d = both ? expert[v] - small[v] : 0.0f;
            out[v] = out[v] + alpha * d;
        }
    }
    for (int64_t v = job->vocab; v < job->width; v++) out[v] = -INFINITY;
}

// Returns -1 when the flags cannot be allocated.
static int fusion_apply(const apply_t *job, int threads) {
    const int64_t e = job->num_experts;
    int *active = calloc((size_t)(e > 0 ? e : 1), sizeof(int));
    if (active == NULL) return -1;
    for (int64_t t = 0; t < e; t++) {
        for (int64_t b = 0; b < job->batch; b++) active[t] |= job->alphas[b * e + t] != 0.0f;
    }
    if (threads <= 1 || job->batch < 2 || job->batch * job->vocab < PARALLEL_MIN_ELEMENTS) {
        for (int64_t b = 0; b < job->batch; b++) apply_row(job, active, b);
    } else {
#pragma omp parallel for schedule(static) num_threads(threads)
        for (int64_t b = 0; b < job->batch; b++) apply_row(job, active, b);
    }
    free(active);
    return 0;
}

// ---------------------------------------------------------------------------------------------
// A decode step's decoder layers in one call (engine.model's decode-only path): per layer the
// very calls the Python path makes, in its order, so the same bits, with no Python between
// them. Between two projections the Python path ran cold: the weights a projection streams
// evict the interpreter's and torch's code and data from the caches, and every Python-level
// op after it paid ~20 us to bring them back.
//
// The whole step is one OpenMP parallel region: every op is shared by the team's threads (or
// left to thread 0 where the op alone would not wake a second thread), with a spinning barrier
// between ops. One parallel region per op cost a wake-up of the sleeping thread per op where
// OpenMP waits passively (the server's setting): about 200 per step, which on a virtual machine
// doubled a batch-1 step. Which thread computes an element never changes how, so the same bits.
typedef struct {
    atomic_int arrived, generation;
    void *shared;  // a pointer thread 0 hands the others (the LoRA kernel's scratch)
} team_t;

typedef struct {
    team_t *team;
    int thread, size;
} member_t;

// Every thread of the team waits here until all have arrived. Spins for about a short op's
// time (a futex wake-up costs more than most ops), then yields at every look: where threads
// outnumber cores (two models' steps at once, the server's event loop) the one it waits for may
// need this core.
static void team_sync(void *context) {
    const member_t *member = context;
    if (member->size <= 1) return;
    team_t *team = member->team;
    const int generation = atomic_load_explicit(&team->generation, memory_order_acquire);
    if (atomic_fetch_add_explicit(&team->arrived, 1, memory_order_acq_rel) == member->size - 1) {
        atomic_store_explicit(&team->arrived, 0, memory_order_relaxed);
        atomic_store_explicit(&team->generation, generation + 1, memory_order_release);
        return;
    }
    for (unsigned spins = 0;
         atomic_load_explicit(&team->generation, memory_order_acquire) == generation; spins++) {
        if (spins < (1u << 10)) {
            _mm_pause();
        } else {
            sched_yield();
        }
    }
}

// The rows [*begin, *end) of an op on `rows` rows that this member computes: an equal share,
// or all of them on thread 0 where the op alone would run on the calling thread.
INLINE void rows_of(const member_t *member, int64_t rows, int parallel, int64_t *begin,
                    int64_t *end) {
    const int64_t size = parallel ? member->size : 1, thread = parallel ? member->thread : 0;
    if (!parallel && member->thread != 0) {
        *begin = *end = 0;
        return;
    }
    *begin = rows * thread / size;
    *end = rows * (thread + 1) / size;
}

// The projections run through `linear` (kernels/cpu_linear.c's kernel for this dtype, by
// address): this member's share of y = x @ w.T (+ bias), x with row stride ldx, y contiguous
// [m, n].
typedef int (*linear_fn)(const void *x, int64_t ldx, const void *w, const void *bias, void *out,
                         int64_t m, int64_t n, int64_t k, int thread, int team);
// And each projection's multi-LoRA (kernels/csrc/cpu_linear.c's lora_entry, by address):
// y (row stride ldy) += the adapters of x (row stride ldx), by the group's int64 params, with
// the team's barrier between its parts.
typedef int (*lora_fn)(const void *x, int64_t ldx, const int64_t *params, void *y, int64_t ldy,
                       int64_t m, int thread, int team, void (*sync)(void *), void *context,
                       void **shared);
// Or, in a sparse model (WINA / TEAL), kernels/csrc/sparse_linear.c's sparse_entry (by
// address): w [k, n] (W.T contiguous), the group's column norms (or NULL), and keep > 0 (top-k)
// or the calibrated threshold; the team's barrier between its phases.
// Where the group has adapters too, it writes x with each row's dropped channels zeroed to
// `masked`: the adapters see the channels the base weights saw.
typedef int (*sparse_fn)(const void *x, int64_t ldx, const void *w, const float *norms,
                         int64_t keep, const float *threshold, const void *bias, void *out,
                         void *masked, int64_t m, int64_t n, int64_t k, int thread, int team,
                         void (*sync)(void *), void *context, void **shared);

// Per layer, the addresses (0: none) and numbers a step reads, int64 each, in this order.
enum {
    LAYER_QKV,          // [(hq + 2 hk) d, hidden]
    LAYER_QKV_BIAS,     // [(hq + 2 hk) d] or 0
    LAYER_QK_NORM,      // [d] (Qwen3) or 0
    LAYER_O,            // [hidden, hq d]
    LAYER_O_BIAS,       // [hidden] or 0
    LAYER_POST_NORM,    // [hidden]
    LAYER_GATE_UP,      // [2 f, hidden]
    LAYER_DOWN,         // [hidden, f]
    LAYER_NEXT_NORM,    // [hidden]: the next layer's input norm, or the final norm
    LAYER_KEYS,         // the KV cache's [slots, hk, d] pools
    LAYER_VALUES,
    LAYER_GATHER,       // which of the step's decode gathers the layer's window attends
    LAYER_LORA_QKV,      // each projection group's multi-LoRA params, or 0: no adapter
    LAYER_LORA_O,
    LAYER_LORA_GATE_UP,
    LAYER_LORA_DOWN,
    LAYER_NORMS_QKV,     // a sparse model's per group: column norms [k] fp32, or 0 (TEAL)
    LAYER_KEEP_QKV = LAYER_NORMS_QKV + 4,            // channels each row keeps (top-k), or 0
    LAYER_THRESHOLD_QKV = LAYER_KEEP_QKV + 4,        // else the calibrated threshold: fp32 [1]
    LAYER_FIELDS = LAYER_THRESHOLD_QKV + 4,
};

// The projection groups, in the order of the per-group fields above, and their weights and biases.
enum { GROUP_QKV, GROUP_O, GROUP_GATE_UP, GROUP_DOWN };
static const int GROUP_WEIGHT[4] = {LAYER_QKV, LAYER_O, LAYER_GATE_UP, LAYER_DOWN};
static const int GROUP_BIAS[4] = {LAYER_QKV_BIAS, LAYER_O_BIAS, -1, -1};

// A decode gather's fields: slots [m, max_len] int64, lengths [m] int64, max_len.
enum { GATHER_SLOTS, GATHER_LENGTHS, GATHER_MAX_LEN, GATHER_FIELDS };

typedef struct {
    const int64_t *layers;   // [num_layers, LAYER_FIELDS]
    const int64_t *gathers;  // [gathers, GATHER_FIELDS]: this step's, one per distinct window
    int64_t num_layers, m, hidden_size, hq, hk, d, f;
    char *hidden, *x;  // the residual stream (updated) and its normed copy (layer 0's input)
    char *qkv, *qk, *attn, *proj, *gate_up, *act;  // scratch; qk only with a q/k norm
    char *masked;  // scratch [m, max(hidden, hq d, f)] for a sparse model's adapters, or NULL
    // The rows' cos and sin [m, d / 2], or with `positions` the rotary tables, row p for
    // position p.
    const char *cos, *sin;
    const int64_t *positions;  // [m] or NULL
    // Where the call starts from token ids [m] (else NULL): hidden's rows are gathered from
    // the embedding [vocab, hidden], x is their norm by `first_norm`.
    const int64_t *input_ids;
    const char *embed, *first_norm;
    const int64_t *slot_mapping;
    float eps, scale;
    linear_fn linear;
    lora_fn lora;      // NULL where no layer has adapters
    sparse_fn sparse;  // NULL: dense projections
    // The LM head [vocab, hidden] or NULL; then logits [m, vocab] fp32 = the final norm's rows
    // through it, in bf16 via `lm_out` [m, vocab] (NULL for fp32, where it writes logits).
    const char *lm_head;
    int64_t vocab;
    char *lm_out;
    float *logits;
    int threads;
} decode_step_t;

#define AT(layer, field) ((void *)(intptr_t)(layer)[field])

// y [m, n] = x @ w.T (+ bias), sparse where the model is, then y += the group's adapters where
// the layer has any; the whole team has finished both when it returns.
INLINE int project(const decode_step_t *s, member_t *member, const int64_t *layer, int group,
                   const char *x, int64_t k, char *y, int64_t n) {
    const int weight = GROUP_WEIGHT[group], bias = GROUP_BIAS[group];
    const int adapters = LAYER_LORA_QKV + group;
    const void *b = bias < 0 ? NULL : AT(layer, bias);
    char *masked = s->sparse && layer[adapters] != 0 ? s->masked : NULL;
    int status;
    if (s->sparse) {
        status = s->sparse(x, k, AT(layer, weight), AT(layer, LAYER_NORMS_QKV + group),
                           layer[LAYER_KEEP_QKV + group], AT(layer, LAYER_THRESHOLD_QKV + group),
                           b, y, masked, s->m, n, k, member->thread, member->size, team_sync,
                           member, &member->team->shared);
    } else {
        status = s->linear(x, k, AT(layer, weight), b, y, s->m, n, k, member->thread,
                           member->size);
    }
    team_sync(member);
    if (layer[adapters] == 0) return status;
    status |= s->lora(masked ? masked : x, k, AT(layer, adapters), y, n, s->m, member->thread,
                      member->size, team_sync, member, &member->team->shared);
    team_sync(member);
    return status;
}

// hidden += delta, then x = the norm of hidden (add_rms_norm), on this member's rows.
INLINE void add_norm(const int bf16, const decode_step_t *s, const member_t *member,
                     const char *delta, const void *weight) {
    const size_t size = element_size(bf16);
    const int64_t h = s->hidden_size;
    int64_t r0, r1;
    rows_of(member, s->m, s->m >= 2 && s->m * h >= PARALLEL_MIN_ELEMENTS, &r0, &r1);
    if (r0 < r1) {
        add_rms_norm(bf16, s->hidden + r0 * h * size, h, delta + r0 * h * size, h, weight,
                     s->x + r0 * h * size, r1 - r0, h, s->eps, 1);
    }
}

// The q/k norm (where the model has one), rotary embedding and KV-cache writes of this
// member's rows; returns q and k's row start and stride through the pointers.
INLINE void rotate_and_store(const int bf16, const decode_step_t *s, const member_t *member,
                             const int64_t *layer, char **q, char **k, int64_t *ld_qk) {
    const size_t size = element_size(bf16);
    const int64_t m = s->m, d = s->d, qkv_width = (s->hq + 2 * s->hk) * d;
    const int64_t qk_width = (s->hq + s->hk) * d;
    char *qk = s->qkv;
    *ld_qk = qkv_width;
    if (layer[LAYER_QK_NORM]) {
        qk = s->qk;
        *ld_qk = qk_width;
    }
    *q = qk;
    *k = qk + s->hq * d * size;
    int64_t r0, r1;
    rows_of(member, m, m >= 2 && m * (s->hq + s->hk) * d >= PARALLEL_MIN_ELEMENTS, &r0, &r1);
    if (r0 >= r1) return;
    if (layer[LAYER_QK_NORM]) {
        rms_norm(bf16, s->qkv + r0 * qkv_width * size, qkv_width, d, AT(layer, LAYER_QK_NORM), d,
                 s->qk + r0 * qk_width * size, r1 - r0, s->hq + s->hk, d, s->eps, 1);
    }
    if (s->positions == NULL) {
        rope_store_kv(bf16, *q + r0 * *ld_qk * size, *ld_qk, *k + r0 * *ld_qk * size, *ld_qk,
                      s->qkv + (r0 * qkv_width + qk_width) * size, qkv_width,
                      s->cos + r0 * (d / 2) * size, s->sin + r0 * (d / 2) * size,
                      AT(layer, LAYER_KEYS), AT(layer, LAYER_VALUES), s->slot_mapping + r0,
                      r1 - r0, s->hq, s->hk, d);
        return;
    }
    for (int64_t r = r0; r < r1; r++) {  // each row's cos and sin from the tables
        const int64_t at = s->positions[r] * (d / 2) * (int64_t)size;
        rope_store_kv(bf16, *q + r * *ld_qk * size, *ld_qk, *k + r * *ld_qk * size, *ld_qk,
                      s->qkv + (r * qkv_width + qk_width) * size, qkv_width, s->cos + at,
                      s->sin + at, AT(layer, LAYER_KEYS), AT(layer, LAYER_VALUES),
                      s->slot_mapping + r, 1, s->hq, s->hk, d);
    }
}

// hidden's rows from the embedding, then x = their norm by first_norm: the member's rows.
INLINE void embed_part(const int bf16, const decode_step_t *s, const member_t *member) {
    const size_t size = element_size(bf16);
    const int64_t h = s->hidden_size;
    int64_t r0, r1;
    rows_of(member, s->m, s->m >= 2 && s->m * h >= PARALLEL_MIN_ELEMENTS, &r0, &r1);
    if (r0 >= r1) return;
    for (int64_t r = r0; r < r1; r++) {
        memcpy(s->hidden + r * h * size, s->embed + s->input_ids[r] * h * size, h * size);
    }
    rms_norm(bf16, s->hidden + r0 * h * size, h, 0, s->first_norm, 0, s->x + r0 * h * size,
             r1 - r0, 1, h, s->eps, 1);
}

// decode_attention's tasks (sequence, KV head) of this member. Returns 0, or -1 when scratch
// memory cannot be allocated.
INLINE int attend_part(const int bf16, const attention_t *a, int64_t sequences,
                       const member_t *member) {
    const int64_t tasks = sequences * a->hk, group = a->hq / a->hk;
    const int64_t work = sequences * a->max_len * a->hq * a->d;
    int64_t t0, t1;
    rows_of(member, tasks, tasks >= 2 && work >= PARALLEL_MIN_ELEMENTS, &t0, &t1);
    if (t0 >= t1) return 0;
    float *scratch =
        malloc((size_t)(2 * group * a->d + group * score_stride(a->max_len)) * sizeof(float));
    if (scratch == NULL) return -1;
    for (int64_t task = t0; task < t1; task++) attend(bf16, a, task, scratch);
    free(scratch);
    return 0;
}

// The LM head over x (the final norm of every row), then, in bf16, its output widened to fp32
// logits (exact), each member its share; the same bits as the linear kernel and Tensor.float().
INLINE int lm_head_part(const int bf16, const decode_step_t *s, member_t *member) {
    void *out = bf16 ? (void *)s->lm_out : (void *)s->logits;
    const int status = s->linear(s->x, s->hidden_size, s->lm_head, NULL, out, s->m, s->vocab,
                                 s->hidden_size, member->thread, member->size);
    if (!bf16) return status;
    team_sync(member);
    const int64_t total = s->m * s->vocab;
    const int64_t begin = total * member->thread / member->size;
    const int64_t end = total * (member->thread + 1) / member->size;
    const uint16_t *from = (const uint16_t *)s->lm_out;
    for (int64_t i = begin; i < end; i++) s->logits[i] = bf16_to_f32(from[i]);
    return status;
}

// One member's part of every layer, the team in step at every op. Returns 0, or -1 when a
// kernel could not allocate its scratch (the member still goes through every barrier).
INLINE int decode_layers_part(const int bf16, const decode_step_t *s, member_t *member) {
    const size_t size = element_size(bf16);
    const int64_t m = s->m, d = s->d, qkv_width = (s->hq + 2 * s->hk) * d;
    int status = 0;
    if (s->embed) {
        embed_part(bf16, s, member);
        team_sync(member);
    }
    for (int64_t index = 0; index < s->num_layers; index++) {
        const int64_t *layer = s->layers + index * LAYER_FIELDS;
        status |= project(s, member, layer, GROUP_QKV, s->x, s->hidden_size, s->qkv, qkv_width);
        char *q, *k;
        int64_t ld_qk;
        rotate_and_store(bf16, s, member, layer, &q, &k, &ld_qk);
        team_sync(member);
        const int64_t *gather = s->gathers + layer[LAYER_GATHER] * GATHER_FIELDS;
        const attention_t attention = {q,
                                       AT(layer, LAYER_KEYS),
                                       AT(layer, LAYER_VALUES),
                                       AT(gather, GATHER_SLOTS),
                                       AT(gather, GATHER_LENGTHS),
                                       s->attn,
                                       ld_qk,
                                       s->hq,
                                       s->hk,
                                       d,
                                       gather[GATHER_MAX_LEN],
                                       s->scale};
        status |= attend_part(bf16, &attention, m, member);
        team_sync(member);
        status |= project(s, member, layer, GROUP_O, s->attn, s->hq * d, s->proj, s->hidden_size);
        add_norm(bf16, s, member, s->proj, AT(layer, LAYER_POST_NORM));
        team_sync(member);
        status |= project(s, member, layer, GROUP_GATE_UP, s->x, s->hidden_size, s->gate_up,
                          2 * s->f);
        int64_t r0, r1;
        rows_of(member, m, m >= 2 && m * s->f >= PARALLEL_MIN_ELEMENTS, &r0, &r1);
        if (r0 < r1) {
            silu_mul(bf16, s->gate_up + r0 * 2 * s->f * size, 2 * s->f, s->act + r0 * s->f * size,
                     r1 - r0, s->f, 1);
        }
        team_sync(member);
        status |= project(s, member, layer, GROUP_DOWN, s->act, s->f, s->proj, s->hidden_size);
        add_norm(bf16, s, member, s->proj, AT(layer, LAYER_NEXT_NORM));
        team_sync(member);
    }
    if (s->lm_head) status |= lm_head_part(bf16, s, member);
    return status;
}

// Returns 0, or -1 when a kernel could not allocate its scratch.
INLINE int decode_layers(const int bf16, const decode_step_t *s) {
    team_t team = {0};
    int failed = 0;
#pragma omp parallel num_threads(s->threads > 0 ? s->threads : 1) reduction(| : failed)
    {
        member_t member = {&team, omp_get_thread_num(), omp_get_num_threads()};
        failed = decode_layers_part(bf16, s, &member) != 0;
    }
    return failed ? -1 : 0;
}

// ---------------------------------------------------------------------------------------------
// Dynamic fusion of a group of rows in one call, in place: fusion_stats, fusion_sweep,
// fusion_choose and fusion_apply of the chosen expert's column (the same bits as those four
// calls), reading the large logits at rows, the small base's and the experts' rows wherever they
// lie. Scratch d [B * E, V], stats [B * E, STATS], lse and mean [B * E, G]; index [B] and alpha
// [B] out.

typedef struct {
    float *logits;
    const int64_t *rows;          // [batch] rows of logits
    const float *const *small;    // [batch] rows of vocab floats
    const float *const *experts;  // [batch * num_experts]
    const float *alphas;          // the grid [num_alphas], ascending
    float *d, *stats, *lse, *mean;
    int64_t *index;
    float *alpha;
    int64_t ld, batch, num_experts, vocab, width, num_alphas;
} dynamic_t;

static void apply_chosen(const dynamic_t *job, int active, int64_t b) {
    float *restrict out = job->logits + job->rows[b] * job->ld;
    if (active) {
        const float alpha = job->alpha[b];
        const float *restrict d = job->d + (b * job->num_experts + job->index[b]) * job->vocab;
        for (int64_t v = 0; v < job->vocab; v++) out[v] = out[v] + alpha * d[v];
    }
    for (int64_t v = job->vocab; v < job->width; v++) out[v] = -INFINITY;
}

static void fusion_dynamic(const dynamic_t *job, int threads) {
    const int64_t batch = job->batch, e = job->num_experts, pairs = batch * e;
    const stats_t stats = {
        .a = job->logits, .d = job->d, .stats = job->stats, .lda = job->ld,
        .experts_per_row = e, .vocab = job->vocab, .rows = job->rows,
        .small_rows = job->small, .expert_rows = job->experts,
    };
    const sweep_t sweep = {
        .a = job->logits, .d = job->d, .alphas = job->alphas, .lse = job->lse,
        .mean = job->mean, .lda = job->ld, .ldd = job->vocab, .experts = e, .vocab = job->vocab,
        .num_alphas = job->num_alphas, .rows = job->rows,
    };
    const stats_task_fn stats_run = stats_task();
    int64_t sweep_count;
    const sweep_task_fn sweep_run = sweep_tasks(&sweep, pairs, &sweep_count);
    const int parallel =
        threads > 1 && pairs * job->num_alphas * job->vocab >= PARALLEL_MIN_ELEMENTS;
    team_t team = {0};
    int active = 0;  // whether any chosen alpha is not 0: thread 0's, read after a barrier
    // One region, the team's spinning barrier between the passes: where OpenMP waits passively
    // (the server's setting) each region's start wakes the sleeping thread, about 60-100 us
    // on this VM. Contiguous shares, so that each thread sweeps and applies the d it wrote.
#pragma omp parallel num_threads(parallel ? threads : 1)
    {
        member_t member = {&team, omp_get_thread_num(), omp_get_num_threads()};
        int64_t begin, end;
        rows_of(&member, pairs, 1, &begin, &end);
        for (int64_t p = begin; p < end; p++) stats_run(&stats, p);
        team_sync(&member);
        rows_of(&member, sweep_count, 1, &begin, &end);
        for (int64_t t = begin; t < end; t++) sweep_run(&sweep, t);
        team_sync(&member);
        if (member.thread == 0) {
            fusion_choose(job->stats, job->lse, job->mean, job->alphas, batch, e,
                          job->num_alphas, job->index, job->alpha, NULL);
            // fusion_apply of the chosen column, reading the d fusion_stats wrote (the same
            // values as its own e - s, 0 where either is not finite): no alpha other than 0, no
            // addition.
            for (int64_t b = 0; b < batch; b++) active |= job->alpha[b] != 0.0f;
        }
        team_sync(&member);
        rows_of(&member, batch, 1, &begin, &end);
        for (int64_t b = begin; b < end; b++) apply_chosen(job, active, b);
    }
}

// ---------------------------------------------------------------------------------------------
// Python bindings. Arguments are integers (pointers as Tensor.data_ptr() gives them) and one
// float; the first is the element type, 1 for bf16 and 0 for fp32. kernels/cpu_ops.py checks
// dtypes, shapes, strides and devices; here only the argument count and types are checked.

static int parse_ints(PyObject *const *args, Py_ssize_t nargs, Py_ssize_t expected,
                      long long *values, const char *name) {
    if (nargs != expected) {
        PyErr_Format(PyExc_TypeError, "%s() takes %zd arguments", name, expected);
        return -1;
    }
    for (Py_ssize_t i = 0; i < expected; i++) {
        values[i] = PyFloat_Check(args[i]) ? 0 : PyLong_AsLongLong(args[i]);
    }
    return PyErr_Occurred() ? -1 : 0;
}

#define PTR(v) ((void *)(intptr_t)(v))

// Releasing the GIL lets another Python thread (the server's event loop) take it, and taking it
// back then waits until that thread lets go: for a call of a microsecond or two that wait is
// all it would buy, so only calls over this many elements release it.
#define RELEASE_MIN_ELEMENTS (64 * 1024)

INLINE PyThreadState *release_gil_for(int64_t elements) {
    return elements >= RELEASE_MIN_ELEMENTS ? PyEval_SaveThread() : NULL;
}

INLINE void reacquire_gil(PyThreadState *state) {
    if (state != NULL) PyEval_RestoreThread(state);
}

// rms_norm(bf16, x, ldx_t, ldx_h, weight, ld_w, out, t, h, d, eps, threads)
static PyObject *py_rms_norm(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    long long v[12];
    if (parse_ints(args, nargs, 12, v, "rms_norm") != 0) return NULL;
    const float eps = (float)PyFloat_AsDouble(args[10]);
    if (PyErr_Occurred()) return NULL;
    PyThreadState *state = release_gil_for(v[7] * v[8] * v[9]);
    if (v[0]) {
        rms_norm(1, PTR(v[1]), v[2], v[3], PTR(v[4]), v[5], PTR(v[6]), v[7], v[8], v[9], eps,
                 (int)v[11]);
    } else {
        rms_norm(0, PTR(v[1]), v[2], v[3], PTR(v[4]), v[5], PTR(v[6]), v[7], v[8], v[9], eps,
                 (int)v[11]);
    }
    reacquire_gil(state);
    Py_RETURN_NONE;
}

// add_rms_norm(bf16, hidden, ld_h, delta, ld_d, weight, out, t, d, eps, threads)
static PyObject *py_add_rms_norm(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    long long v[11];
    if (parse_ints(args, nargs, 11, v, "add_rms_norm") != 0) return NULL;
    const float eps = (float)PyFloat_AsDouble(args[9]);
    if (PyErr_Occurred()) return NULL;
    PyThreadState *state = release_gil_for(v[7] * v[8]);
    if (v[0]) {
        add_rms_norm(1, PTR(v[1]), v[2], PTR(v[3]), v[4], PTR(v[5]), PTR(v[6]), v[7], v[8], eps,
                     (int)v[10]);
    } else {
        add_rms_norm(0, PTR(v[1]), v[2], PTR(v[3]), v[4], PTR(v[5]), PTR(v[6]), v[7], v[8], eps,
                     (int)v[10]);
    }
    reacquire_gil(state);
    Py_RETURN_NONE;
}

// rope_store_kv(bf16, q, ld_q, k, ld_k, v, ld_v, cos, sin, key_cache, value_cache, slot_mapping,
//               t, hq, hk, d)
static PyObject *py_rope_store_kv(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    long long v[16];
    if (parse_ints(args, nargs, 16, v, "rope_store_kv") != 0) return NULL;
    PyThreadState *state = release_gil_for(v[12] * (v[13] + v[14]) * v[15]);
    if (v[0]) {
        rope_store_kv(1, PTR(v[1]), v[2], PTR(v[3]), v[4], PTR(v[5]), v[6], PTR(v[7]), PTR(v[8]),
                      PTR(v[9]), PTR(v[10]), PTR(v[11]), v[12], v[13], v[14], v[15]);
    } else {
        rope_store_kv(0, PTR(v[1]), v[2], PTR(v[3]), v[4], PTR(v[5]), v[6], PTR(v[7]), PTR(v[8]),
                      PTR(v[9]), PTR(v[10]), PTR(v[11]), v[12], v[13], v[14], v[15]);
    }
    reacquire_gil(state);
    Py_RETURN_NONE;
}

// decode_attention(bf16, q, ld_q, key_cache, value_cache, slots, lengths, out, s, max_len, hq,
//                  hk, d, scale, threads)
static PyObject *py_decode_attention(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    long long v[15];
    if (parse_ints(args, nargs, 15, v, "decode_attention") != 0) return NULL;
    const float scale = (float)PyFloat_AsDouble(args[13]);
    if (PyErr_Occurred()) return NULL;
    const attention_t a = {PTR(v[1]), PTR(v[3]), PTR(v[4]), PTR(v[5]), PTR(v[6]), PTR(v[7]),
                           v[2],      v[10],     v[11],     v[12],     v[9],      scale};
    PyThreadState *state = release_gil_for(v[8] * v[9] * v[10] * v[12]);
    const int status = v[0] ? decode_attention(1, &a, v[8], (int)v[14])
                            : decode_attention(0, &a, v[8], (int)v[14]);
    reacquire_gil(state);
    if (status != 0) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

// decode_layers(bf16, layers, gathers, num_layers, m, hidden_size, hq, hk, d, f, hidden, x,
//               qkv, qk, attn, proj, gate_up, act, masked, cos, sin, slot_mapping, eps, scale,
//               linear, lora, sparse, lm_head, vocab, lm_out, logits, threads, input_ids,
//               embed, embed_rows, first_norm, positions, table_rows): see decode_layers
// above; `masked` (0 but for a sparse model with adapters), `lora`, `sparse`, `lm_head` (then
// also `lm_out` and `logits`; `lm_out` for bf16 only), `input_ids` (then also `embed` with its
// embed_rows, and `first_norm`) and `positions` (then cos and sin are tables of table_rows
// rows) may be 0; `linear`, `lora` and `sparse` are the kernels' addresses. An id or a
// position outside its table raises IndexError before anything is written.
static PyObject *py_decode_layers(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    long long v[38];
    if (parse_ints(args, nargs, 38, v, "decode_layers") != 0) return NULL;
    const int64_t *input_ids = PTR(v[32]), *positions = PTR(v[36]);
    for (int64_t r = 0; r < v[4]; r++) {
        if ((input_ids && (input_ids[r] < 0 || input_ids[r] >= v[34])) ||
            (positions && (positions[r] < 0 || positions[r] >= v[37]))) {
            PyErr_SetString(PyExc_IndexError, "decode_layers: a token id or position is out of "
                                              "range");
            return NULL;
        }
    }
    const float eps = (float)PyFloat_AsDouble(args[22]), scale = (float)PyFloat_AsDouble(args[23]);
    if (PyErr_Occurred()) return NULL;
    const decode_step_t step = {
        .layers = PTR(v[1]),
        .gathers = PTR(v[2]),
        .num_layers = v[3],
        .m = v[4],
        .hidden_size = v[5],
        .hq = v[6],
        .hk = v[7],
        .d = v[8],
        .f = v[9],
        .hidden = PTR(v[10]),
        .x = PTR(v[11]),
        .qkv = PTR(v[12]),
        .qk = PTR(v[13]),
        .attn = PTR(v[14]),
        .proj = PTR(v[15]),
        .gate_up = PTR(v[16]),
        .act = PTR(v[17]),
        .masked = PTR(v[18]),
        .cos = PTR(v[19]),
        .sin = PTR(v[20]),
        .slot_mapping = PTR(v[21]),
        .eps = eps,
        .scale = scale,
        .linear = (linear_fn)PTR(v[24]),
        .lora = (lora_fn)PTR(v[25]),
        .sparse = (sparse_fn)PTR(v[26]),
        .lm_head = PTR(v[27]),
        .vocab = v[28],
        .lm_out = PTR(v[29]),
        .logits = PTR(v[30]),
        .threads = (int)v[31],
        .input_ids = input_ids,
        .embed = PTR(v[33]),
        .first_norm = PTR(v[35]),
        .positions = positions,
    };
    // Tens of milliseconds: the server's event loop runs meanwhile.
    PyThreadState *state = PyEval_SaveThread();
    const int status = v[0] ? decode_layers(1, &step) : decode_layers(0, &step);
    PyEval_RestoreThread(state);
    if (status != 0) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

// silu_mul(bf16, gate_up, ld, out, t, f, threads)
static PyObject *py_silu_mul(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    long long v[7];
    if (parse_ints(args, nargs, 7, v, "silu_mul") != 0) return NULL;
    PyThreadState *state = release_gil_for(v[4] * v[5]);
    if (v[0]) {
        silu_mul(1, PTR(v[1]), v[2], PTR(v[3]), v[4], v[5], (int)v[6]);
    } else {
        silu_mul(0, PTR(v[1]), v[2], PTR(v[3]), v[4], v[5], (int)v[6]);
    }
    reacquire_gil(state);
    Py_RETURN_NONE;
}

// fusion_sweep(a, lda, d, ldd, pairs, experts, vocab, alphas, num_alphas, lse, mean, threads)
static PyObject *py_fusion_sweep(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    long long v[12];
    if (parse_ints(args, nargs, 12, v, "fusion_sweep") != 0) return NULL;
    const sweep_t job = {PTR(v[0]), PTR(v[2]), PTR(v[7]), PTR(v[9]), PTR(v[10]),
                         v[1],      v[3],      v[5],      v[6],      v[8],       NULL};
    Py_BEGIN_ALLOW_THREADS
    fusion_sweep(&job, v[4], (int)v[11]);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

// set_fusion_avx512(flag): whether fusion_sweep and fusion_stats may use AVX-512 (where the CPU
// has it).
static PyObject *py_set_fusion_avx512(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    long long v[1];
    if (parse_ints(args, nargs, 1, v, "set_fusion_avx512") != 0) return NULL;
    atomic_store(&fusion_avx512, v[0] != 0);
    Py_RETURN_NONE;
}

// fusion_stats(a, lda, small, lds, experts, ld_expert_row, ld_expert, batch, experts_per_row,
//              vocab, d, stats, threads)
static PyObject *py_fusion_stats(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    long long v[13];
    if (parse_ints(args, nargs, 13, v, "fusion_stats") != 0) return NULL;
    const stats_t job = {PTR(v[0]), PTR(v[2]), PTR(v[4]), PTR(v[10]), PTR(v[11]),
                         v[1],      v[3],      v[5],      v[6],       v[8],       v[9],
                         NULL,      NULL,      NULL};
    Py_BEGIN_ALLOW_THREADS
    fusion_stats(&job, v[7] * v[8], (int)v[12]);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

// fusion_choose(stats, lse, mean, alphas, batch, experts, num_alphas, index, alpha, costs);
// costs may be 0.
static PyObject *py_fusion_choose(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    long long v[10];
    if (parse_ints(args, nargs, 10, v, "fusion_choose") != 0) return NULL;
    fusion_choose(PTR(v[0]), PTR(v[1]), PTR(v[2]), PTR(v[3]), v[4], v[5], v[6], PTR(v[7]),
                  PTR(v[8]), PTR(v[9]));
    Py_RETURN_NONE;
}

// fusion_dynamic(logits, ld, rows, small_ptrs, expert_ptrs, batch, num_experts, vocab, width,
//                alphas, num_alphas, d, stats, lse, mean, index, alpha, threads)
static PyObject *py_fusion_dynamic(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    long long v[18];
    if (parse_ints(args, nargs, 18, v, "fusion_dynamic") != 0) return NULL;
    const dynamic_t job = {
        .logits = PTR(v[0]), .ld = v[1], .rows = PTR(v[2]), .small = PTR(v[3]),
        .experts = PTR(v[4]), .batch = v[5], .num_experts = v[6], .vocab = v[7], .width = v[8],
        .alphas = PTR(v[9]), .num_alphas = v[10], .d = PTR(v[11]), .stats = PTR(v[12]),
        .lse = PTR(v[13]), .mean = PTR(v[14]), .index = PTR(v[15]), .alpha = PTR(v[16]),
    };
    Py_BEGIN_ALLOW_THREADS
    fusion_dynamic(&job, (int)v[17]);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

// fusion_apply(logits, ld, rows, small_ptrs, expert_ptrs, alphas, batch, num_experts, vocab,
//              width, threads)
static PyObject *py_fusion_apply(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    long long v[11];
    if (parse_ints(args, nargs, 11, v, "fusion_apply") != 0) return NULL;
    const apply_t job = {PTR(v[0]), PTR(v[2]), PTR(v[3]), PTR(v[4]), PTR(v[5]),
                         v[1],      v[6],      v[7],      v[8],      v[9]};
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = fusion_apply(&job, (int)v[10]);
    Py_END_ALLOW_THREADS
    if (status != 0) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

// ---------------------------------------------------------------------------------------------
// Sampling by the exponential race (engine.sampling): row b's token is the argmax over v of
// exp(z_v - max z) / E_v with E_v = -log(u_v) ~ Exp(1) i.i.d., a draw from softmax(z). The noise
// of token v is a hash of the row's 64-bit key and v (two rounds of MurmurHash3's finalizer), so
// it needs no buffer and no generator state: u_v = (2 (h >> 9) + 1) 2^-24, uniform on (0, 1) in
// 2^23 steps, never 0 or 1. -inf logits never win (their e^-inf is 0). Nor can a token more than
// 21 below the maximum: its score is at most e^-21 / E_min < 0.013 (E_min = -log(1 - 2^-24) >
// 2^-24), the maximum's at least 1 / E_max > 0.060 (E_max = -log 2^-24 = 16.64); groups of eight
// such tokens are skipped, without changing the result. Ties go to the lowest id. A row with no
// finite logit gets token 0, as torch.argmax of its NaN scores does.

INLINE uint32_t mix32(uint32_t h) {
    h ^= h >> 16;
    h *= 0x85ebca6bu;
    h ^= h >> 13;
    h *= 0xc2b2ae35u;
    return h ^ (h >> 16);
}

INLINE __m256i mix8(__m256i h) {
    h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 16));
    h = _mm256_mullo_epi32(h, _mm256_set1_epi32((int)0x85ebca6bu));
    h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 13));
    h = _mm256_mullo_epi32(h, _mm256_set1_epi32((int)0xc2b2ae35u));
    return _mm256_xor_si256(h, _mm256_srli_epi32(h, 16));
}

// log x for normal x > 0 to about 1 ulp (Cephes' logf): x = m 2^e with m in [sqrt(1/2), sqrt(2)),
// log m by its polynomial in m - 1 (exact near x = 1, where -log u is smallest).
INLINE __m256 log8(__m256 x) {
    const __m256i bits = _mm256_castps_si256(x);
    __m256 e = _mm256_cvtepi32_ps(
        _mm256_sub_epi32(_mm256_srli_epi32(bits, 23), _mm256_set1_epi32(126)));
    __m256 m = _mm256_castsi256_ps(_mm256_or_si256(
        _mm256_and_si256(bits, _mm256_set1_epi32(0x007fffff)), _mm256_set1_epi32(0x3f000000)));
    const __m256 small = _mm256_cmp_ps(m, _mm256_set1_ps(0.707106781186547524f), _CMP_LT_OQ);
    e = _mm256_sub_ps(e, _mm256_and_ps(small, _mm256_set1_ps(1.0f)));
    m = _mm256_add_ps(m, _mm256_and_ps(small, m));
    const __m256 t = _mm256_sub_ps(m, _mm256_set1_ps(1.0f));
    const __m256 z = _mm256_mul_ps(t, t);
    __m256 y = _mm256_set1_ps(7.0376836292e-2f);
    y = _mm256_fmadd_ps(y, t, _mm256_set1_ps(-1.1514610310e-1f));
    y = _mm256_fmadd_ps(y, t, _mm256_set1_ps(1.1676998740e-1f));
    y = _mm256_fmadd_ps(y, t, _mm256_set1_ps(-1.2420140846e-1f));
    y = _mm256_fmadd_ps(y, t, _mm256_set1_ps(1.4249322787e-1f));
    y = _mm256_fmadd_ps(y, t, _mm256_set1_ps(-1.6668057665e-1f));
    y = _mm256_fmadd_ps(y, t, _mm256_set1_ps(2.0000714765e-1f));
    y = _mm256_fmadd_ps(y, t, _mm256_set1_ps(-2.4999993993e-1f));
    y = _mm256_fmadd_ps(y, t, _mm256_set1_ps(3.3333331174e-1f));
    y = _mm256_mul_ps(_mm256_mul_ps(y, t), z);
    y = _mm256_fmadd_ps(e, _mm256_set1_ps(-2.12194440e-4f), y);
    y = _mm256_fnmadd_ps(z, _mm256_set1_ps(0.5f), y);
    return _mm256_fmadd_ps(e, _mm256_set1_ps(0.693359375f), _mm256_add_ps(t, y));
}

// u of tokens id (eight lanes) for a row's key halves k0 and k1: (2 (h >> 9) + 1) 2^-24.
INLINE __m256 uniform8(__m256i id, __m256i k0, __m256i k1) {
    const __m256i h = mix8(_mm256_xor_si256(mix8(_mm256_xor_si256(id, k0)), k1));
    const __m256i odd = _mm256_or_si256(_mm256_slli_epi32(_mm256_srli_epi32(h, 9), 1),
                                        _mm256_set1_epi32(1));
    return _mm256_mul_ps(_mm256_cvtepi32_ps(odd), _mm256_set1_ps(0x1p-24f));
}

// The race's uniform numbers themselves, u [batch, vocab] (out's rows ld apart), for the
// constrained walks that order a row's tokens by Gumbel keys (engine.awrs).
static void race_uniform(const uint64_t *keys, int64_t batch, int64_t vocab, float *out,
                         int64_t ld, int threads) {
    const int parallel = batch * vocab >= PARALLEL_MIN_ELEMENTS;
#pragma omp parallel for schedule(static) num_threads(threads) if (parallel)
    for (int64_t b = 0; b < batch; b++) {
        const __m256i k0 = _mm256_set1_epi32((int)(uint32_t)keys[b]);
        const __m256i k1 = _mm256_set1_epi32((int)(uint32_t)(keys[b] >> 32));
        const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        float *row = out + b * ld;
        int64_t i = 0;
        for (; i + VEC <= vocab; i += VEC) {
            _mm256_storeu_ps(row + i,
                             uniform8(_mm256_add_epi32(_mm256_set1_epi32((int)i), lanes), k0, k1));
        }
        if (i < vocab) {
            float tail[VEC];
            _mm256_storeu_ps(tail,
                             uniform8(_mm256_add_epi32(_mm256_set1_epi32((int)i), lanes), k0, k1));
            memcpy(row + i, tail, (size_t)(vocab - i) * sizeof(float));
        }
    }
}

// race_uniform(keys, batch, vocab, out, ld, threads)
static PyObject *py_race_uniform(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    long long v[6];
    if (parse_ints(args, nargs, 6, v, "race_uniform") != 0) return NULL;
    PyThreadState *state = release_gil_for(v[1] * v[2]);
    race_uniform(PTR(v[0]), v[1], v[2], PTR(v[3]), v[4], (int)v[5]);
    reacquire_gil(state);
    Py_RETURN_NONE;
}

typedef struct {
    const float *logits;
    const uint64_t *keys;
    const float *floors;  // per row: logits below it count as -inf; NULL: none
    int64_t *tokens;
    int64_t ld, vocab;
} race_t;

#define RACE_MARGIN 21.0f

static void race_row(const race_t *job, int64_t b) {
    const float *z = job->logits + b * job->ld;
    const int64_t v = job->vocab, full = v / VEC * VEC;
    const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i tail_lanes = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(v - full)), lanes);
    const __m256 neg_inf = _mm256_set1_ps(-INFINITY);
    __m256 top8 = neg_inf;
    for (int64_t i = 0; i < full; i += VEC) top8 = _mm256_max_ps(top8, _mm256_loadu_ps(z + i));
    // The last partial group: -inf past the row's end.
    const __m256 tail = _mm256_blendv_ps(neg_inf, _mm256_maskload_ps(z + full, tail_lanes),
                                         _mm256_castsi256_ps(tail_lanes));
    top8 = _mm256_max_ps(top8, tail);
    const float top = max8(top8);
    if (!(top > -INFINITY)) {
        job->tokens[b] = 0;
        return;
    }
    const uint64_t key = job->keys[b];
    const __m256i k0 = _mm256_set1_epi32((int)(uint32_t)key);
    const __m256i k1 = _mm256_set1_epi32((int)(uint32_t)(key >> 32));
    // The row's maximum passes its floor (sampling_thresholds never cut it).
    const float cut = job->floors ? job->floors[b] : -INFINITY;
    const __m256 shift = _mm256_set1_ps(top), allowed = _mm256_set1_ps(cut);
    const __m256 scored = _mm256_set1_ps(cut > top - RACE_MARGIN ? cut : top - RACE_MARGIN);
    __m256 best = _mm256_setzero_ps();
    __m256i best_id = _mm256_setzero_si256();
    for (int64_t i = 0; i < v; i += VEC) {
        const __m256 zv = i < full ? _mm256_loadu_ps(z + i) : tail;
        if (_mm256_movemask_ps(_mm256_cmp_ps(zv, scored, _CMP_GE_OQ)) == 0) continue;
        const __m256i id = _mm256_add_epi32(_mm256_set1_epi32((int)i), lanes);
        const __m256 noise = _mm256_sub_ps(_mm256_setzero_ps(), log8(uniform8(id, k0, k1)));
        const __m256 score = _mm256_and_ps(_mm256_cmp_ps(zv, allowed, _CMP_GE_OQ),
                                           _mm256_div_ps(exp8(_mm256_sub_ps(zv, shift)), noise));
        const __m256 wins = _mm256_cmp_ps(score, best, _CMP_GT_OQ);  // a tie keeps the lower id
        best = _mm256_blendv_ps(best, score, wins);
        best_id = _mm256_castps_si256(
            _mm256_blendv_ps(_mm256_castsi256_ps(best_id), _mm256_castsi256_ps(id), wins));
    }
    float scores[VEC];
    int32_t ids[VEC];
    _mm256_storeu_ps(scores, best);
    _mm256_storeu_si256((__m256i *)ids, best_id);
    int winner = 0;
    for (int lane = 1; lane < VEC; lane++) {
        if (scores[lane] > scores[winner] ||
            (scores[lane] == scores[winner] && ids[lane] < ids[winner])) {
            winner = lane;
        }
    }
    job->tokens[b] = ids[winner];
}

static void exponential_race(const race_t *job, int64_t batch, int threads) {
    if (threads <= 1 || batch < 2 || batch * job->vocab < PARALLEL_MIN_ELEMENTS) {
        for (int64_t b = 0; b < batch; b++) race_row(job, b);
        return;
    }
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t b = 0; b < batch; b++) race_row(job, b);
}

// exponential_race(logits, ld, keys, floors, batch, vocab, tokens, threads); floors may be 0.
static PyObject *py_exponential_race(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    long long v[8];
    if (parse_ints(args, nargs, 8, v, "exponential_race") != 0) return NULL;
    const race_t job = {PTR(v[0]), PTR(v[2]), PTR(v[3]), PTR(v[6]), v[1], v[5]};
    PyThreadState *state = release_gil_for(v[4] * v[5]);
    exponential_race(&job, v[4], (int)v[7]);
    reacquire_gil(state);
    Py_RETURN_NONE;
}

// torch.argmax of each row (greedy decoding): the first maximum, or the first NaN where a row
// has one (torch orders NaN above every number); 0 for a row of -inf. torch's CPU argmax took
// 0.14 ms for eight rows of 32k, ten times this.
static int64_t argmax_row(const float *z, int64_t v) {
    __m256 top8 = _mm256_set1_ps(-INFINITY), nan8 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + VEC <= v; i += VEC) {
        const __m256 zv = _mm256_loadu_ps(z + i);
        top8 = _mm256_max_ps(top8, zv);
        nan8 = _mm256_or_ps(nan8, _mm256_cmp_ps(zv, zv, _CMP_UNORD_Q));
    }
    float top = max8(top8);
    int nan = _mm256_movemask_ps(nan8) != 0;
    for (int64_t j = i; j < v; j++) {
        nan |= isnan(z[j]);
        top = z[j] > top ? z[j] : top;
    }
    for (int64_t j = 0; j < v; j++) {
        if (nan ? isnan(z[j]) : z[j] == top) return j;
    }
    return 0;
}

static void argmax_rows(const float *logits, int64_t ld, int64_t batch, int64_t vocab,
                        int64_t *tokens, int threads) {
    if (threads <= 1 || batch < 2 || batch * vocab < PARALLEL_MIN_ELEMENTS) {
        for (int64_t b = 0; b < batch; b++) tokens[b] = argmax_row(logits + b * ld, vocab);
        return;
    }
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t b = 0; b < batch; b++) tokens[b] = argmax_row(logits + b * ld, vocab);
}

// argmax_rows(logits, ld, batch, vocab, tokens, threads)
static PyObject *py_argmax_rows(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    long long v[6];
    if (parse_ints(args, nargs, 6, v, "argmax_rows") != 0) return NULL;
    PyThreadState *state = release_gil_for(v[2] * v[3]);
    argmax_rows(PTR(v[0]), v[1], v[2], v[3], PTR(v[4]), (int)v[5]);
    reacquire_gil(state);
    Py_RETURN_NONE;
}

// ---------------------------------------------------------------------------------------------
// Gumbel keys z - log(-log u) for the constrained walks (engine.awrs), in float32 with log8; u = 0
// counts as the smallest normal float, as engine.awrs.gumbel_keys clamps it (u < 1). The walk's
// candidates (gumbel_topk) and its full-mask fallback (gumbel_keys) read the same keys.

INLINE __m256 gumbel8(__m256 z, __m256 u) {
    const __m256 clamped = _mm256_max_ps(u, _mm256_set1_ps(FLT_MIN));
    const __m256 e = _mm256_sub_ps(_mm256_setzero_ps(), log8(clamped));  // -log u > 0
    return _mm256_sub_ps(z, log8(e));
}

// Eight keys from i on: the row's last, partial group padded with -inf.
INLINE __m256 keys_at(const float *z, const float *u, int64_t i, int64_t v) {
    if (i + VEC <= v) return gumbel8(_mm256_loadu_ps(z + i), _mm256_loadu_ps(u + i));
    float zs[VEC], us[VEC];
    for (int j = 0; j < VEC; j++) {
        zs[j] = i + j < v ? z[i + j] : -INFINITY;
        us[j] = i + j < v ? u[i + j] : 0.5f;
    }
    return gumbel8(_mm256_loadu_ps(zs), _mm256_loadu_ps(us));
}

static void gumbel_keys_row(const float *z, const float *u, int64_t v, float *out) {
    int64_t i = 0;
    for (; i + VEC <= v; i += VEC) _mm256_storeu_ps(out + i, keys_at(z, u, i, v));
    if (i < v) {
        float tail[VEC];
        _mm256_storeu_ps(tail, keys_at(z, u, i, v));
        memcpy(out + i, tail, (size_t)(v - i) * sizeof(float));
    }
}

// The k largest keys of a row in decreasing order (ties: the lower id first) and their ids; -inf
// keys (id 0) fill what finite keys do not. One pass: a key enters the sorted list of k only
// above its last, which a row of V keys passes about k ln(V / k) times.
static void gumbel_topk_row(const float *z, const float *u, int64_t v, int64_t k, float *keys,
                            int64_t *ids) {
    for (int64_t j = 0; j < k; j++) keys[j] = -INFINITY, ids[j] = 0;
    for (int64_t i = 0; i < v; i += VEC) {
        const __m256 key8 = keys_at(z, u, i, v);
        const __m256 last = _mm256_set1_ps(keys[k - 1]);
        int above = _mm256_movemask_ps(_mm256_cmp_ps(key8, last, _CMP_GT_OQ));
        if (!above) continue;
        float lane_keys[VEC];
        _mm256_storeu_ps(lane_keys, key8);
        for (; above; above &= above - 1) {
            const int lane = __builtin_ctz((unsigned)above);
            const float key = lane_keys[lane];
            if (!(key > keys[k - 1])) continue;
            int64_t p = k - 1;
            for (; p > 0 && keys[p - 1] < key; p--) keys[p] = keys[p - 1], ids[p] = ids[p - 1];
            keys[p] = key, ids[p] = i + lane;
        }
    }
}

// gumbel(logits, ld, uniform, ld_u, batch, vocab, k, keys, ids, threads): k = 0 writes every
// key to keys [batch, vocab] (ids unused), else the top k [batch, k] and their ids.
static PyObject *py_gumbel(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    long long v[10];
    if (parse_ints(args, nargs, 10, v, "gumbel") != 0) return NULL;
    const float *logits = PTR(v[0]), *uniform = PTR(v[2]);
    float *keys = PTR(v[7]);
    int64_t *ids = PTR(v[8]);
    const int64_t batch = v[4], vocab = v[5], k = v[6];
    PyThreadState *state = release_gil_for(batch * vocab);
    const int parallel = batch * vocab >= PARALLEL_MIN_ELEMENTS;
#pragma omp parallel for schedule(static) num_threads((int)v[9]) if (parallel)
    for (int64_t b = 0; b < batch; b++) {
        if (k == 0) {
            gumbel_keys_row(logits + b * v[1], uniform + b * v[3], vocab, keys + b * vocab);
        } else {
            gumbel_topk_row(logits + b * v[1], uniform + b * v[3], vocab, k, keys + b * k,
                            ids + b * k);
        }
    }
    reacquire_gil(state);
    Py_RETURN_NONE;
}

// ---------------------------------------------------------------------------------------------
// Top-k, top-p and min-p thresholds (engine.sampling): per row of logits z, the smallest value
// theta such that keeping the tokens with z >= theta keeps the k largest (ties with the k-th
// too), then, of those, each token whose probability mass ranked above it (renormalised over
// the kept ones) is < p, then those with p >= min_p p_max; -inf where a row keeps everything.
// Tokens tied at the top-p boundary are all kept (a sort keeps an arbitrary share of them).
// No sort: a radix select over the floats' order-keeping 32-bit keys, three digits (11, 11, 10
// bits) from the top. Each digit's histogram (counts for top-k, masses e^(z - max z) for top-p,
// in double) over the tokens of the range chosen so far picks the highest bucket whose weight
// crosses the target: the boundary value lies there.

INLINE uint32_t order_key(float value) {
    uint32_t bits;
    memcpy(&bits, &value, sizeof(bits));
    return bits & 0x80000000u ? ~bits : bits | 0x80000000u;
}

INLINE float key_value(uint32_t key) {
    const uint32_t bits = key & 0x80000000u ? key & 0x7fffffffu : ~key;
    float value;
    memcpy(&value, &bits, sizeof(value));
    return value;
}

// A scratch buffer of at least `bytes` per thread and use, grown as needed and kept; NULL when
// it cannot be allocated.
typedef struct {
    void *data;
    size_t bytes;
} scratch_t;

static void *scratch(scratch_t *buffer, size_t bytes) {
    if (bytes > buffer->bytes) {
        free(buffer->data);
        buffer->data = malloc(bytes);
        buffer->bytes = buffer->data ? bytes : 0;
    }
    return buffer->data;
}

// The tokens of the first digit's bucket, gathered while the second digit's histogram is
// counted: the third reads only them.
static __thread scratch_t members_scratch;
// Top-p's masses e^(z - max z) of a row.
static __thread scratch_t weights_scratch;

// The smallest key k of a token with key >= floor_key such that the weight of the tokens with
// keys above k is < target (weights: e[v], or 1 each where e is NULL); floor_key where none is.
static uint32_t select_key(const float *z, const float *e, int64_t v, uint32_t floor_key,
                           double target) {
    static const int digit_bits[3] = {11, 11, 10};
    double histogram[1 << 11];
    int32_t *members = scratch(&members_scratch, (size_t)v * sizeof(int32_t));  // NULL: scan all
    int64_t count = 0;
    uint32_t prefix = 0;
    int shift = 32;
    double above = 0.0;
    for (int level = 0; level < 3; level++) {
        const int bits = digit_bits[level];
        const uint32_t high = shift == 32 ? 0 : prefix;  // the key's bits above this digit
        shift -= bits;
        memset(histogram, 0, sizeof(double) << bits);
        const int gathered = level == 2 && members != NULL;
        const int64_t n = gathered ? count : v;
        for (int64_t j = 0; j < n; j++) {
            const int64_t i = gathered ? members[j] : j;
            const uint32_t key = order_key(z[i]);
            if (key < floor_key || (shift + bits < 32 && key >> (shift + bits) != high)) continue;
            histogram[(key >> shift) & ((1u << bits) - 1)] += e ? (double)e[i] : 1.0;
            if (level == 1 && members != NULL) members[count++] = (int32_t)i;
        }
        int digit = (1 << bits) - 1, lowest = -1;
        for (; digit >= 0; digit--) {
            if (histogram[digit] > 0.0) lowest = digit;
            if (above + histogram[digit] >= target) break;
            above += histogram[digit];
        }
        if (digit < 0) {
            // The range weighs less than the target: at the top, everything is kept; below, its
            // buckets summed a little under the bucket that held them (rounding): its lowest.
            if (level == 0 || lowest < 0) return floor_key;
            digit = lowest;
        }
        prefix = (high << bits) | (uint32_t)digit;
    }
    return prefix;
}

typedef struct {
    const float *logits;
    const int64_t *top_k;  // 0: off
    const double *top_p;   // 1: off
    const double *min_p;   // 0: off
    float *thresholds;
    int64_t ld, vocab;
} threshold_t;


// The largest value of z that is not NaN (-inf where none is).
INLINE float row_max(const float *z, int64_t v) {
    __m256 top8 = _mm256_set1_ps(-INFINITY);
    int64_t i = 0;
    for (; i + VEC <= v; i += VEC) top8 = _mm256_max_ps(_mm256_loadu_ps(z + i), top8);  // NaN: top8
    float lanes[VEC], top = -INFINITY;
    _mm256_storeu_ps(lanes, top8);
    for (int l = 0; l < VEC; l++) top = lanes[l] > top ? lanes[l] : top;
    for (; i < v; i++) top = z[i] > top ? z[i] : top;
    return top;
}

// e^(z - top) where z >= lowest, else 0, into weights; returns their sum (in double).
static double masses(const float *z, int64_t v, float top, float lowest, float *weights) {
    const __m256 shift = _mm256_set1_ps(top), cut = _mm256_set1_ps(lowest);
    __m256d low = _mm256_setzero_pd(), high = _mm256_setzero_pd();  // eight sums in double
    int64_t i = 0;
    for (; i + VEC <= v; i += VEC) {
        const __m256 zv = _mm256_loadu_ps(z + i);
        const __m256 kept = _mm256_cmp_ps(zv, cut, _CMP_GE_OQ);
        const __m256 w = _mm256_and_ps(kept, exp8(_mm256_sub_ps(zv, shift)));
        _mm256_storeu_ps(weights + i, w);
        low = _mm256_add_pd(low, _mm256_cvtps_pd(_mm256_castps256_ps128(w)));
        high = _mm256_add_pd(high, _mm256_cvtps_pd(_mm256_extractf128_ps(w, 1)));
    }
    double lanes[4], total = 0.0;
    _mm256_storeu_pd(lanes, _mm256_add_pd(low, high));
    for (int l = 0; l < 4; l++) total += lanes[l];
    for (; i < v; i++) {
        weights[i] = z[i] >= lowest ? expf(z[i] - top) : 0.0f;
        total += weights[i];
    }
    return total;
}

static int threshold_row(const threshold_t *job, int64_t b) {
    const float *z = job->logits + b * job->ld;
    const int64_t v = job->vocab, k = job->top_k[b];
    const double p = job->top_p[b];
    const uint32_t finite = order_key(-INFINITY) + 1;  // the lowest key of a finite value
    uint32_t floor_key = finite;
    if (k > 0 && k < v) floor_key = select_key(z, NULL, v, floor_key, (double)k);
    const float top = p < 1.0 || job->min_p[b] > 0.0 ? row_max(z, v) : -INFINITY;
    if (p < 1.0) {
        float *weights = scratch(&weights_scratch, (size_t)v * sizeof(float));
        if (weights == NULL) return -1;
        const double total = masses(z, v, top, key_value(floor_key), weights);
        if (total > 0.0) floor_key = select_key(z, weights, v, floor_key, p * total);
    }
    float threshold = floor_key == finite ? -INFINITY : key_value(floor_key);
    if (job->min_p[b] > 0.0) {  // p < min_p p_max where z < max z + log min_p (float32, as torch)
        const float cut = top + (float)log(job->min_p[b]);
        threshold = cut > threshold ? cut : threshold;
    }
    job->thresholds[b] = threshold;
    return 0;
}

static int sampling_thresholds(const threshold_t *job, int64_t batch, int threads) {
    int failed = 0;
    if (threads <= 1 || batch < 2) {
        for (int64_t b = 0; b < batch; b++) failed |= threshold_row(job, b);
        return failed;
    }
#pragma omp parallel for schedule(static) num_threads(threads) reduction(| : failed)
    for (int64_t b = 0; b < batch; b++) failed |= threshold_row(job, b);
    return failed;
}

// sampling_thresholds(logits, ld, batch, vocab, top_k, top_p, min_p, thresholds, threads)
static PyObject *py_sampling_thresholds(PyObject *module, PyObject *const *args,
                                        Py_ssize_t nargs) {
    (void)module;
    long long v[9];
    if (parse_ints(args, nargs, 9, v, "sampling_thresholds") != 0) return NULL;
    const threshold_t job = {PTR(v[0]), PTR(v[4]), PTR(v[5]), PTR(v[6]), PTR(v[7]), v[1], v[3]};
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = sampling_thresholds(&job, v[2], (int)v[8]);
    Py_END_ALLOW_THREADS
    if (status != 0) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

#define FASTCALL(f) (PyCFunction)(void (*)(void))(f), METH_FASTCALL

static PyMethodDef METHODS[] = {
    {"rms_norm", FASTCALL(py_rms_norm), "RMS norm of [T, H, D] rows"},
    {"add_rms_norm", FASTCALL(py_add_rms_norm), "residual add, then the RMS norm of the sum"},
    {"rope_store_kv", FASTCALL(py_rope_store_kv), "rotary on q and k, then k and v to the cache"},
    {"decode_attention", FASTCALL(py_decode_attention), "one query per sequence, paged KV"},
    {"silu_mul", FASTCALL(py_silu_mul), "silu(gate) * up"},
    {"decode_layers", FASTCALL(py_decode_layers), "a decode step's decoder layers"},
    {"fusion_sweep", FASTCALL(py_fusion_sweep), "LSE and mean of d over a grid of alphas"},
    {"set_fusion_avx512", FASTCALL(py_set_fusion_avx512),
     "whether fusion_sweep and fusion_stats may use AVX-512"},
    {"fusion_stats", FASTCALL(py_fusion_stats), "d and the per-pair statistics of fusion"},
    {"fusion_choose", FASTCALL(py_fusion_choose), "the expert and alpha of the lowest cost"},
    {"exponential_race", FASTCALL(py_exponential_race), "one token per row by the race"},
    {"argmax_rows", FASTCALL(py_argmax_rows), "torch.argmax of each row"},
    {"race_uniform", FASTCALL(py_race_uniform), "the race's uniform numbers"},
    {"gumbel", FASTCALL(py_gumbel), "Gumbel keys, or their top k"},
    {"sampling_thresholds", FASTCALL(py_sampling_thresholds), "top-k and top-p thresholds"},
    {"fusion_apply", FASTCALL(py_fusion_apply), "fused logits in place, row by row"},
    {"fusion_dynamic", FASTCALL(py_fusion_dynamic), "dynamic fusion of rows in place, one call"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef MODULE = {
    PyModuleDef_HEAD_INIT, .m_name = "cpu_ops", .m_size = -1, .m_methods = METHODS,
};

PyMODINIT_FUNC PyInit_cpu_ops(void) {
    PyObject *module = PyModule_Create(&MODULE);
    if (module != NULL && PyModule_AddIntConstant(module, "FUSION_STATS", STATS) != 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
