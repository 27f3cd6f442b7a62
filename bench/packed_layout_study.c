// A study for issue 5 (not used by the engine): eight input rows times bf16 weights, the
// kernels' dot form against a packed layout, alternated round by round in one process.
//
//   dot:    W [N][K] as stored; per block three weight rows times eight input rows in 24 fp32
//           accumulators, one 512-bit horizontal sum per output and row at the block's end
//           (cpu_linear.c's AVX-512 form at M = 8).
//   packed: W [N/16][K/2][16][2] (per 16 outputs, each pair of K's elements side by side); per
//           block 32 outputs times eight rows in 16 accumulators fed with broadcast input
//           pairs, and no horizontal sums at all.
//
// The two sum in different orders (max |difference| printed). Build and run (AVX-512 BF16):
//   gcc -O3 -mavx512f -mavx512bw -mavx512vl -mavx512bf16 -mfma -fopenmp
//       bench/packed_layout_study.c -o /tmp/packed_layout_study   (one command)
//   OMP_NUM_THREADS=2 /tmp/packed_layout_study N K COPIES   # N a multiple of 96
// COPIES distinct weight matrices are cycled, so more than the caches hold streams from memory.
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

typedef uint16_t bf16;
#define ROWS 8
#define ROUNDS 30

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static void dot_form(const bf16 *w, const bf16 *x, float *out, int64_t n, int64_t k) {
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < n; b += 3) {
        __m512 acc[3][ROWS];
        const bf16 *row[3] = {w + b * k, w + (b + 1) * k, w + (b + 2) * k};
        for (int r = 0; r < 3; r++)
            for (int i = 0; i < ROWS; i++) acc[r][i] = _mm512_setzero_ps();
        for (int64_t kk = 0; kk < k; kk += 32) {
            __m512bh wv[3];
            for (int r = 0; r < 3; r++) {
                _mm_prefetch((const char *)(row[r] + 3 * k + kk), _MM_HINT_T1);  // a block ahead
                wv[r] = (__m512bh)_mm512_loadu_si512(row[r] + kk);
            }
            for (int i = 0; i < ROWS; i++) {
                const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + i * k + kk);
                for (int r = 0; r < 3; r++) acc[r][i] = _mm512_dpbf16_ps(acc[r][i], wv[r], xv);
            }
        }
        for (int r = 0; r < 3; r++)
            for (int i = 0; i < ROWS; i++) out[i * n + b + r] = _mm512_reduce_add_ps(acc[r][i]);
    }
}

static void packed_form(const bf16 *wp, const bf16 *x, float *out, int64_t n, int64_t k) {
    const uint32_t *pairs = (const uint32_t *)x;
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < n; b += 32) {
        __m512 acc[2][ROWS];
        const bf16 *block[2] = {wp + (b / 16) * k * 16, wp + (b / 16 + 1) * k * 16};
        for (int v = 0; v < 2; v++)
            for (int i = 0; i < ROWS; i++) acc[v][i] = _mm512_setzero_ps();
        for (int64_t p = 0; p < k / 2; p++) {
            __m512bh wv[2];
            for (int v = 0; v < 2; v++) {
                _mm_prefetch((const char *)(block[v] + p * 32 + 4 * k * 16), _MM_HINT_T1);
                wv[v] = (__m512bh)_mm512_loadu_si512(block[v] + p * 32);
            }
            for (int i = 0; i < ROWS; i++) {
                const __m512bh xv = (__m512bh)_mm512_set1_epi32((int)pairs[i * (k / 2) + p]);
                for (int v = 0; v < 2; v++) acc[v][i] = _mm512_dpbf16_ps(acc[v][i], wv[v], xv);
            }
        }
        for (int v = 0; v < 2; v++)
            for (int i = 0; i < ROWS; i++) _mm512_storeu_ps(out + i * n + b + 16 * v, acc[v][i]);
    }
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s N K COPIES\n", argv[0]);
        return 2;
    }
    const int64_t n = atol(argv[1]), k = atol(argv[2]);
    const int copies = atoi(argv[3]);
    if (n % 96 || k % 32 || copies < 1) {
        fprintf(stderr, "N must be a multiple of 96, K of 32\n");
        return 2;
    }
    const size_t size = (size_t)(n * k);
    bf16 **w = malloc(copies * sizeof(bf16 *)), **wp = malloc(copies * sizeof(bf16 *));
    bf16 *x = aligned_alloc(64, ROWS * k * sizeof(bf16));
    for (int64_t i = 0; i < ROWS * k; i++) x[i] = (bf16)(0x3f80 + i % 7);
    for (int c = 0; c < copies; c++) {
        w[c] = aligned_alloc(64, size * sizeof(bf16));
        wp[c] = aligned_alloc(64, size * sizeof(bf16));
        for (size_t i = 0; i < size; i++) w[c][i] = (bf16)(0x3c00 + (i * 2654435761u >> 20) % 512);
        for (int64_t o = 0; o < n; o++)
            for (int64_t kk = 0; kk < k; kk++)
                wp[c][(o / 16) * k * 16 + (kk / 2) * 32 + (o % 16) * 2 + kk % 2] = w[c][o * k + kk];
    }
    float *a = aligned_alloc(64, ROWS * n * sizeof(float));
    float *b = aligned_alloc(64, ROWS * n * sizeof(float));
    dot_form(w[0], x, a, n, k);
    packed_form(wp[0], x, b, n, k);
    double diff = 0;
    for (int64_t i = 0; i < ROWS * n; i++) {
        const double d = a[i] > b[i] ? a[i] - b[i] : b[i] - a[i];
        if (d > diff) diff = d;
    }
    double best[2] = {1e30, 1e30};
    for (int round = 0; round < ROUNDS; round++) {
        for (int form = 0; form < 2; form++) {
            const double start = now();
            for (int c = 0; c < copies; c++) {
                if (form == 0) dot_form(w[c], x, a, n, k);
                else packed_form(wp[c], x, b, n, k);
            }
            const double seconds = now() - start;
            if (seconds < best[form]) best[form] = seconds;
        }
    }
    const double bytes = (double)size * sizeof(bf16) * copies;
    printf("N=%ld K=%ld, %d x %.1f MB, %d rows, best of %d: dot %.3f ms (%.1f GB/s), packed %.3f "
           "ms (%.1f GB/s), packed/dot %.2f, max |difference| %g\n",
           (long)n, (long)k, copies, bytes / copies / 1e6, ROWS, ROUNDS, best[0] * 1e3,
           bytes / best[0] / 1e9, best[1] * 1e3, bytes / best[1] / 1e9, best[1] / best[0], diff);
    return 0;
}
