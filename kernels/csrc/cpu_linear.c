// Decode-time GEMV/GEMM on the CPU: out[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]) for M <= 16.
//
// Built once per element type: -DTANDEM_BF16 (AVX512-BF16 dot products) or -DTANDEM_F32 (FMA);
// each library exports the same `tandem_linear`. Keeping one type per build halves compile time.
//
// Decoding is memory bound, so the goal is to stream every weight byte from DRAM exactly once
// per call: each block of weight rows is loaded into registers chunk by chunk and dotted with
// all M input rows before moving on.
//
// Batch invariance: every output element is produced by the same instruction sequence whatever
// M is and whichever thread computes it: one fp32 vector accumulator per (weight row, input
// row) pair, walking K in ascending chunks with the final partial chunk masked, then one fixed
// horizontal reduction, then the bias. So row r of a batch equals that row computed alone, bit
// for bit. Nothing here may depend on M other than how many pairs share a weight load.

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#define MAX_M 16
#define MAX_ROWS 4
#define EXPORT __attribute__((visibility("default")))
#define INLINE static inline __attribute__((always_inline))

// Below this many weight bytes, waking the second thread costs more than it saves.
#ifndef PARALLEL_MIN_BYTES
#define PARALLEL_MIN_BYTES (256 * 1024)
#endif

#if defined(TANDEM_BF16)

typedef uint16_t elem_t;
typedef __m512bh vec_t;
typedef __mmask32 lane_mask_t;
#define LANES 32

// Masked loads cost an extra uop on the ports the dot products need: the hot loop avoids them.
INLINE vec_t load_full(const elem_t *p) { return (vec_t)_mm512_loadu_si512(p); }
INLINE vec_t load_lanes(lane_mask_t mask, const elem_t *p) {
    return (vec_t)_mm512_maskz_loadu_epi16(mask, p);
}

// Pairs of bf16 products summed into each fp32 lane; products of bf16 values are exact in fp32.
INLINE __m512 multiply_add(__m512 acc, vec_t w, vec_t x) { return _mm512_dpbf16_ps(acc, w, x); }

INLINE float to_f32(elem_t value) {
    uint32_t bits = (uint32_t)value << 16;
    float result;
    memcpy(&result, &bits, sizeof(result));
    return result;
}

// Round to nearest even, as torch does when it narrows fp32 to bf16. No NaN special case:
// every NaN here comes from bf16 operands or is the default NaN, so its payload lies in the top
// 16 bits and the rounding increment cannot carry it into an infinity.
INLINE elem_t from_f32(float value) {
    uint32_t bits;
    memcpy(&bits, &value, sizeof(bits));
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (elem_t)(bits >> 16);
}

#elif defined(TANDEM_F32)

typedef float elem_t;
typedef __m512 vec_t;
typedef __mmask16 lane_mask_t;
#define LANES 16

INLINE vec_t load_full(const elem_t *p) { return _mm512_loadu_ps(p); }
INLINE vec_t load_lanes(lane_mask_t mask, const elem_t *p) {
    return _mm512_maskz_loadu_ps(mask, p);
}
INLINE __m512 multiply_add(__m512 acc, vec_t w, vec_t x) { return _mm512_fmadd_ps(w, x, acc); }
INLINE float to_f32(elem_t value) { return value; }
INLINE elem_t from_f32(float value) { return value; }

#else
#error "define TANDEM_BF16 or TANDEM_F32"
#endif

// The last block of a matrix may have fewer valid rows than the block size; its missing rows
// repeat the last valid one, so every block runs the same code and a repeated row just writes
// the same value twice.
INLINE int64_t clamp_row(int r, int valid) { return r < valid ? r : valid - 1; }

// The end of a block, shared by every M (kept out of line: it runs once per block, and one copy
// instead of sixteen keeps compile time down): the partial last chunk of K with masked loads
// (masked-off lanes are zeros, adding exact zeros), the horizontal sum, the bias, the store.
static void finish_block(const __m512 *partial, const elem_t *const *row, const elem_t *x,
                         const elem_t *bias, elem_t *out, int64_t k, int64_t kk, int64_t ldx,
                         int64_t ldo, int m, int rows, int valid) {
    const lane_mask_t tail = (lane_mask_t)((1ull << (k - kk)) - 1);
    for (int r = 0; r < rows; r++) {
        const int64_t n = clamp_row(r, valid);
        const float b = bias ? to_f32(bias[n]) : 0.0f;
        for (int i = 0; i < m; i++) {
            __m512 acc = partial[r * MAX_M + i];
            if (kk < k) {
                const vec_t wv = load_lanes(tail, row[r] + kk);
                acc = multiply_add(acc, wv, load_lanes(tail, x + i * ldx + kk));
            }
            out[i * ldo + n] = from_f32(_mm512_reduce_add_ps(acc) + b);
        }
    }
}

// One block: `rows` weight rows (a compile-time count) times `m` input rows.
INLINE void dot_block(const elem_t *restrict w, const elem_t *restrict x, const elem_t *bias,
                      elem_t *restrict out, int64_t k, int64_t ldx, int64_t ldo, const int m,
                      const int rows, int valid) {
    const elem_t *row[MAX_ROWS];
    __m512 acc[MAX_ROWS][MAX_M];
#pragma GCC unroll 4
    for (int r = 0; r < rows; r++) {
        row[r] = w + clamp_row(r, valid) * k;
#pragma GCC unroll 16
        for (int i = 0; i < m; i++) acc[r][i] = _mm512_setzero_ps();
    }
    int64_t kk = 0;
    for (; kk + LANES <= k; kk += LANES) {
        vec_t wv[MAX_ROWS];
#pragma GCC unroll 4
        for (int r = 0; r < rows; r++) {
            // The same position one block ahead: the hardware prefetcher alone keeps too few
            // DRAM requests in flight when several short rows are streamed side by side.
            _mm_prefetch((const char *)(row[r] + rows * k + kk), _MM_HINT_T0);
            wv[r] = load_full(row[r] + kk);
        }
#pragma GCC unroll 16
        for (int i = 0; i < m; i++) {
            const vec_t xv = load_full(x + i * ldx + kk);
#pragma GCC unroll 4
            for (int r = 0; r < rows; r++) acc[r][i] = multiply_add(acc[r][i], wv[r], xv);
        }
    }
    finish_block(&acc[0][0], row, x, bias, out, k, kk, ldx, ldo, m, rows, valid);
}

// One function per M so the loops above unroll fully and the accumulators live in registers.
// Rows per block shrink as M grows to keep M * rows accumulators within the 32 zmm registers.
#define ROWS_FOR(M) ((M) <= 4 ? 4 : (M) <= 8 ? 2 : 1)

typedef void (*block_fn)(const elem_t *, const elem_t *, const elem_t *, elem_t *, int64_t,
                         int64_t, int64_t, int);

#define DEFINE_BLOCK(M)                                                                         \
    static void block_##M(const elem_t *w, const elem_t *x, const elem_t *bias, elem_t *out,    \
                          int64_t k, int64_t ldx, int64_t ldo, int valid) {                     \
        dot_block(w, x, bias, out, k, ldx, ldo, M, ROWS_FOR(M), valid);                         \
    }

DEFINE_BLOCK(1)
DEFINE_BLOCK(2)
DEFINE_BLOCK(3)
DEFINE_BLOCK(4)
DEFINE_BLOCK(5)
DEFINE_BLOCK(6)
DEFINE_BLOCK(7)
DEFINE_BLOCK(8)
DEFINE_BLOCK(9)
DEFINE_BLOCK(10)
DEFINE_BLOCK(11)
DEFINE_BLOCK(12)
DEFINE_BLOCK(13)
DEFINE_BLOCK(14)
DEFINE_BLOCK(15)
DEFINE_BLOCK(16)

static const block_fn BLOCKS[MAX_M + 1] = {
    0,        block_1,  block_2,  block_3,  block_4,  block_5,  block_6,  block_7, block_8,
    block_9,  block_10, block_11, block_12, block_13, block_14, block_15, block_16,
};

EXPORT int tandem_linear_max_m(void) { return MAX_M; }

typedef struct {
    const elem_t *x, *w, *bias;
    elem_t *out;
    int64_t ldx, n, k;
    block_fn block;
    int64_t rows;  // per block
} job_t;

static void run_block(const job_t *job, int64_t b) {
    const int64_t n0 = b * job->rows;
    const int valid = (int)(job->n - n0 < job->rows ? job->n - n0 : job->rows);
    job->block(job->w + n0 * job->k, job->x, job->bias ? job->bias + n0 : NULL, job->out + n0,
               job->k, job->ldx, job->n, valid);
}

// x: [m, k] with row stride ldx (elements); w: [n, k] contiguous; bias: [n] or NULL;
// out: [m, n] contiguous. The caller guarantees 1 <= m <= MAX_M and n, k >= 1.
EXPORT void tandem_linear(const elem_t *x, int64_t ldx, const elem_t *w, const elem_t *bias,
                          elem_t *out, int64_t m, int64_t n, int64_t k, int threads) {
    const job_t job = {x, w, bias, out, ldx, n, k, BLOCKS[m], ROWS_FOR(m)};
    const int64_t blocks = (n + job.rows - 1) / job.rows;
    if (threads <= 1 || n * k * (int64_t)sizeof(elem_t) < PARALLEL_MIN_BYTES) {
        // Not even an OpenMP call: small matrices are most calls in a small model's forward.
        for (int64_t b = 0; b < blocks; b++) run_block(&job, b);
        return;
    }
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t b = 0; b < blocks; b++) run_block(&job, b);
}
