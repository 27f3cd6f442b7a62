// Decode-time GEMV/GEMM on the CPU: out[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]) for M <= 16.
//
// Built once per element type and instruction set as a CPython extension module: -DTANDEM_BF16
// or -DTANDEM_F32 picks the type, and the compiler's flags the set: AVX-512 (with AVX512-BF16
// for bf16, and AMX where the flags allow it) gives cpu_linear_bf16 / cpu_linear_f32, AVX2 with
// FMA gives cpu_linear_bf16_avx2 / cpu_linear_f32_avx2. A METH_FASTCALL entry point costs a
// fraction of a microsecond per call where ctypes costs several, and a decoding step makes ~170
// of these calls.
//
// Decoding is memory bound, so the goal is to stream every weight byte from DRAM exactly once
// per call and dot it with all M input rows while it is in registers. Three kernels:
// - the vector kernel (`linear`, both types), in blocks of weight rows, one vector accumulator
//   per (weight row, input row) pair:
//   - AVX-512: _mm512_dpbf16_ps for bf16 and FMA for fp32. Its arithmetic grows with M and
//     caps it at about 8 GB/s per core at M = 8 and 4 GB/s at M = 16 on a Zen 4.
//   - AVX2: FMA in fp32, bf16 weights widened by a shift and a mask (no bf16 products before
//     AVX512-BF16), bf16 inputs widened once per call. Two FMA units of 8 lanes bound it at
//     16 products a cycle per core: about 6 GB/s of bf16 weights per core at M = 16.
// - AMX (`linear_amx`, bf16 only, Sapphire Rapids and later): tiles of 16 weight rows x 32 k,
//   read straight from the row-major weight, times x packed into bf16 pairs; the tile unit
//   has compute to spare, so M = 16 streams as fast as M = 1.
//
// Batch invariance, in every kernel: every output element is produced by the same sequence of
// operations whatever M is and whichever thread computes it, so row r of a batch equals that
// row computed alone, bit for bit. Nothing may depend on M other than how many input rows share
// a weight load; a kernel never mixes in another kernel's arithmetic for some M only.

#define PY_SSIZE_T_CLEAN
#include <Python.h>  // first, as Python requires

#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#if !defined(__AVX512F__) && !(defined(__AVX2__) && defined(__FMA__))
#error "build with AVX-512 (-mavx512f -mavx512bw -mavx512vl) or with AVX2 and FMA"
#endif

#define MAX_M 16
#define MAX_BLOCK_ROWS 4
// The segmented multi-LoRA's most chunks of LANES columns per row (wider ranges: the dense form).
#define MAX_CHUNKS (256 / 16 + 1)
// and how many rows of B ahead its expand prefetches (32 measured best of 16-256 on a Zen 4,
// with B read block by block; 128 when each row walked all of B).
#define EXPAND_AHEAD 32
#define INLINE static inline __attribute__((always_inline))

// Below this many weight bytes, waking the second thread costs more than it saves.
#define PARALLEL_MIN_BYTES (256 * 1024)
#ifndef TEAM_MIN_BYTES  // the same within a running team, where sharing costs no wake-up
#define TEAM_MIN_BYTES (16 * 1024)
#endif

#if defined(TANDEM_BF16)
typedef uint16_t elem_t;
#define TYPE_NAME "bf16"

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
#define TYPE_NAME "f32"
INLINE float to_f32(elem_t value) { return value; }
INLINE elem_t from_f32(float value) { return value; }
#else
#error "define TANDEM_BF16 or TANDEM_F32"
#endif

#if defined(__AVX512F__)
#define VECTOR_ISA "avx512"
#define MODULE_NAME "cpu_linear_" TYPE_NAME
#else
#define VECTOR_ISA "avx2"
#define MODULE_NAME "cpu_linear_" TYPE_NAME "_avx2"
#endif
#define PASTE_INIT(suffix) PyInit_cpu_linear_##suffix
#if defined(__AVX512F__) && defined(TANDEM_BF16)
#define MODULE_INIT PASTE_INIT(bf16)
#elif defined(__AVX512F__)
#define MODULE_INIT PASTE_INIT(f32)
#elif defined(TANDEM_BF16)
#define MODULE_INIT PASTE_INIT(bf16_avx2)
#else
#define MODULE_INIT PASTE_INIT(f32_avx2)
#endif

// The last block of a matrix may have fewer valid rows than the block size; its missing rows
// repeat the last valid one, so every block runs the same code and a repeated row just writes
// the same value twice.
INLINE int64_t clamp_row(int r, int valid) { return r < valid ? r : valid - 1; }

// Software prefetches go into L1, which measured best on a Xeon, or with -DPREFETCH_L2 into L2:
// kernels/cpu_linear.py sets it on AMD CPUs. On a Zen 4 EPYC (2 threads, interleaved A/B over a
// decode step's 96 projections) M = 4 and 8 took 24 and 31 ms instead of 35 and 43 (prefetches
// into L1 stall on its few miss buffers), in session 13; by session 28 the VM ran them faster
// from L1, farther ahead: the AVX-512 blocks prefetch so at M >= 4 (dot_block).
#ifdef PREFETCH_L2
#define PREFETCH_HINT _MM_HINT_T1
#else
#define PREFETCH_HINT _MM_HINT_T0
#endif

// M = 1's prefetches (AVX-512): non-temporal on AMD (see dot_block).
#ifdef PREFETCH_L2
#define PREFETCH_HINT_M1 _MM_HINT_NTA
#else
#define PREFETCH_HINT_M1 _MM_HINT_T0
#endif

// How far ahead the AVX-512 blocks prefetch at M >= 4: the whole blocks nearest this many bytes
// (at least one). On the Xeon one block.
#ifdef PREFETCH_L2
#define PREFETCH_AHEAD_BYTES (10 * 1024)
#else
#define PREFETCH_AHEAD_BYTES 0
#endif

#if defined(__AVX512F__)
// ---------------------------------------------------------------------------------------------
// AVX-512 vector kernel. Per (weight row, input row) pair: one fp32 vector accumulator walking
// K in ascending chunks, the final partial chunk masked, one fixed horizontal sum, then the bias.

#if defined(TANDEM_BF16)
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

// Sixteen elements widened to fp32 (masked-off lanes 0); sixteen fp32 values rounded as from_f32
// rounds them, kept in fp32 or stored.
INLINE __m512 load16(__mmask16 mask, const elem_t *p) {
    const __m512i bits = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(bits, 16));
}
INLINE __m512i rounding_bits16(__m512 value) {  // the bf16 result in the top 16 bits
    const __m512i bits = _mm512_castps_si512(value);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    return _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff)));
}
INLINE __m512 round16(__m512 value) {
    return _mm512_castsi512_ps(
        _mm512_and_si512(rounding_bits16(value), _mm512_set1_epi32((int)0xffff0000u)));
}
INLINE void store16(__mmask16 mask, elem_t *p, __m512 value) {
    const __m512i halves = _mm512_srli_epi32(rounding_bits16(value), 16);
    _mm256_mask_storeu_epi16(p, mask, _mm512_cvtepi32_epi16(halves));
}
#else
typedef __m512 vec_t;
typedef __mmask16 lane_mask_t;
#define LANES 16

INLINE vec_t load_full(const elem_t *p) { return _mm512_loadu_ps(p); }
INLINE vec_t load_lanes(lane_mask_t mask, const elem_t *p) {
    return _mm512_maskz_loadu_ps(mask, p);
}
INLINE __m512 multiply_add(__m512 acc, vec_t w, vec_t x) { return _mm512_fmadd_ps(w, x, acc); }
#endif

// The inputs as the blocks read them: x itself.
typedef elem_t input_t;

// The end of a block that dot_block does not finish inline (a partial last chunk of K, a last
// block with repeated rows, one row at M = 1), shared by every M (out of line: one copy instead
// of sixteen keeps compile time down; the inline finish is its arithmetic for whole blocks,
// which dot_block's comment measures): the partial last chunk of K with masked loads
// (masked-off lanes are zeros, adding exact zeros), the horizontal sum, the bias, the store
// (of the valid rows only: a repeated row must not be added twice). `accumulate` adds the
// rounded result to what `out` holds and rounds again, as out.add_(linear(...)) would.
static void finish_block(const __m512 *partial, const elem_t *const *row, const elem_t *x,
                         const elem_t *bias, elem_t *out, int64_t k, int64_t kk, int64_t ldx,
                         int64_t ldo, int m, int valid, int accumulate) {
    const lane_mask_t tail = (lane_mask_t)((1ull << (k - kk)) - 1);
    for (int r = 0; r < valid; r++) {
        const float b = bias ? to_f32(bias[r]) : 0.0f;
        for (int i = 0; i < m; i++) {
            __m512 acc = partial[r * MAX_M + i];
            if (kk < k) {
                const vec_t wv = load_lanes(tail, row[r] + kk);
                acc = multiply_add(acc, wv, load_lanes(tail, x + i * ldx + kk));
            }
            elem_t *target = out + i * ldo + r;
            const elem_t value = from_f32(_mm512_reduce_add_ps(acc) + b);
            *target = accumulate ? from_f32(to_f32(*target) + to_f32(value)) : value;
        }
    }
}

// One block: `rows` weight rows (a compile-time count) times `m` input rows.
INLINE void dot_block(const elem_t *restrict w, const elem_t *restrict x, const elem_t *bias,
                      elem_t *restrict out, int64_t k, int64_t ldx, int64_t ldo, const int m,
                      const int rows, int valid, int accumulate) {
    const elem_t *row[MAX_BLOCK_ROWS];
    __m512 acc[MAX_BLOCK_ROWS][MAX_M];
#pragma GCC unroll 4
    for (int r = 0; r < rows; r++) {
        row[r] = w + clamp_row(r, valid) * k;
#pragma GCC unroll 16
        for (int i = 0; i < m; i++) acc[r][i] = _mm512_setzero_ps();
    }
    // The same position of the rows a few blocks ahead is prefetched: the hardware prefetcher
    // alone keeps too few DRAM requests in flight when several short rows are streamed side by
    // side (one row at a time is one sequential stream, which it follows unaided). At M = 2
    // and 3 one block ahead into PREFETCH_HINT's level, otherwise into L1, at M >= 4 the whole
    // blocks nearest PREFETCH_AHEAD_BYTES ahead. On the Zen 4 EPYC (session 28, 96 projections
    // of a decode step, interleaved) that took M = 8 0.90 of the time of one block ahead into
    // L2 where the VM read 75-80 GB/s and 1.00-1.03 where it read 46-48 (and computed about
    // half as fast), M = 4 0.88-0.94 and 1.00-1.02, M = 2 0.97-0.99 but 1.03-1.04: kept in L2.
    // M = 1's two rows had gone into L1 already (0.94-0.95 of their time into L2); as
    // non-temporal prefetches (PREFETCH_HINT_M1) the whole decode step took 0.98-0.995 of its
    // time in the slow state, 0.99-1.00 (median 0.993) in the fast one.
    const int into_l2 = m == 2 || m == 3;
    const int64_t block_bytes = rows * k * (int64_t)sizeof(elem_t);
    const int64_t blocks_ahead =
        m < 4 || block_bytes * 3 / 2 >= PREFETCH_AHEAD_BYTES
            ? 1
            : (PREFETCH_AHEAD_BYTES + block_bytes / 2) / block_bytes;
    const int64_t ahead = blocks_ahead * rows * k;  // elements
    int64_t kk = 0;
    for (; kk + LANES <= k; kk += LANES) {
        vec_t wv[MAX_BLOCK_ROWS];
#pragma GCC unroll 4
        for (int r = 0; r < rows; r++) {
            if (rows > 1) {
                const char *target = (const char *)(row[r] + ahead + kk);
                if (into_l2) {
                    _mm_prefetch(target, PREFETCH_HINT);
                } else if (m == 1) {
                    _mm_prefetch(target, PREFETCH_HINT_M1);
                } else {
                    _mm_prefetch(target, _MM_HINT_T0);
                }
            }
            wv[r] = load_full(row[r] + kk);
        }
#pragma GCC unroll 16
        for (int i = 0; i < m; i++) {
            const vec_t xv = load_full(x + i * ldx + kk);
#pragma GCC unroll 4
            for (int r = 0; r < rows; r++) acc[r][i] = multiply_add(acc[r][i], wv[r], xv);
        }
    }
    if (kk == k && valid == rows && (rows > 1 || m > 1)) {
        // finish_block's arithmetic inline for whole blocks: where M = 1 takes two rows 0.95 of
        // the call's time over a decode step's 96 projections on the Zen 4 EPYC (0.89 on one
        // thread), M = 2 0.96, M = 4 and 8 1.00; one row a block at M = 1 measured 1.04, so it
        // keeps the call.
#pragma GCC unroll 4
        for (int r = 0; r < rows; r++) {
            const float b = bias ? to_f32(bias[r]) : 0.0f;
#pragma GCC unroll 16
            for (int i = 0; i < m; i++) {
                elem_t *target = out + i * ldo + r;
                const elem_t value = from_f32(_mm512_reduce_add_ps(acc[r][i]) + b);
                *target = accumulate ? from_f32(to_f32(*target) + to_f32(value)) : value;
            }
        }
        return;
    }
    finish_block(&acc[0][0], row, x, bias, out, k, kk, ldx, ldo, m, valid, accumulate);
}

// M = 1 takes one row at a time on Xeons: the weight is then read in address order, one
// stream, and out-of-order execution overlaps the rows' independent chains. On AMD CPUs
// (PREFETCH_L2) it takes two: a row's products are one chain of VDPBF16PS (of FMAs in fp32), and
// on a Zen 4 EPYC out-of-order execution overlapped too little of consecutive rows' chains. There
// (`bench/ab_kernel_flags.py`, interleaved, 2 threads) two rows took 0.89 of one row's time over
// a decode step's 96 projections in bf16 (qkv's 1152 x 896 0.60, gate_up's 9728 x 896 0.78,
// down's 896 x 4864 0.97: its long rows hid the latency already), 0.80 in fp32 (with the L1
// prefetch and the inline finish below); three rows 1.04 of two, four 1.09, prefetching two or
// four blocks ahead instead of one 0.96-1.02 (by the VM's bandwidth spell). Against one row
// with its stream prefetched 512 bytes ahead into L2 (session 26's kernel), the three changes
// together took 0.61 of the time where the VM read 78 GB/s, 0.79 where it read 48. An output
// element's arithmetic is the same either way.
// Larger M multiply each weight vector loaded into rows * M accumulators: about 20-24 of the 32
// zmm registers, so the loop does fewer loads per VDPBF16PS. M > 8 runs its input rows in two
// groups over the same weight rows (the second reads them from cache). On the EPYC (96
// projections of a decode step, `bench/ab_kernel_flags.py`) three rows at M = 8 took 26-29 ms
// against 32-33 with two, four at M = 5 and 6 24-26 against 30.
#define GROUPS_FOR(M) ((M) > 8 ? 2 : 1)
#ifdef PREFETCH_L2
#define ROWS_M1 2
#else
#define ROWS_M1 1
#endif
#define ROWS_FOR(M) ((M) == 1 ? ROWS_M1 : ((M) + GROUPS_FOR(M) - 1) / GROUPS_FOR(M) <= 6 ? 4 : 3)

// x as the blocks read it: x itself.
INLINE const input_t *prepare_input(const elem_t *x, int64_t ldx, int64_t m, int64_t k,
                                    int64_t *ld_input) {
    (void)m;
    (void)k;
    *ld_input = ldx;
    return x;
}

#else
// ---------------------------------------------------------------------------------------------
// AVX2 vector kernel. Per (weight row, input row) pair: one fp32 vector accumulator of 8 lanes
// walking K in ascending chunks of CHUNK elements, each chunk one FMA per 8 elements in a fixed
// order, the final partial chunk zero-padded, one fixed horizontal sum, then the bias.

typedef float input_t;

#if defined(TANDEM_BF16)
// A chunk is 16 bf16 (one 256-bit load, 8 pairs): its even elements widened by a shift, its odd
// ones by a mask, each one FMA against the input's matching 8 values. The inputs are widened
// once per call into that order (per chunk: its 8 even elements, then its 8 odd ones), so an
// input row is read as plain fp32 vectors.
#define CHUNK 16
#define PARTS 2
INLINE void widen_pairs(__m256i pairs, __m256 *part) {
    part[0] = _mm256_castsi256_ps(_mm256_slli_epi32(pairs, 16));
    part[1] = _mm256_castsi256_ps(_mm256_and_si256(pairs, _mm256_set1_epi32((int)0xffff0000u)));
}
INLINE void load_parts(const elem_t *p, __m256 *part) {
    widen_pairs(_mm256_loadu_si256((const __m256i *)p), part);
}
// The last `count` (< CHUNK) elements, zero-padded.
static void load_tail_parts(const elem_t *p, int64_t count, __m256 *part) {
    elem_t padded[CHUNK] = {0};
    memcpy(padded, p, (size_t)count * sizeof(elem_t));
    load_parts(padded, part);
}
#else
#define CHUNK 8
#define PARTS 1
INLINE void load_parts(const elem_t *p, __m256 *part) { part[0] = _mm256_loadu_ps(p); }
INLINE __m256i first_lanes(int64_t count) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)count),
                              _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
static void load_tail_parts(const elem_t *p, int64_t count, __m256 *part) {
    part[0] = _mm256_maskload_ps(p, first_lanes(count));
}
#endif

// The input row's values of the chunk at kk that part p multiplies; `tail`: the partial last
// chunk (fp32 inputs are then read masked; widened bf16 inputs are zero-padded already).
INLINE __m256 input_part(const input_t *x, int64_t kk, int p, int64_t k, int tail) {
#if defined(TANDEM_F32)
    if (tail) return _mm256_maskload_ps(x + kk, first_lanes(k - kk));
#else
    (void)k;
    (void)tail;
#endif
    return _mm256_loadu_ps(x + kk + 8 * p);
}

INLINE float sum8(__m256 v) {  // one fixed order
    const __m128 half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 quarter = _mm_add_ps(half, _mm_movehl_ps(half, half));
    return _mm_cvtss_f32(_mm_add_ss(quarter, _mm_movehdup_ps(quarter)));
}

// The end of a block (out of line, as in the AVX-512 kernel): the partial last chunk, the
// horizontal sum, the bias, the store of the valid rows.
static void finish_block(const __m256 *partial, const elem_t *const *row, const input_t *x,
                         const elem_t *bias, elem_t *out, int64_t k, int64_t kk, int64_t ldx,
                         int64_t ldo, int m, int valid, int accumulate) {
    for (int r = 0; r < valid; r++) {
        const float b = bias ? to_f32(bias[r]) : 0.0f;
        __m256 part[PARTS];
        if (kk < k) load_tail_parts(row[r] + kk, k - kk, part);
        for (int i = 0; i < m; i++) {
            __m256 acc = partial[r * MAX_M + i];
            if (kk < k) {
                for (int p = 0; p < PARTS; p++) {
                    acc = _mm256_fmadd_ps(part[p], input_part(x + i * ldx, kk, p, k, 1), acc);
                }
            }
            elem_t *target = out + i * ldo + r;
            const elem_t value = from_f32(sum8(acc) + b);
            *target = accumulate ? from_f32(to_f32(*target) + to_f32(value)) : value;
        }
    }
}

// One block: `rows` weight rows (a compile-time count) times `m` input rows.
INLINE void dot_block(const elem_t *restrict w, const input_t *restrict x, const elem_t *bias,
                      elem_t *restrict out, int64_t k, int64_t ldx, int64_t ldo, const int m,
                      const int rows, int valid, int accumulate) {
    const elem_t *row[MAX_BLOCK_ROWS];
    __m256 acc[MAX_BLOCK_ROWS][MAX_M];
#pragma GCC unroll 4
    for (int r = 0; r < rows; r++) {
        row[r] = w + clamp_row(r, valid) * k;
#pragma GCC unroll 16
        for (int i = 0; i < m; i++) acc[r][i] = _mm256_setzero_ps();
    }
    int64_t kk = 0;
    for (; kk + CHUNK <= k; kk += CHUNK) {
#pragma GCC unroll 4
        for (int r = 0; r < rows; r++) {
            if (rows > 1) {  // as in the AVX-512 kernel: the same position one block ahead
                _mm_prefetch((const char *)(row[r] + rows * k + kk), PREFETCH_HINT);
            }
            __m256 part[PARTS];
            load_parts(row[r] + kk, part);
#pragma GCC unroll 16
            for (int i = 0; i < m; i++) {
#pragma GCC unroll 2
                for (int p = 0; p < PARTS; p++) {
                    acc[r][i] =
                        _mm256_fmadd_ps(part[p], input_part(x + i * ldx, kk, p, k, 0), acc[r][i]);
                }
            }
        }
    }
    finish_block(&acc[0][0], row, x, bias, out, k, kk, ldx, ldo, m, valid, accumulate);
}

// Accumulators (rows * group) fill 8-12 of the 16 ymm registers: at least 8 independent chains
// keep both FMA units busy through their latency, and each input vector loaded serves three or
// four weight rows. M > 4 runs its input rows in groups of at most 4 over the same weight rows
// (the later groups read them from cache).
#define GROUPS_FOR(M) (((M) + 3) / 4)
#define ROWS_FOR(M) (((M) + GROUPS_FOR(M) - 1) / GROUPS_FOR(M) <= 3 ? 4 : 3)

#if defined(TANDEM_BF16)
// The inputs widened to fp32 in the kernel's order: one buffer per calling thread, grown as
// needed and kept (as the AMX kernel's packed inputs are).
static __thread float *widened_cache;
static __thread int64_t widened_capacity;

// x [m, k] as the blocks read it: per row, each chunk's even elements then its odd ones, in fp32,
// the partial last chunk zero-padded; its row stride in *ld_input. NULL when no buffer.
static const input_t *prepare_input(const elem_t *x, int64_t ldx, int64_t m, int64_t k,
                                    int64_t *ld_input) {
    const int64_t padded = (k + CHUNK - 1) / CHUNK * CHUNK;
    if (m * padded > widened_capacity) {
        free(widened_cache);
        widened_cache = aligned_alloc(64, (size_t)(m * padded * 4 + 63) / 64 * 64);
        widened_capacity = widened_cache ? m * padded : 0;
        if (widened_cache == NULL) return NULL;
    }
    for (int64_t i = 0; i < m; i++) {
        const elem_t *source = x + i * ldx;
        float *target = widened_cache + i * padded;
        __m256 part[PARTS];
        int64_t kk = 0;
        for (; kk + CHUNK <= k; kk += CHUNK) {
            load_parts(source + kk, part);
            _mm256_storeu_ps(target + kk, part[0]);
            _mm256_storeu_ps(target + kk + 8, part[1]);
        }
        if (kk < k) {
            load_tail_parts(source + kk, k - kk, part);
            _mm256_storeu_ps(target + kk, part[0]);
            _mm256_storeu_ps(target + kk + 8, part[1]);
        }
    }
    *ld_input = padded;
    return widened_cache;
}
#else
INLINE const input_t *prepare_input(const elem_t *x, int64_t ldx, int64_t m, int64_t k,
                                    int64_t *ld_input) {
    (void)m;
    (void)k;
    *ld_input = ldx;
    return x;
}
#endif
#endif

// One function per M so the loops above unroll fully and the accumulators live in registers.
typedef void (*block_fn)(const elem_t *, const input_t *, const elem_t *, elem_t *, int64_t,
                         int64_t, int64_t, int, int);

// Groups of near-equal size: the first M % groups take one row more.
#define DEFINE_BLOCK(M)                                                                         \
    static void block_##M(const elem_t *w, const input_t *x, const elem_t *bias, elem_t *out,   \
                          int64_t k, int64_t ldx, int64_t ldo, int valid, int accumulate) {     \
        const int groups = GROUPS_FOR(M), base = (M) / groups, larger = (M) % groups;           \
        int first = 0;                                                                          \
        for (int g = 0; g < larger; g++, first += base + 1) {                                   \
            dot_block(w, x + first * ldx, bias, out + first * ldo, k, ldx, ldo, base + 1,       \
                      ROWS_FOR(M), valid, accumulate);                                          \
        }                                                                                       \
        for (int g = larger; g < groups; g++, first += base) {                                  \
            dot_block(w, x + first * ldx, bias, out + first * ldo, k, ldx, ldo, base,           \
                      ROWS_FOR(M), valid, accumulate);                                          \
        }                                                                                       \
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

// bf16, M = 8 and 16: groups of four input rows over blocks of ROWS_FOR(4) weight rows where a
// weight row is a multiple of 4 KB (K = 2048, 4096, 14336): the rows of a block and of x then
// fall into the same L1 sets, and eight input rows plus the block's weight rows outnumber the
// sets' ways. On a Zen 4 (two threads, the two forms alternating) M = 8 took 0.72-0.82 of the
// time at K = 2048 and 0.88-0.96 at K = 4096, 8192, 14336, M = 16 0.84 at K = 2048 and 0.95-1.02
// above; at other K it was no faster, and slower at some (1.02-1.09 at K = 1024, 4864, 8960); in
// fp32 slower at 4 KB rows too (1.08 at K = 2048, 1.18 at 4096); and at M = 12 (groups of six
// before) 1.02-1.14. The same arithmetic per output element either way.
#if defined(__AVX512F__) && defined(TANDEM_BF16)
#define DEFINE_BLOCK_BY_4(M)                                                                     \
    static void block_##M##_by_4(const elem_t *w, const input_t *x, const elem_t *bias,          \
                                 elem_t *out, int64_t k, int64_t ldx, int64_t ldo, int valid,     \
                                 int accumulate) {                                               \
        for (int first = 0; first < (M); first += 4) {                                           \
            dot_block(w, x + first * ldx, bias, out + first * ldo, k, ldx, ldo, 4, ROWS_FOR(4),  \
                      valid, accumulate);                                                        \
        }                                                                                        \
    }
DEFINE_BLOCK_BY_4(8)
DEFINE_BLOCK_BY_4(16)
#endif

// M = 1 over short rows on AMD CPUs: four weight rows a block instead of two, four chains of
// at most SHORT_ROW_VECTORS products to overlap. On the Zen 4 EPYC (session 29, interleaved, 2
// threads, weights in huge pages) a small fusion model's projections (hidden 512: K = 512 and
// 2048) and LM head took 0.87 of their time, 4096 x 512 alone 0.81, 32768 x 512 0.87, K = 640
// 0.96; at K = 768 and 896 four rows took 1.06, at K = 2048 1.02 (three rows: 0.91 on the small
// model, 1.05 on the large one). The same arithmetic per output element either way.
#if defined(__AVX512F__) && defined(PREFETCH_L2)
#define SHORT_ROW_VECTORS 20
static void block_1_short(const elem_t *w, const input_t *x, const elem_t *bias, elem_t *out,
                          int64_t k, int64_t ldx, int64_t ldo, int valid, int accumulate) {
    dot_block(w, x, bias, out, k, ldx, ldo, 1, 4, valid, accumulate);
}
#endif

// The block function and the weight rows per block for m input rows of length k.
INLINE block_fn block_for(int64_t m, int64_t k, int64_t *rows) {
#if defined(__AVX512F__) && defined(PREFETCH_L2)
    if (m == 1 && k <= SHORT_ROW_VECTORS * LANES) {
        *rows = 4;
        return block_1_short;
    }
#endif
#if defined(__AVX512F__) && defined(TANDEM_BF16)
    if ((m == 8 || m == 16) && k * (int64_t)sizeof(elem_t) % 4096 == 0) {
        *rows = ROWS_FOR(4);
        return m == 8 ? block_8_by_4 : block_16_by_4;
    }
#else
    (void)k;
#endif
    *rows = ROWS_FOR(m);
    return BLOCKS[m];
}

typedef struct {
    const input_t *x;
    const elem_t *w, *bias;
    elem_t *out;
    int64_t ldx, ldo, n, k;
    block_fn block;
    int64_t rows;  // per block
    int accumulate;
} job_t;

static void run_block(const job_t *job, int64_t b) {
    const int64_t n0 = b * job->rows;
    const int valid = (int)(job->n - n0 < job->rows ? job->n - n0 : job->rows);
    job->block(job->w + n0 * job->k, job->x, job->bias ? job->bias + n0 : NULL, job->out + n0,
               job->k, job->ldx, job->ldo, valid, job->accumulate);
}

// x: [m, k] with row stride ldx (elements); w: [n, k] contiguous; bias: [n] or NULL;
// out: [m, n] with row stride ldo; 1 <= m <= MAX_M. `accumulate`: out += the result.
// Returns 0, or -1 when a buffer cannot be allocated.
static int linear_vector(const elem_t *x, int64_t ldx, const elem_t *w, const elem_t *bias,
                         elem_t *out, int64_t ldo, int64_t m, int64_t n, int64_t k,
                         int accumulate, int threads) {
    int64_t ld_input;
    const input_t *input = prepare_input(x, ldx, m, k, &ld_input);
    if (input == NULL) return -1;
    int64_t rows;
    const block_fn block = block_for(m, k, &rows);
    const job_t job = {input, w, bias, out, ld_input, ldo, n, k, block, rows, accumulate};
    const int64_t blocks = (n + job.rows - 1) / job.rows;
    if (threads <= 1 || n * k * (int64_t)sizeof(elem_t) < PARALLEL_MIN_BYTES) {
        // Not even an OpenMP call: small matrices are most calls in a small model's forward.
        for (int64_t b = 0; b < blocks; b++) run_block(&job, b);
        return 0;
    }
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t b = 0; b < blocks; b++) run_block(&job, b);
    return 0;
}

// The share of linear_vector's blocks that thread `thread` of a running team of `team` takes
// (all of them on thread 0 where linear_vector would not wake a second thread). A block is
// computed the same way whichever thread takes it, so the same bits. Returns 0, or -1 when a
// buffer cannot be allocated.
static int vector_part(const elem_t *x, int64_t ldx, const elem_t *w, const elem_t *bias,
                       elem_t *out, int64_t ldo, int64_t m, int64_t n, int64_t k, int accumulate,
                       int64_t thread, int64_t team) {
    if (team > 1 && n * k * (int64_t)sizeof(elem_t) < TEAM_MIN_BYTES) {
        if (thread != 0) return 0;
        team = 1;
    }
    int64_t rows;
    const block_fn block = block_for(m, k, &rows);
    const int64_t blocks = (n + rows - 1) / rows;
    const int64_t begin = blocks * thread / team, end = blocks * (thread + 1) / team;
    if (begin >= end) return 0;
    int64_t ld_input;
    const input_t *input = prepare_input(x, ldx, m, k, &ld_input);
    if (input == NULL) return -1;
    const job_t job = {input, w, bias, out, ld_input, ldo, n, k, block, rows, accumulate};
    for (int64_t b = begin; b < end; b++) run_block(&job, b);
    return 0;
}


#if defined(TANDEM_BF16) && defined(__AMX_TILE__)
// ---------------------------------------------------------------------------------------------
// AMX kernel. Per output element: one fp32 lane of a tile accumulator, updated by one tile dot
// product per 32-wide chunk of K in ascending order (the partial last chunk zero-padded), then
// the bias. Tiles: C (16 weight rows x m fp32), A (16 weight rows x 32 bf16, loaded from the
// weight with its row stride), B (16 bf16 pairs x m, from x packed so each row holds one pair
// of k for every input row).

#define TILE_ROWS 16
#define TILE_K 32
#ifndef AMX_PREFETCH_BYTES
#define AMX_PREFETCH_BYTES (8 * 1024)
#endif
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

// Tile registers (literal numbers below: the tile intrinsics paste them into the assembly):
// tmm0 is C, tmm1 is A, tmm2 is B.

// GCC's tile loads and stores are asm statements that do not declare their memory accesses, so
// the compiler could drop or reorder plain stores to a buffer a tile then reads (or reads that
// follow a tile store). This barrier orders memory around them.
#define MEMORY_BARRIER() __asm__ volatile("" ::: "memory")

typedef struct __attribute__((packed)) {
    uint8_t palette;
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t bytes_per_row[16];
    uint8_t rows[16];
} tile_config_t;

// Linux hands out the large AMX register state only to processes that ask for it.
static int enable_amx(void) {
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
}

// Tile shapes depend on m only through the number of columns, which every element ignores.
static void configure_tiles(int m) {
    tile_config_t config;
    memset(&config, 0, sizeof(config));
    config.palette = 1;
    config.rows[0] = TILE_ROWS;
    config.bytes_per_row[0] = (uint16_t)(m * 4);
    config.rows[1] = TILE_ROWS;
    config.bytes_per_row[1] = TILE_K * 2;
    config.rows[2] = TILE_K / 2;
    config.bytes_per_row[2] = (uint16_t)(m * 4);
    _tile_loadconfig(&config);
}

// x as bf16 pairs, m * 4 bytes per pair index: packed[p * m + i] = (x[i, 2p], x[i, 2p + 1]),
// zero past k. Each chunk of K is then one B tile with an m * 4-byte row stride. Written in
// order, as compact as x: a 64-byte stride whatever m wrote a cache line per 4 bytes at m = 1.
static void pack_pairs(const elem_t *x, int64_t ldx, int m, int64_t k, int64_t chunks,
                       uint32_t *packed) {
    const int64_t pairs = chunks * TILE_K / 2, full = k / 2;
    int64_t p = 0;
    for (; p < full; p++) {
        for (int i = 0; i < m; i++) memcpy(&packed[p * m + i], x + i * ldx + 2 * p, 4);
    }
    if (k % 2) {
        for (int i = 0; i < m; i++) packed[p * m + i] = x[i * ldx + 2 * p];
        p++;
    }
    memset(packed + p * m, 0, (size_t)((pairs - p) * m) * sizeof(uint32_t));
}

// One buffer per calling thread, grown as needed and kept: allocating a few hundred KB per call
// would fault in fresh pages every time. Never freed; threads that call this are long-lived.
static __thread uint32_t *packed_cache;
static __thread int64_t packed_capacity;

static uint32_t *packed_buffer(int64_t count) {
    if (count > packed_capacity) {
        free(packed_cache);
        packed_cache = aligned_alloc(64, (size_t)count * 4);
        packed_capacity = packed_cache ? count : 0;
    }
    return packed_cache;
}

typedef struct {
    const elem_t *w, *bias;
    const uint32_t *packed;
    elem_t *out;
    int64_t ldo, m, n, k;
    int accumulate;
} amx_job_t;

// Weight rows [n0, n0 + 16) into the C tile. The prefetches fetch the same position of the
// next group of rows this thread will multiply (`next`), as the AVX-512 kernel does.
static void multiply_group(const amx_job_t *job, const elem_t *group, const elem_t *next) {
    const int64_t k = job->k, full_chunks = k / TILE_K;
    MEMORY_BARRIER();  // the packed x
    _tile_zero(0);
    for (int64_t c = 0; c < full_chunks; c++) {
        const elem_t *chunk = group + c * TILE_K;
        for (int r = 0; r < TILE_ROWS; r++) {
            _mm_prefetch((const char *)(next + r * k + c * TILE_K), _MM_HINT_T0);
        }
        _tile_loadd(1, chunk, k * 2);
        _tile_loadd(2, job->packed + c * (TILE_K / 2) * job->m, job->m * 4);
        _tile_dpbf16ps(0, 1, 2);
    }
    if (k % TILE_K) {
        elem_t tail[TILE_ROWS][TILE_K] __attribute__((aligned(64)));
        memset(tail, 0, sizeof(tail));
        for (int r = 0; r < TILE_ROWS; r++) {
            _mm_prefetch((const char *)(next + r * k + full_chunks * TILE_K), _MM_HINT_T0);
            memcpy(tail[r], group + r * k + full_chunks * TILE_K, (k % TILE_K) * 2);
        }
        MEMORY_BARRIER();
        _tile_loadd(1, tail, TILE_K * 2);
        _tile_loadd(2, job->packed + full_chunks * (TILE_K / 2) * job->m, job->m * 4);
        _tile_dpbf16ps(0, 1, 2);
    }
}

// Output columns n0..n0+15 of every input row from the C tile, sums[r][i] (16 lanes at a time:
// with short K, a scalar loop here cost more than the tile products): plus the bias, rounded to
// bf16 exactly as from_f32 does, then stored where `keep` has a bit.
INLINE __m256i round_to_bf16(__m512 sum) {
    __m512i bits = _mm512_castps_si512(sum);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    bits = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff)));
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(bits, 16));
}

INLINE __m512 widen_bf16(__m256i values) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(values), 16));
}

static void store_group(const float (*sums)[MAX_M], const elem_t *bias, elem_t *out, int64_t ldo,
                        int64_t m, __mmask16 keep, int accumulate) {
    const __m512i column = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7,
                                                               6, 5, 4, 3, 2, 1, 0),
                                              _mm512_set1_epi32(MAX_M));
    const __m512 b = bias ? _mm512_castsi512_ps(_mm512_slli_epi32(
                                _mm512_cvtepu16_epi32(_mm256_loadu_si256((const void *)bias)), 16))
                          : _mm512_setzero_ps();
    for (int64_t i = 0; i < m; i++) {
        const __m512 sum = _mm512_add_ps(_mm512_i32gather_ps(column, &sums[0][i], 4), b);
        __m256i rounded = round_to_bf16(sum);
        if (accumulate) {
            const __m256i held = _mm256_maskz_loadu_epi16(keep, out + i * ldo);
            rounded = round_to_bf16(_mm512_add_ps(widen_bf16(held), widen_bf16(rounded)));
        }
        _mm256_mask_storeu_epi16(out + i * ldo, keep, rounded);
    }
}

// Groups [begin, end) of 16 weight rows. The last group of a matrix whose n is not a multiple
// of 16 is shifted back to end at row n: it recomputes rows of the group before it (the same
// values, as each row of C depends only on its own row of A) and writes only its new rows.
static void amx_groups(const amx_job_t *job, const int64_t *list, int64_t begin, int64_t end) {
    float sums[TILE_ROWS][MAX_M] __attribute__((aligned(64)));
    configure_tiles((int)job->m);
    // Prefetch this many groups ahead: one of long rows, enough of short ones (a LoRA expand's
    // rank-wide rows: 512 bytes a group at rank 16) to keep AMX_PREFETCH_BYTES in flight.
    const int64_t group_bytes = TILE_ROWS * job->k * (int64_t)sizeof(elem_t);
    const int64_t ahead = (AMX_PREFETCH_BYTES + group_bytes - 1) / group_bytes;
    for (int64_t index = begin; index < end; index++) {
        const int64_t g = list ? list[index] : index;
        const int64_t first = g * TILE_ROWS;
        const int64_t n0 = first + TILE_ROWS <= job->n ? first : job->n - TILE_ROWS;
        // That group in the list, or (past its end, and without a list) the one as far on.
        const int64_t after = list && index + ahead < end ? list[index + ahead] * TILE_ROWS
                                                          : n0 + ahead * TILE_ROWS;
        multiply_group(job, job->w + n0 * job->k, job->w + after * job->k);
        _tile_stored(0, sums, MAX_M * 4);
        MEMORY_BARRIER();
        store_group(sums, job->bias ? job->bias + n0 : NULL, job->out + n0, job->ldo, job->m,
                    (__mmask16)(0xffffu << (first - n0)), job->accumulate);
    }
    // Hand the tile state back so context switches stop saving 8 KB of it for this thread.
    _tile_release();
}

// The share of linear_amx_skipping (below) that thread `thread` of a running team of `team`
// takes: it packs x into its own buffer, thread 0 sets the skipped groups, and the threads
// take equal runs of the kept ones (thread 0 all of them below PARALLEL_MIN_BYTES). A group is
// computed the same way whichever thread takes it, so the same bits. Returns 0, or -1 when a
// buffer cannot be allocated.
static int amx_part(const elem_t *x, int64_t ldx, const elem_t *w, const elem_t *bias,
                    elem_t *out, int64_t ldo, int64_t m, int64_t n, int64_t k, int accumulate,
                    const uint8_t *skip, int64_t thread, int64_t team) {
    if (n < TILE_ROWS) {
        return vector_part(x, ldx, w, bias, out, ldo, m, n, k, accumulate, thread, team);
    }
    if (team > 1 && n * k * (int64_t)sizeof(elem_t) < TEAM_MIN_BYTES) {
        if (thread != 0) return 0;
        team = 1;
    }
    const int64_t chunks = (k + TILE_K - 1) / TILE_K;
    uint32_t *packed = packed_buffer(chunks * (TILE_K / 2) * MAX_M);
    if (packed == NULL) return -1;
    pack_pairs(x, ldx, (int)m, k, chunks, packed);
    const amx_job_t job = {w, bias, packed, out, ldo, m, n, k, accumulate};
    int64_t groups = (n + TILE_ROWS - 1) / TILE_ROWS;
    int64_t *list = NULL;
    if (skip != NULL) {
        list = malloc((size_t)groups * sizeof(int64_t));
        if (list == NULL) return -1;
        int64_t kept = 0;
        for (int64_t g = 0; g < groups; g++) {
            if (!skip[g]) {
                list[kept++] = g;
                continue;
            }
            if (thread != 0) continue;
            const int64_t end = (g + 1) * TILE_ROWS < n ? (g + 1) * TILE_ROWS : n;
            for (int64_t i = 0; i < m; i++) {
                for (int64_t row = g * TILE_ROWS; row < end; row++) {
                    const elem_t zero = from_f32(bias ? to_f32(bias[row]) : 0.0f);
                    out[i * ldo + row] = accumulate ? out[i * ldo + row] : zero;
                }
            }
        }
        groups = kept;
    }
    const int64_t begin = groups * thread / team, end = groups * (thread + 1) / team;
    if (begin < end) amx_groups(&job, list, begin, end);
    free(list);
    return 0;
}

// As linear_vector; matrices of fewer than 16 rows go to linear_vector whatever m is.
// skip (NULL: none): per 16-row group, 1 where its outputs are not wanted; they are set to 0
// (plus the bias) instead of computed, and the threads share the other groups.
// Returns 0, or -1 when a buffer cannot be allocated.
static int linear_amx_skipping(const elem_t *x, int64_t ldx, const elem_t *w, const elem_t *bias,
                               elem_t *out, int64_t ldo, int64_t m, int64_t n, int64_t k,
                               int accumulate, const uint8_t *skip, int threads) {
    if (n < TILE_ROWS) {
        return linear_vector(x, ldx, w, bias, out, ldo, m, n, k, accumulate, threads);
    }
    if (threads <= 1 || n * k * (int64_t)sizeof(elem_t) < PARALLEL_MIN_BYTES) {
        return amx_part(x, ldx, w, bias, out, ldo, m, n, k, accumulate, skip, 0, 1);
    }
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    failed = amx_part(x, ldx, w, bias, out, ldo, m, n, k, accumulate, skip, omp_get_thread_num(),
                      omp_get_num_threads()) != 0;
    return failed ? -1 : 0;
}

static int linear_amx(const elem_t *x, int64_t ldx, const elem_t *w, const elem_t *bias,
                      elem_t *out, int64_t ldo, int64_t m, int64_t n, int64_t k, int accumulate,
                      int threads) {
    return linear_amx_skipping(x, ldx, w, bias, out, ldo, m, n, k, accumulate, NULL, threads);
}
#endif

// ---------------------------------------------------------------------------------------------
// Multi-LoRA for a batch (kernels/lora.py's dense path) in one call: the shrink of x by every
// slot's A of every slice, the rows' slot weights applied to the shrunk columns, then per slice
// y[:, start : start + width] += shrunk[:, slice] @ B_slice^T. The very operations (and bits) of
// the torch ops it replaces: linear into a bf16 temporary, a bitwise AND with an int16 mask of
// 0 / -1 (mask_kind 1) or a product rounded to elem_t (mask_kind 2), and linear adds into y.

typedef struct {
    const elem_t *x, *a, *b, *mask;
    elem_t *shrunk, *y;
    const int64_t *starts, *widths;
    const uint8_t *skip;  // per 16-row group of a, 1 where no row's slot is used; or NULL
    int64_t ldx, ldy, slices, columns, m, k;
    int mask_kind, amx, threads;
} lora_t;

static int project(const lora_t *job, const elem_t *x, int64_t ldx, const elem_t *w,
                   elem_t *out, int64_t ldo, int64_t n, int64_t k, int accumulate,
                   const uint8_t *skip) {
#if defined(TANDEM_BF16) && defined(__AMX_TILE__)
    if (job->amx) {
        return linear_amx_skipping(x, ldx, w, NULL, out, ldo, job->m, n, k, accumulate, skip,
                                   job->threads);
    }
#else
    (void)skip;
#endif
    return linear_vector(x, ldx, w, NULL, out, ldo, job->m, n, k, accumulate, job->threads);
}

static void apply_mask(const lora_t *job) {
    const int64_t total = job->slices * job->columns;
    for (int64_t i = 0; i < job->m; i++) {
        for (int64_t p = 0; p < job->slices; p++) {
            elem_t *row = job->shrunk + i * total + p * job->columns;
            const elem_t *weights = job->mask + i * job->columns;
            for (int64_t c = 0; c < job->columns; c++) {
#if defined(TANDEM_BF16)
                if (job->mask_kind == 1) {
                    row[c] &= weights[c];
                    continue;
                }
#endif
                row[c] = from_f32(to_f32(row[c]) * to_f32(weights[c]));
            }
        }
    }
}

// A team's barrier: sync(team_context) returns once every thread of the team has called it.
typedef void (*sync_fn)(void *team_context);

// The segmented form (the vector kernels'): where every row uses at most one slot, with weight
// 1 (a 0 / -1 or 0 / 1 mask whose nonzeros form one range of columns per row), each row is
// multiplied by its own slot's rows of A and columns of B only, where the dense form multiplies
// every row by every slot and masks: 8 rows of 8 slots made 8x the products, and without AMX
// the products (VDPBF16PS, about 0.4 a cycle on a Zen 4; fp32 FMAs with AVX2) bounded a
// batch-8 step. The same bits as the dense form: a row's shrunk columns are the same dot
// products (dot_block's chain does not depend on M), the mask would leave them as they are,
// and in the expand the columns outside the row's range are lanes the dense form fills with
// exact zeros (an accumulator lane is never -0, so adding them changes nothing; weights must be
// finite: 0 * inf is no zero). A row without an adapter gets y + 0, as there.

// Columns per step of the expand's chain: dot_block's chunk of K.
#if defined(__AVX512F__)
#define SEGMENT_CHUNK LANES
#else
#define SEGMENT_CHUNK CHUNK
#endif

// Per row, its range [first, end) of the slot columns (first == end: none); 0 where the
// segmented form does not apply.
static int row_ranges(const lora_t *job, int64_t *first, int64_t *end) {
    if (job->mask_kind == 0 || job->amx) return 0;  // one slot for every row, or AMX: dense
    for (int64_t i = 0; i < job->m; i++) {
        const elem_t *mask = job->mask + i * job->columns;
        int64_t c = 0;
#if defined(TANDEM_BF16)
        const elem_t one = job->mask_kind == 1 ? (elem_t)0xffff : (elem_t)0x3f80;
#else
        const elem_t one = 1.0f;
#endif
        while (c < job->columns && mask[c] == 0) c++;
        first[i] = c;
        while (c < job->columns && mask[c] == one) c++;
        end[i] = c;
        while (c < job->columns && mask[c] == 0) c++;
        if (c < job->columns) return 0;  // another weight, or a second range
        const int64_t span = end[i] - first[i] / SEGMENT_CHUNK * SEGMENT_CHUNK;
        if (span > (MAX_CHUNKS - 1) * SEGMENT_CHUNK) return 0;  // too wide
    }
    return 1;
}

// y[i, n] += sum over the columns [first, end) of shrunk[i, c] * b[n, c], n in [n0, n1), in
// dot_block's chain over chunks of `columns` (only the chunks that meet the range), then its
// horizontal sum and its rounding into y.
#if defined(__AVX512F__)
static void expand_row(const elem_t *shrunk, const elem_t *b, int64_t columns, int64_t first,
                       int64_t end, elem_t *y, int64_t n0, int64_t n1) {
    const int64_t c0 = first / LANES * LANES;
    vec_t x[MAX_CHUNKS];
    lane_mask_t lanes[MAX_CHUNKS];
    int chunks = 0;
    for (int64_t c = c0; c < end; c += LANES, chunks++) {
        uint64_t bits = 0;
        for (int64_t j = 0; j < LANES; j++) bits |= (uint64_t)(c + j >= first && c + j < end) << j;
        lanes[chunks] = (lane_mask_t)bits;
        x[chunks] = load_lanes(lanes[chunks], shrunk + c);
    }
    for (int64_t n = n0; n < n1; n++) {
        const elem_t *row = b + n * columns + c0;
        __m512 acc = _mm512_setzero_ps();
        for (int q = 0; q < chunks; q++) {
            acc = multiply_add(acc, load_lanes(lanes[q], row + q * LANES), x[q]);
        }
        const elem_t value = from_f32(_mm512_reduce_add_ps(acc) + 0.0f);
        y[n] = from_f32(to_f32(y[n]) + to_f32(value));
    }
}
#else
// The same with the AVX2 kernel's chain: per chunk of CHUNK columns that meets the range, its
// parts (bf16: the even elements, then the odd ones, widened; the partial last chunk of the
// row zero-padded) times x's, one FMA each, then sum8.
static void expand_row(const elem_t *shrunk, const elem_t *b, int64_t columns, int64_t first,
                       int64_t end, elem_t *y, int64_t n0, int64_t n1) {
    const int64_t c0 = first / CHUNK * CHUNK;
    __m256 x[MAX_CHUNKS][PARTS];
    int chunks = 0;
    for (int64_t c = c0; c < end; c += CHUNK, chunks++) {
        elem_t in_range[CHUNK];  // x's columns of the range, zeros elsewhere (as masked)
        for (int64_t j = 0; j < CHUNK; j++) {
            in_range[j] = c + j >= first && c + j < end ? shrunk[c + j] : from_f32(0.0f);
        }
        load_parts(in_range, x[chunks]);
    }
    for (int64_t n = n0; n < n1; n++) {
        const elem_t *row = b + n * columns;
        __m256 acc = _mm256_setzero_ps();
        for (int q = 0; q < chunks; q++) {
            const int64_t c = c0 + q * CHUNK;
            __m256 part[PARTS];
            if (c + CHUNK <= columns) {
                load_parts(row + c, part);
            } else {
                load_tail_parts(row + c, columns - c, part);
            }
            for (int p = 0; p < PARTS; p++) acc = _mm256_fmadd_ps(part[p], x[q][p], acc);
        }
        const elem_t value = from_f32(sum8(acc) + 0.0f);
        y[n] = from_f32(to_f32(y[n]) + to_f32(value));
    }
}
#endif

#if defined(__AVX512F__) && defined(TANDEM_BF16)
// Eight column pairs (16 bf16 at `at`, as 8 dwords) of sixteen rows of B, `ld` elements apart,
// transposed: out[l] holds pair l of rows 0..15 in its lanes 0..15.
INLINE void load_pairs_transposed(const elem_t *at, int64_t ld, __m512i *out) {
    __m512i z[8], t[8], u[8];
#pragma GCC unroll 8
    for (int j = 0; j < 8; j++) {  // rows j and j + 8, side by side
        const __m256i low = _mm256_loadu_si256((const __m256i *)(at + j * ld));
        const __m256i high = _mm256_loadu_si256((const __m256i *)(at + (j + 8) * ld));
        z[j] = _mm512_inserti64x4(_mm512_castsi256_si512(low), high, 1);
    }
#pragma GCC unroll 4
    for (int j = 0; j < 8; j += 2) {  // per 128-bit block: [a0 b0 a1 b1], [a2 b2 a3 b3]
        t[j] = _mm512_unpacklo_epi32(z[j], z[j + 1]);
        t[j + 1] = _mm512_unpackhi_epi32(z[j], z[j + 1]);
    }
#pragma GCC unroll 2
    for (int j = 0; j < 8; j += 4) {  // per block: pair 0, 1, 2, 3 (or 4-7) of 4 rows
        u[j] = _mm512_unpacklo_epi64(t[j], t[j + 2]);
        u[j + 1] = _mm512_unpackhi_epi64(t[j], t[j + 2]);
        u[j + 2] = _mm512_unpacklo_epi64(t[j + 1], t[j + 3]);
        u[j + 3] = _mm512_unpackhi_epi64(t[j + 1], t[j + 3]);
    }
    // Blocks of u[l] (rows 0-3) and u[l + 4] (rows 4-7), of each half (rows + 8), in row order.
    const __m512i low_pairs = _mm512_setr_epi64(0, 1, 8, 9, 4, 5, 12, 13);
    const __m512i high_pairs = _mm512_setr_epi64(2, 3, 10, 11, 6, 7, 14, 15);
#pragma GCC unroll 4
    for (int l = 0; l < 4; l++) {
        out[l] = _mm512_permutex2var_epi64(u[l], low_pairs, u[l + 4]);
        out[l + 4] = _mm512_permutex2var_epi64(u[l], high_pairs, u[l + 4]);
    }
}

// Eight accumulator lanes' vectors (v) updated by a half of 16 columns of sixteen rows of B.
INLINE void multiply_half(__m512 *v, const elem_t *at, int64_t ld, const __m512i *pairs) {
    __m512i w[8];
    load_pairs_transposed(at, ld, w);
#pragma GCC unroll 8
    for (int l = 0; l < 8; l++) v[l] = _mm512_dpbf16_ps(v[l], (__m512bh)w[l], (__m512bh)pairs[l]);
}

// expand_row's results sixteen outputs at a time, where each chunk's lanes that meet the range
// lie in halves of 16 columns inside the row: lane j of vector l is lane l of output n + j's
// accumulator, updated by the same VDPBF16PS on the same operands (B's pairs transposed from
// sixteen rows), then _mm512_reduce_add_ps's tree across the sixteen vectors, and the rounding,
// addition and store sixteen at a time. One output at a time spent most of its time on the
// horizontal sum and the scalar end; gathering the pairs instead was slower still.

// Whether a row's range takes expand_block16: its halves must not read past B's row.
INLINE int takes_blocks16(int64_t end, int64_t columns) { return (end + 15) / 16 * 16 <= columns; }

// expand_block16's x operand for one row: per chunk that meets [first, end) and per lane l, the
// row's column pair l of the chunk in every lane (16 vectors a chunk).
static void broadcast_pairs(const elem_t *shrunk, int64_t first, int64_t end, __m512i *pairs) {
    for (int64_t c = first / LANES * LANES; c < end; c += LANES, pairs += 16) {
        uint64_t bits = 0;
        for (int64_t j = 0; j < LANES; j++) bits |= (uint64_t)(c + j >= first && c + j < end) << j;
        const __m512i x = (__m512i)load_lanes((lane_mask_t)bits, shrunk + c);
        for (int l = 0; l < 16; l++) pairs[l] = _mm512_permutexvar_epi32(_mm512_set1_epi32(l), x);
    }
}

// y[n, n + 16) += the row's expand (pairs from broadcast_pairs), as expand_row adds it.
INLINE void expand_block16(const __m512i *pairs, const elem_t *b, int64_t columns, int64_t first,
                           int64_t end, elem_t *y, int64_t n) {
    const int64_t c0 = first / LANES * LANES;
    __m512 v[16];
#pragma GCC unroll 16
    for (int l = 0; l < 16; l++) v[l] = _mm512_setzero_ps();
    for (int64_t half = first / 16; half < (end + 15) / 16; half++) {
        const __m512i *lane_pairs = pairs + (half * 16 - c0) / LANES * 16;
        const elem_t *at = b + n * columns + half * 16;
        // The same columns EXPAND_AHEAD rows on: the hardware prefetchers follow this walk
        // (a piece of each row of B) poorly; the batch-8 LoRA calls took 15% less.
#pragma GCC unroll 16
        for (int j = 0; j < 16; j++) {
            _mm_prefetch((const char *)(at + (EXPAND_AHEAD + j) * columns), PREFETCH_HINT);
        }
        if (half % 2 == 0) {  // lanes 0-7 of the chunk's accumulator
            multiply_half(v, at, columns, lane_pairs);
        } else {
            multiply_half(v + 8, at, columns, lane_pairs + 8);
        }
    }
    __m512 t[8];  // the tree, as _mm512_reduce_add_ps pairs the lanes
#pragma GCC unroll 8
    for (int l = 0; l < 8; l++) t[l] = _mm512_add_ps(v[l + 8], v[l]);
#pragma GCC unroll 4
    for (int l = 0; l < 4; l++) t[l] = _mm512_add_ps(t[l + 4], t[l]);
    const __m512 sum = _mm512_add_ps(_mm512_add_ps(t[0], t[2]), _mm512_add_ps(t[1], t[3]));
    const __m512 value = round16(_mm512_add_ps(sum, _mm512_setzero_ps()));
    store16(0xffff, y + n, _mm512_add_ps(load16(0xffff, y + n), value));
}

// broadcast_pairs' vectors for up to MAX_M rows: one buffer per thread, kept.
#define PAIRS_PER_ROW (MAX_CHUNKS * 16)
static __thread __m512i *pairs_cache;

static __m512i *pairs_buffer(void) {
    if (pairs_cache == NULL) {
        pairs_cache = aligned_alloc(64, (size_t)MAX_M * PAIRS_PER_ROW * sizeof(__m512i));
    }
    return pairs_cache;
}
#endif

// One row of the expand that goes block by block: its shrunk columns, outputs, range, operand.
typedef struct {
    const elem_t *shrunk;
    elem_t *y;
    int64_t first, end;
    const void *pairs;
} blocked_row_t;

// This thread's part of the segmented form; sync(context) once, between the shrink and the
// expand. Tasks are (row, slice) pairs: shrinks dealt out whole, each expand split by columns.
static int segmented_part(const lora_t *job, const int64_t *first, const int64_t *end,
                          int64_t thread, int64_t team, sync_fn sync, void *context) {
    const int64_t total = job->slices * job->columns;
    int status = 0;
    for (int64_t task = thread; task < job->m * job->slices; task += team) {
        const int64_t i = task / job->slices, p = task % job->slices;
        if (first[i] == end[i]) continue;
        const int64_t column = p * job->columns + first[i];
        status |= vector_part(job->x + i * job->ldx, job->ldx, job->a + column * job->k, NULL,
                              job->shrunk + i * total + column, total, 1, end[i] - first[i],
                              job->k, 0, 0, 1);  // AVX2 widens x into a buffer: it may fail
    }
    sync(context);
#if defined(__AVX512F__) && defined(TANDEM_BF16)
    __m512i *pairs = pairs_buffer();
#endif
    const elem_t *b = job->b;
    for (int64_t p = 0; p < job->slices; b += job->widths[p] * job->columns, p++) {
        const int64_t width = job->widths[p];
        const int64_t n0 = width * thread / team, n1 = width * (thread + 1) / team;
        // The rows that take expand_block16, their arguments in locals: the vector stores into y
        // may alias anything else, so fields read through job would be reloaded every block.
        blocked_row_t blocked[MAX_M];
        int64_t count = 0;
        for (int64_t i = 0; i < job->m; i++) {
            elem_t *y = job->y + i * job->ldy + job->starts[p];
            if (first[i] == end[i]) {
                for (int64_t n = n0; n < n1; n++) y[n] = from_f32(to_f32(y[n]) + 0.0f);
                continue;
            }
            const elem_t *shrunk = job->shrunk + i * total + p * job->columns;
#if defined(__AVX512F__) && defined(TANDEM_BF16)
            if (pairs != NULL && takes_blocks16(end[i], job->columns)) {
                broadcast_pairs(shrunk, first[i], end[i], pairs + i * PAIRS_PER_ROW);
                blocked[count++] =
                    (blocked_row_t){shrunk, y, first[i], end[i], pairs + i * PAIRS_PER_ROW};
                continue;
            }
#endif
            expand_row(shrunk, b, job->columns, first[i], end[i], y, n0, n1);
        }
        // Block by block of B's rows, every row's outputs there: B is read once, in address
        // order. Each row walking all of B for its own piece (one line in four of 256-byte
        // rows) made the batch-8 LoRA calls 9-14% slower.
        const int64_t columns = job->columns;
        int64_t n = n0;
#if defined(__AVX512F__) && defined(TANDEM_BF16)
        for (; n + 16 <= n1; n += 16) {
            for (int64_t r = 0; r < count; r++) {
                expand_block16(blocked[r].pairs, b, columns, blocked[r].first, blocked[r].end,
                               blocked[r].y, n);
            }
        }
#endif
        for (int64_t r = 0; r < count && n < n1; r++) {
            expand_row(blocked[r].shrunk, b, columns, blocked[r].first, blocked[r].end,
                       blocked[r].y, n, n1);
        }
    }
    return status;
}

static void no_sync(void *context) { (void)context; }

static void omp_sync(void *context) {
    (void)context;
#pragma omp barrier
}

#if defined(TANDEM_BF16) && defined(__AMX_TILE__)
// The AMX variant in one parallel region: the threads share the shrink's groups of A, then
// (after one thread has applied the mask and packed each slice's shrunk columns) the expands'
// groups of every slice as one list. Separate calls each paid for their own packing, tile setup
// and thread wake-up, and ran the expands of small slices on one thread. The same operations
// on every element as the separate calls, so the same bits.
typedef struct {
    const lora_t *job;
    const int64_t *list;  // the shrink's groups of A to multiply
    int64_t kept;         // entries of list
    uint32_t *packed_x, *packed_shrunk;
    int64_t slice_pairs;  // uint32s of packed_shrunk per slice
    const int64_t *first_group;  // per slice, its first group in the expands' list; then the end
} lora_amx_t;

static void lora_amx_part(const lora_amx_t *ctx, int64_t thread, int64_t team) {
    const lora_t *job = ctx->job;
    const int64_t total = job->slices * job->columns;
    const amx_job_t shrink = {job->a, NULL, ctx->packed_x, job->shrunk, total,
                              job->m, total, job->k, 0};
    const int64_t begin = ctx->kept * thread / team, end = ctx->kept * (thread + 1) / team;
    if (begin < end) amx_groups(&shrink, ctx->list, begin, end);
#pragma omp barrier
#pragma omp single
    {
        if (job->mask_kind != 0) apply_mask(job);
        const int64_t chunks = ctx->slice_pairs / ((TILE_K / 2) * MAX_M);
        for (int64_t p = 0; p < job->slices; p++) {
            pack_pairs(job->shrunk + p * job->columns, total, (int)job->m, job->columns, chunks,
                       ctx->packed_shrunk + p * ctx->slice_pairs);
        }
    }
    const int64_t groups = ctx->first_group[job->slices];
    const int64_t from = groups * thread / team, to = groups * (thread + 1) / team;
    const elem_t *b = job->b;
    for (int64_t p = 0; p < job->slices; b += job->widths[p] * job->columns, p++) {
        const int64_t lo = from > ctx->first_group[p] ? from : ctx->first_group[p];
        const int64_t hi = to < ctx->first_group[p + 1] ? to : ctx->first_group[p + 1];
        if (lo >= hi) continue;
        const amx_job_t expand = {b, NULL, ctx->packed_shrunk + p * ctx->slice_pairs,
                                  job->y + job->starts[p], job->ldy, job->m, job->widths[p],
                                  job->columns, 1};
        amx_groups(&expand, NULL, lo - ctx->first_group[p], hi - ctx->first_group[p]);
    }
}

// Returns 1 where it does not apply (a slice narrower than a tile: the caller runs the calls
// one by one), -1 when a buffer cannot be allocated, else 0.
static int lora_dense_amx(const lora_t *job) {
    const int64_t total = job->slices * job->columns;
    if (total < TILE_ROWS) return 1;
    for (int64_t p = 0; p < job->slices; p++) {
        if (job->widths[p] < TILE_ROWS) return 1;
    }
    const int64_t x_pairs = (job->k + TILE_K - 1) / TILE_K * (TILE_K / 2) * MAX_M;
    const int64_t slice_pairs = (job->columns + TILE_K - 1) / TILE_K * (TILE_K / 2) * MAX_M;
    uint32_t *packed = packed_buffer(x_pairs + job->slices * slice_pairs);
    const int64_t a_groups = (total + TILE_ROWS - 1) / TILE_ROWS;
    int64_t *list = malloc((size_t)(a_groups + job->slices + 1) * sizeof(int64_t));
    if (packed == NULL || list == NULL) {
        free(list);
        return -1;
    }
    int64_t *first_group = list + a_groups;
    pack_pairs(job->x, job->ldx, (int)job->m, job->k, x_pairs / ((TILE_K / 2) * MAX_M), packed);
    int64_t kept = 0;
    for (int64_t g = 0; g < a_groups; g++) {
        if (job->skip == NULL || !job->skip[g]) {
            list[kept++] = g;
            continue;
        }
        const int64_t end = (g + 1) * TILE_ROWS < total ? (g + 1) * TILE_ROWS : total;
        for (int64_t i = 0; i < job->m; i++) {
            memset(job->shrunk + i * total + g * TILE_ROWS, 0,
                   (size_t)(end - g * TILE_ROWS) * sizeof(elem_t));
        }
    }
    first_group[0] = 0;
    for (int64_t p = 0; p < job->slices; p++) {
        first_group[p + 1] = first_group[p] + (job->widths[p] + TILE_ROWS - 1) / TILE_ROWS;
    }
    const lora_amx_t ctx = {job, list, kept, packed, packed + x_pairs, slice_pairs, first_group};
    if (job->threads <= 1) {
        lora_amx_part(&ctx, 0, 1);
    } else {
#pragma omp parallel num_threads(job->threads)
        lora_amx_part(&ctx, omp_get_thread_num(), omp_get_num_threads());
    }
    free(list);
    return 0;
}
#endif

// The shrunk columns when the caller passes none: one buffer per calling thread, kept.
static __thread elem_t *shrunk_cache;
static __thread int64_t shrunk_capacity;

static elem_t *shrunk_buffer(int64_t count) {
    if (count > shrunk_capacity) {
        const size_t bytes = (size_t)count * sizeof(elem_t);
        free(shrunk_cache);
        shrunk_cache = aligned_alloc(64, (bytes + 63) / 64 * 64);  // a multiple, as it must
        shrunk_capacity = shrunk_cache ? count : 0;
    }
    return shrunk_cache;
}

static int lora_dense(const lora_t *caller_job) {
    lora_t local = *caller_job;
    const lora_t *job = &local;
    const int64_t total = job->slices * job->columns;
    if (local.shrunk == NULL) {
        local.shrunk = shrunk_buffer(job->m * total);
        if (local.shrunk == NULL) return -1;
    }
    int64_t first[MAX_M], end[MAX_M];
    if (row_ranges(job, first, end)) {
        if (job->threads <= 1) return segmented_part(job, first, end, 0, 1, no_sync, NULL);
        int status = 0;
#pragma omp parallel num_threads(job->threads) reduction(| : status)
        status |= segmented_part(job, first, end, omp_get_thread_num(), omp_get_num_threads(),
                                 omp_sync, NULL);
        return status;
    }
#if defined(TANDEM_BF16) && defined(__AMX_TILE__)
    if (job->amx) {
        const int status = lora_dense_amx(job);
        if (status != 1) return status;
    }
#endif
    // Groups of A whose slots no row uses are not read: their columns would be masked to 0.
    if (project(job, job->x, job->ldx, job->a, job->shrunk, total, total, job->k, 0, job->skip) !=
        0) {
        return -1;
    }
    if (job->mask_kind != 0) apply_mask(job);
    const elem_t *b = job->b;
    for (int64_t p = 0; p < job->slices; p++) {
        if (project(job, job->shrunk + p * job->columns, total, b, job->y + job->starts[p],
                    job->ldy, job->widths[p], job->columns, 1, NULL) != 0) {
            return -1;
        }
        b += job->widths[p] * job->columns;
    }
    return 0;
}

// For a team of threads already running (kernels/csrc/cpu_ops.c's decode step), each calling
// with its `thread` number: lora_dense as its separate calls (the same bits), each shared by the
// team, with the team's barrier `sync(team_context)` between them. The shrunk columns are thread
// 0's buffer, handed to the others through *shared. Returns 0, or -1 when a buffer cannot be
// allocated; every thread makes the same calls to sync either way.

static int project_part(const lora_t *job, const elem_t *x, int64_t ldx, const elem_t *w,
                        elem_t *out, int64_t ldo, int64_t n, int64_t k, int accumulate,
                        const uint8_t *skip, int64_t thread, int64_t team) {
#if defined(TANDEM_BF16) && defined(__AMX_TILE__)
    if (job->amx) {
        return amx_part(x, ldx, w, NULL, out, ldo, job->m, n, k, accumulate, skip, thread, team);
    }
#else
    (void)skip;
#endif
    return vector_part(x, ldx, w, NULL, out, ldo, job->m, n, k, accumulate, thread, team);
}

static int lora_part(const lora_t *caller_job, int64_t thread, int64_t team, sync_fn sync,
                     void *team_context, void **shared) {
    lora_t local = *caller_job;
    const lora_t *job = &local;
    const int64_t total = job->slices * job->columns;
    if (thread == 0) *shared = shrunk_buffer(job->m * total);
    sync(team_context);
    local.shrunk = *shared;
    if (local.shrunk == NULL) return -1;
    int64_t first[MAX_M], end[MAX_M];
    if (row_ranges(job, first, end)) {  // the same answer on every thread
        return segmented_part(job, first, end, thread, team, sync, team_context);
    }
    int status = project_part(job, job->x, job->ldx, job->a, job->shrunk, total, total, job->k,
                              0, job->skip, thread, team);
    sync(team_context);
    if (thread == 0 && job->mask_kind != 0) apply_mask(job);
    sync(team_context);
    const elem_t *b = job->b;
    for (int64_t p = 0; p < job->slices; b += job->widths[p] * job->columns, p++) {
        status |= project_part(job, job->shrunk + p * job->columns, total, b,
                               job->y + job->starts[p], job->ldy, job->widths[p], job->columns,
                               1, NULL, thread, team);
    }
    return status;
}

// ---------------------------------------------------------------------------------------------
// Python binding: linear(x_ptr, ldx, w_ptr, bias_ptr or 0, out_ptr, m, n, k, threads
// [, ldo, accumulate]) -> None (without the last two: out contiguous, overwritten),
// pointers as the integers Tensor.data_ptr() returns, and linear_amx with the same arguments
// once enable_amx() has returned True. The caller (kernels/cpu_linear.py) has checked dtypes,
// shapes and contiguity; here only m, which indexes BLOCKS, and ldo >= n are checked.

typedef struct {
    const elem_t *x, *w, *bias;
    elem_t *out;
    int64_t ldx, ldo, m, n, k;
    int accumulate, threads;
} call_t;

static int parse_call(PyObject *const *args, Py_ssize_t nargs, call_t *call) {
    if (nargs != 9 && nargs != 11) {
        PyErr_SetString(PyExc_TypeError, "linear() takes 9 or 11 integer arguments");
        return -1;
    }
    long long v[11];
    for (int i = 0; i < nargs; i++) v[i] = PyLong_AsLongLong(args[i]);
    if (PyErr_Occurred()) return -1;
    if (nargs == 9) {
        v[9] = v[6];  // out contiguous
        v[10] = 0;    // overwritten
    }
    if (v[5] < 1 || v[5] > MAX_M) {
        PyErr_SetString(PyExc_ValueError, "linear() needs 1 <= m <= MAX_M");
        return -1;
    }
    if (v[9] < v[6]) {
        PyErr_SetString(PyExc_ValueError, "linear() needs ldo >= n");
        return -1;
    }
    *call = (call_t){(const elem_t *)(intptr_t)v[0], (const elem_t *)(intptr_t)v[2],
                     (const elem_t *)(intptr_t)v[3], (elem_t *)(intptr_t)v[4],
                     v[1], v[9], v[5], v[6], v[7], v[10] != 0, (int)v[8]};
    return 0;
}

static PyObject *py_linear(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    call_t c;
    if (parse_call(args, nargs, &c) != 0) return NULL;
    int status;
    // The weights stream for tens of microseconds or more: let other Python threads run.
    Py_BEGIN_ALLOW_THREADS
    status = linear_vector(c.x, c.ldx, c.w, c.bias, c.out, c.ldo, c.m, c.n, c.k, c.accumulate,
                           c.threads);
    Py_END_ALLOW_THREADS
    if (status != 0) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

#if defined(TANDEM_BF16) && defined(__AMX_TILE__)
static PyObject *py_linear_amx(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    call_t c;
    if (parse_call(args, nargs, &c) != 0) return NULL;
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = linear_amx(c.x, c.ldx, c.w, c.bias, c.out, c.ldo, c.m, c.n, c.k, c.accumulate,
                        c.threads);
    Py_END_ALLOW_THREADS
    if (status != 0) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *py_enable_amx(PyObject *module, PyObject *unused) {
    (void)module;
    (void)unused;
    return PyBool_FromLong(enable_amx());
}
#endif

// lora_dense(x, ldx, a, shrunk, mask or 0, mask_kind, b, y, ldy, starts, widths, slices,
//            columns, m, k, amx, threads, skip or 0): see lora_dense above; starts and widths
// are int64 arrays of `slices` entries, shrunk an [m, slices * columns] buffer (or 0: a buffer
// kept per calling thread), skip a uint8 array with one entry per 16 rows of a (rounded up).
static PyObject *py_lora_dense(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 18) {
        PyErr_SetString(PyExc_TypeError, "lora_dense() takes 18 integer arguments");
        return NULL;
    }
    long long v[18];
    for (int i = 0; i < 18; i++) v[i] = PyLong_AsLongLong(args[i]);
    if (PyErr_Occurred()) return NULL;
    if (v[13] < 1 || v[13] > MAX_M) {
        PyErr_SetString(PyExc_ValueError, "lora_dense() needs 1 <= m <= MAX_M");
        return NULL;
    }
    const lora_t job = {
        (const elem_t *)(intptr_t)v[0], (const elem_t *)(intptr_t)v[2],
        (const elem_t *)(intptr_t)v[6], (const elem_t *)(intptr_t)v[4],
        (elem_t *)(intptr_t)v[3], (elem_t *)(intptr_t)v[7],
        (const int64_t *)(intptr_t)v[9], (const int64_t *)(intptr_t)v[10],
        (const uint8_t *)(intptr_t)v[17],
        v[1], v[8], v[11], v[12], v[13], v[14], (int)v[5], (int)v[15], (int)v[16],
    };
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = lora_dense(&job);
    Py_END_ALLOW_THREADS
    if (status != 0) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

// The kernels by address, for a team of threads already running in another module (kernels/
// csrc/cpu_ops.c's decode step), each thread calling with its number: its share of y = x @ w.T
// (+ bias) into y contiguous [m, n], x with row stride ldx; 1 <= m <= MAX_M. The caller waits for
// the whole team before it reads y. Returns 0, or -1 when a buffer cannot be allocated.
static int vector_entry(const void *x, int64_t ldx, const void *w, const void *bias, void *out,
                        int64_t m, int64_t n, int64_t k, int thread, int team) {
    return vector_part(x, ldx, w, bias, out, n, m, n, k, 0, thread, team);
}

#if defined(TANDEM_BF16) && defined(__AMX_TILE__)
static int amx_entry(const void *x, int64_t ldx, const void *w, const void *bias, void *out,
                     int64_t m, int64_t n, int64_t k, int thread, int team) {
    return amx_part(x, ldx, w, bias, out, n, m, n, k, 0, NULL, thread, team);
}
#endif

// A decode step's multi-LoRA for one projection group, for the same callers: lora_part (above)
// of y [m, ...] (row stride ldy) += the adapters of x [m, k] (row stride ldx), with params an
// int64 array: a, mask or 0, mask_kind, b, starts, widths, slices, columns, k, amx, skip or 0
// (as kernels.cpu_linear.LoraDense.params builds it). Returns 0, or -1 when a buffer cannot be
// allocated.
static int lora_entry(const void *x, int64_t ldx, const int64_t *params, void *y, int64_t ldy,
                      int64_t m, int thread, int team, sync_fn sync, void *team_context,
                      void **shared) {
    const lora_t job = {
        x, (const elem_t *)(intptr_t)params[0], (const elem_t *)(intptr_t)params[3],
        (const elem_t *)(intptr_t)params[1], NULL, y,
        (const int64_t *)(intptr_t)params[4], (const int64_t *)(intptr_t)params[5],
        (const uint8_t *)(intptr_t)params[10],
        ldx, ldy, params[6], params[7], m, params[8], (int)params[2], (int)params[9], team,
    };
    return lora_part(&job, thread, team, sync, team_context, shared);
}

// entry_address("amx", VECTOR_ISA or "lora_dense") -> that kernel's address as an int (0: none)
static PyObject *py_entry_address(PyObject *module, PyObject *name) {
    (void)module;
    const char *text = PyUnicode_AsUTF8(name);
    if (text == NULL) return NULL;
    void *entry = strcmp(text, VECTOR_ISA) == 0 ? (void *)vector_entry : NULL;
    if (strcmp(text, "lora_dense") == 0) entry = (void *)lora_entry;
#if defined(TANDEM_BF16) && defined(__AMX_TILE__)
    if (strcmp(text, "amx") == 0) entry = (void *)amx_entry;
#endif
    return PyLong_FromVoidPtr(entry);
}

static PyMethodDef METHODS[] = {
    {"linear", (PyCFunction)(void (*)(void))py_linear, METH_FASTCALL, "the vector kernel"},
    {"entry_address", py_entry_address, METH_O, "a kernel's address, for C callers"},
    {"lora_dense", (PyCFunction)(void (*)(void))py_lora_dense, METH_FASTCALL,
     "multi-LoRA shrink, slot weights and expand in one call"},
#if defined(TANDEM_BF16) && defined(__AMX_TILE__)
    {"linear_amx", (PyCFunction)(void (*)(void))py_linear_amx, METH_FASTCALL, "AMX kernel"},
    {"enable_amx", py_enable_amx, METH_NOARGS, "Ask Linux for AMX state; True if granted"},
#endif
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef MODULE = {
    PyModuleDef_HEAD_INIT, .m_name = MODULE_NAME, .m_size = -1, .m_methods = METHODS,
};

PyMODINIT_FUNC MODULE_INIT(void) {
    PyObject *module = PyModule_Create(&MODULE);
    if (module != NULL && (PyModule_AddIntConstant(module, "MAX_M", MAX_M) != 0 ||
                           PyModule_AddStringConstant(module, "VECTOR_ISA", VECTOR_ISA) != 0)) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
