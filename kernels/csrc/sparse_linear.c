// Sparse-activation linear layer on the CPU (WINA / TEAL, kernels/sparse.py), for M <= 16 rows:
//
//     out[t, :] = sum over the channels j that row t keeps: x[t, j] * w[j, :]  (+ bias)
//
// with w = weight_t [k, n] (W.T contiguous: input channel j is the contiguous row w[j, :]) and
// channel j of row t kept when |x[t, j]| * norms[j] >= thresholds[t] (norms NULL: |x[t, j]|).
//
// Decoding is memory bound, so the point is to read only the kept rows of w:
// 0. thresholds, where the caller gives none (the one-call decode step): each row's top-k
//    threshold (top_k_thresholds below) or the calibrated one;
// 1. gather (one thread per half of the channels): the channels that any row keeps, ascending,
//    as a list of row indices, and x compacted to those channels per row (0 where a row drops a
//    channel that another row keeps);
// 2. stream (every thread): the kept rows of w a block at a time, side by side (sequential
//    streams for the hardware prefetchers, short rows read from both ends so that no stream
//    runs on into a skipped row, and the same position of the rows a few blocks ahead
//    prefetched in software: the prefetchers cannot guess which rows come next), multiplied
//    into fp32 sums of a tile of columns that stays in L1 (as wide as M rows of sums allow, so
//    that for few rows each kept row is read as one long contiguous run). The channels below
//    and above the middle of K are summed separately: for M <= SPLIT_K_ROWS two threads take
//    one half each and read whole rows, otherwise each thread takes both halves of a range of
//    the columns;
// 3. combine: both halves' sums, the bias, one rounding, the store.
// The arithmetic is one FMA per product (fp16, fp32; bf16 on CPUs without AVX512_BF16) or one
// VDPBF16PS per two products (bf16). It grows with M, and the union of the rows' kept channels
// grows with M too: one row streams at memory speed, 16 rows are bound by the arithmetic.
//
// Two instruction sets, chosen by the compiler's flags: AVX-512 (with AVX512-BF16 where the flags
// allow it) and AVX2 with FMA and F16C, for CPUs without AVX-512 (e.g. AMD Zen 2 and 3). The AVX2
// code does the same FMAs in the same order on 8-lane vectors, so its results equal the AVX-512
// FMA path's bit for bit (the tests check it where a CPU runs both).
//
// Each output element is (FMA chain over its row's kept channels in the first half of K, in
// ascending order) + (the same in the second half) + bias, whatever the tiling, the thread count
// or the other rows of the batch (their channels add exact zeros to the chains): the kernel is
// batch invariant and thread-count invariant, bit for bit (weights must be finite: 0 * inf would
// not be a zero).
//
// The phases run on a team of threads with a barrier between them: an OpenMP team of its own
// for the standalone call, the caller's for sparse_entry (kernels/csrc/cpu_ops.c's one-call
// decode step).
//
// Built once per weight type and instruction set as a CPython extension module: -DTANDEM_BF16
// gives module sparse_linear_bf16, -DTANDEM_F16 sparse_linear_f16, -DTANDEM_F32
// sparse_linear_f32, with the suffix _avx2 for AVX2. x has the weight's type; norms and
// thresholds are fp32.

#define PY_SSIZE_T_CLEAN
#include <Python.h>  // first, as Python requires

#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if !defined(__AVX512F__) && !(defined(__AVX2__) && defined(__FMA__) && defined(__F16C__))
#error "build with AVX-512 (-mavx512f -mavx512bw -mavx512vl -mfma) or AVX2 (-mavx2 -mfma -mf16c)"
#endif

#define MAX_M 16
#define LANES 16      // channels per step of the AVX-512 gather; K's split is a multiple of it
#define GROUP 32      // columns per group: two fp32 vectors (one 64-byte load of bf16/fp16)
#define AHEAD_MAX 64  // the index list is padded this far past its end for prefetches
#define INLINE static inline __attribute__((always_inline))

// Tuning knobs (-D overrides them for experiments). The values below measured best on a 2-core
// AMX-capable Xeon VM, where 2 or 8 rows per block, other prefetch distances, prefetches into L2
// or none, and narrower or wider tiles were all slower or no faster. On a Zen 4 EPYC prefetches
// into L2 streamed 20-25% faster (session 13); by session 28 non-temporal ones (_MM_HINT_NTA)
// took 0.94-0.97 of L2's time at one input row and 0.88 at eight where the VM read 80 GB/s
// (kernels/sparse.py builds it so on AMD CPUs); the rest is as good there.
// On another Xeon VM (2026-11-23) 8 rows per block made the memory-bound stream of 1 or 2 input
// rows 20-22% faster (bench/ab_kernel_flags.py --kernel sparse), 4 the rest; on the Zen 4 8 and
// 4 were equal, until it ran compute about twice as fast (session 27): there 4 took 0.83 of 8's
// time at one input row and 0.90 at two (kernels/sparse.py builds it so on AMD CPUs), where
// prefetching 2 or 4 KB ahead instead of 8 changed nothing (1.00). The AVX2 code streams one
// row as fast as the AVX-512 code on the Zen 4 (14 ms for a decode step's 96 projections at half
// the channels, prefetches into L2 both).
#ifndef BLOCK_ROWS  // kept rows of w streamed side by side (even: VDPBF16PS takes pairs)
#define BLOCK_ROWS 4
#endif
#ifndef BLOCK_ROWS_FEW  // the same for up to SPLIT_K_ROWS input rows: more streams in flight
#if defined(__AVX512F__)
#define BLOCK_ROWS_FEW 8
#else  // 16 registers: four rows' weights (two vectors each) and the sums
#define BLOCK_ROWS_FEW 4
#endif
#endif
#define MAX_BLOCK_ROWS (BLOCK_ROWS > BLOCK_ROWS_FEW ? BLOCK_ROWS : BLOCK_ROWS_FEW)
#ifndef SPLIT_K_ROWS  // up to this many rows, threads split the rows of w, above, the columns
#define SPLIT_K_ROWS 2
#endif
#ifndef PARALLEL_MIN_BYTES  // below this many weight bytes read, one thread
#define PARALLEL_MIN_BYTES (128 * 1024)
#endif
#ifndef TILE_ACC_BYTES  // accumulator bytes per tile (all rows): half of a 48 KB L1
#define TILE_ACC_BYTES (24 * 1024)
#endif
#ifndef PREFETCH_BYTES  // weight bytes prefetched ahead of the block being multiplied, about
#define PREFETCH_BYTES (8 * 1024)
#endif
#ifndef CONVERGE_BYTES  // runs of a row up to this long are read from both ends (multiply_rows)
#define CONVERGE_BYTES 8192
#endif
#ifndef PREFETCH_HINT
#define PREFETCH_HINT _MM_HINT_T0
#endif

// Macros, not an enum: #if compares them.
#define BF16 1
#define F16 2
#define F32 3

#if defined(TANDEM_BF16)
#define DT BF16
#define TYPE_MODULE sparse_linear_bf16
#elif defined(TANDEM_F16)
#define DT F16
#define TYPE_MODULE sparse_linear_f16
#elif defined(TANDEM_F32)
#define DT F32
#define TYPE_MODULE sparse_linear_f32
#else
#error "define TANDEM_BF16, TANDEM_F16 or TANDEM_F32"
#endif

#define PASTE_(a, b) a##b
#define PASTE(a, b) PASTE_(a, b)
#define QUOTE_(a) #a
#define QUOTE(a) QUOTE_(a)
#if defined(__AVX512F__)
#define MODULE_ID TYPE_MODULE
#else
#define MODULE_ID PASTE(TYPE_MODULE, _avx2)
#endif
#define MODULE_NAME QUOTE(MODULE_ID)
#define MODULE_INIT PASTE(PyInit_, MODULE_ID)

#define ELEM (DT == F32 ? 4 : 2)  // bytes per element

// bf16 on CPUs with AVX512_BF16 (built with -mavx512bf16): pairs of kept rows through VDPBF16PS,
// two products per instruction, where fp16, fp32 and bf16 elsewhere take one FMA per product.
// VDPBF16PS adds the product of the odd (high) halves and then that of the even halves, each
// rounded as an FMA rounds (checked bit for bit against two FMAs in the tests), so with the
// earlier row of each pair in the odd halves it computes the same chain as the FMAs, in the same
// order, apart from its flushing of subnormals to zero.
#if DT == BF16 && defined(__AVX512BF16__)
#define DOT_PAIRS 1
#else
#define DOT_PAIRS 0
#endif

// ---------------------------------------------------------------------------------------------
// Groups of GROUP columns: their accumulators, loads and stores, and x's elements, per
// instruction set.

#if defined(__AVX512F__)
// A group is a pair of fp32 vectors of accumulators, in an order that suits the loads:
// - fp16, fp32: the first and the second 16 columns;
// - bf16 with FMAs: the even and the odd columns (one AND or shift each, no shuffle);
// - bf16 with VDPBF16PS: columns 0-3, 8-11, 16-19, 24-27 and 4-7, 12-15, 20-23, 28-31, the order
//   in which unpacking the 16-bit words of two rows into pairs leaves them.
// load_group (weights, FMA path) and load_bias / store_group (all paths) use the same order.

typedef struct {
    __m512 a, b;
} pair_t;

typedef __mmask32 tail_t;  // the columns of the partial last group of the matrix
#define TAIL_OF(count) ((__mmask32)((1ull << (count)) - 1))

INLINE pair_t widen(__m512i bits) {  // 32 bf16
    const __m512i high = _mm512_set1_epi32((int)0xffff0000u);
    return (pair_t){_mm512_castsi512_ps(_mm512_slli_epi32(bits, 16)),
                    _mm512_castsi512_ps(_mm512_and_si512(bits, high))};
}

INLINE pair_t load_group(const char *p) {
#if DT == BF16
    return widen(_mm512_loadu_si512(p));
#elif DT == F16
    return (pair_t){_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p)),
                    _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p + 32)))};
#else
    return (pair_t){_mm512_loadu_ps(p), _mm512_loadu_ps(p + 64)};
#endif
}

// Only the columns in `mask` are read; the others are 0.
INLINE pair_t load_group_masked(const char *p, __mmask32 mask) {
#if DT == BF16
    return widen(_mm512_maskz_loadu_epi16(mask, p));
#elif DT == F16
    return (pair_t){_mm512_cvtph_ps(_mm256_maskz_loadu_epi16((__mmask16)mask, p)),
                    _mm512_cvtph_ps(_mm256_maskz_loadu_epi16((__mmask16)(mask >> 16), p + 32))};
#else
    return (pair_t){_mm512_maskz_loadu_ps((__mmask16)mask, p),
                    _mm512_maskz_loadu_ps((__mmask16)(mask >> 16), p + 64)};
#endif
}

#if DT == BF16
// fp32 bits rounded to nearest even at bit 16, as torch narrows fp32 to bf16. No NaN special
// case: a NaN here comes from bf16 operands or is the default NaN, so its payload lies in the top
// 16 bits and the rounding increment cannot carry it into an infinity.
INLINE __m512i round_bf16(__m512 v) {
    const __m512i bits = _mm512_castps_si512(v);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    return _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff)));
}

INLINE __m512i narrow_bf16(pair_t v) {  // 32 bf16 in column order
#if DOT_PAIRS
    // Per 128-bit lane, 4 columns from a then the next 4 from b: what packus puts side by side.
    return _mm512_packus_epi32(_mm512_srli_epi32(round_bf16(v.a), 16),
                               _mm512_srli_epi32(round_bf16(v.b), 16));
#else
    // Even columns from a, odd from b, interleaved back.
    const __m512i high = _mm512_set1_epi32((int)0xffff0000u);
    return _mm512_or_si512(_mm512_srli_epi32(round_bf16(v.a), 16),
                           _mm512_and_si512(round_bf16(v.b), high));
#endif
}
#endif

#if DOT_PAIRS
INLINE pair_t unpack_bf16(__m512i bits) {  // 32 bf16 into the VDPBF16PS order, as fp32
    const __m512i zero = _mm512_setzero_si512();
    return (pair_t){_mm512_castsi512_ps(_mm512_unpacklo_epi16(zero, bits)),
                    _mm512_castsi512_ps(_mm512_unpackhi_epi16(zero, bits))};
}
#endif

INLINE pair_t load_bias(const char *p) {
#if DOT_PAIRS
    return unpack_bf16(_mm512_loadu_si512(p));
#else
    return load_group(p);
#endif
}

INLINE pair_t load_bias_masked(const char *p, __mmask32 mask) {
#if DOT_PAIRS
    return unpack_bf16(_mm512_maskz_loadu_epi16(mask, p));
#else
    return load_group_masked(p, mask);
#endif
}

#define TO_HALF(v) _mm512_cvtps_ph((v), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)

INLINE void store_group(char *p, pair_t v) {
#if DT == BF16
    _mm512_storeu_si512(p, narrow_bf16(v));
#elif DT == F16
    _mm256_storeu_si256((__m256i *)p, TO_HALF(v.a));
    _mm256_storeu_si256((__m256i *)(p + 32), TO_HALF(v.b));
#else
    _mm512_storeu_ps(p, v.a);
    _mm512_storeu_ps(p + 64, v.b);
#endif
}

INLINE void store_group_masked(char *p, __mmask32 mask, pair_t v) {
#if DT == BF16
    _mm512_mask_storeu_epi16(p, mask, narrow_bf16(v));
#elif DT == F16
    _mm256_mask_storeu_epi16(p, (__mmask16)mask, TO_HALF(v.a));
    _mm256_mask_storeu_epi16(p + 32, (__mmask16)(mask >> 16), TO_HALF(v.b));
#else
    _mm512_mask_storeu_ps(p, (__mmask16)mask, v.a);
    _mm512_mask_storeu_ps(p + 64, (__mmask16)(mask >> 16), v.b);
#endif
}

INLINE __m512 load16_masked(const char *p, __mmask16 mask) {  // 16 elements of x
#if DT == BF16
    const __m512i bits = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(bits, 16));
#elif DT == F16
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, p));
#else
    return _mm512_maskz_loadu_ps(mask, p);
#endif
}

// 16 elements of x with the channels outside `keep` zeroed (+0, as masked_fill), stored where
// `valid`: the input a sparse model's adapters see.
INLINE void store_masked(const char *x, char *out, __mmask16 keep, __mmask16 valid) {
#if DT == F32
    _mm512_mask_storeu_ps(out, valid, _mm512_maskz_loadu_ps(keep, x));
#else
    _mm256_mask_storeu_epi16(out, valid, _mm256_maskz_loadu_epi16(keep, x));
#endif
}

// out[group] = (the first half's sums + the second half's) + bias, rounded once; `last`: the
// partial last group of the matrix, `tail` its columns.
INLINE void combine_group(const float *low, const float *high, const char *bias, char *out,
                          int last, tail_t tail) {
    pair_t y = {_mm512_add_ps(_mm512_load_ps(low), _mm512_load_ps(high)),
                 _mm512_add_ps(_mm512_load_ps(low + LANES), _mm512_load_ps(high + LANES))};
    if (bias) {
        const pair_t b = last ? load_bias_masked(bias, tail) : load_bias(bias);
        y.a = _mm512_add_ps(y.a, b.a);
        y.b = _mm512_add_ps(y.b, b.b);
    }
    if (last) {
        store_group_masked(out, tail, y);
    } else {
        store_group(out, y);
    }
}

#else
// AVX2: a group is two slices of 16 columns, each two fp32 vectors of 8 accumulators: for fp16
// and fp32 the slice's first and second 8 columns, for bf16 its even and odd columns (one
// 32-byte load widened by a shift and an AND). Partial slices go through a zeroed buffer
// (AVX2 has no masked loads of 16-bit elements); they only occur at the end of a row.

#define SLICE 16

typedef struct {
    __m256 a, b;
} slice_t;

typedef int tail_t;  // the columns of the partial last group of the matrix
#define TAIL_OF(count) ((int)(count))

INLINE slice_t load_slice(const char *p) {
#if DT == BF16
    const __m256i bits = _mm256_loadu_si256((const __m256i *)p);
    const __m256i high = _mm256_set1_epi32((int)0xffff0000u);
    return (slice_t){_mm256_castsi256_ps(_mm256_slli_epi32(bits, 16)),
                     _mm256_castsi256_ps(_mm256_and_si256(bits, high))};
#elif DT == F16
    return (slice_t){_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)),
                     _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + 16)))};
#else
    return (slice_t){_mm256_loadu_ps((const float *)p), _mm256_loadu_ps((const float *)(p + 32))};
#endif
}

// The first `count` columns (none where count <= 0), the others 0.
INLINE slice_t load_slice_part(const char *p, int count) {
    if (count >= SLICE) return load_slice(p);
    _Alignas(32) char buffer[SLICE * ELEM] = {0};
    if (count > 0) memcpy(buffer, p, (size_t)count * ELEM);
    return load_slice(buffer);
}

#if DT == BF16
// fp32 bits rounded to nearest even at bit 16, as round_bf16 above.
INLINE __m256i round_bf16(__m256 v) {
    const __m256i bits = _mm256_castps_si256(v);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    return _mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff)));
}
#endif

INLINE void store_slice(char *p, slice_t v) {
#if DT == BF16
    // Even columns from a, odd from b, interleaved back.
    const __m256i high = _mm256_set1_epi32((int)0xffff0000u);
    _mm256_storeu_si256((__m256i *)p,
                        _mm256_or_si256(_mm256_srli_epi32(round_bf16(v.a), 16),
                                        _mm256_and_si256(round_bf16(v.b), high)));
#elif DT == F16
    _mm_storeu_si128((__m128i *)p, _mm256_cvtps_ph(v.a, _MM_FROUND_TO_NEAREST_INT));
    _mm_storeu_si128((__m128i *)(p + 16), _mm256_cvtps_ph(v.b, _MM_FROUND_TO_NEAREST_INT));
#else
    _mm256_storeu_ps((float *)p, v.a);
    _mm256_storeu_ps((float *)(p + 32), v.b);
#endif
}

INLINE void store_slice_part(char *p, slice_t v, int count) {
    if (count >= SLICE) {
        store_slice(p, v);
    } else if (count > 0) {
        _Alignas(32) char buffer[SLICE * ELEM];
        store_slice(buffer, v);
        memcpy(p, buffer, (size_t)count * ELEM);
    }
}

// 8 elements of x as fp32; the first `count` of them (the others 0).
INLINE __m256 load8(const char *p) {
#if DT == BF16
    const __m256i bits = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(bits, 16));
#elif DT == F16
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
#else
    return _mm256_loadu_ps((const float *)p);
#endif
}

INLINE __m256 load8_part(const char *p, int count) {
    if (count >= 8) return load8(p);
    _Alignas(32) char buffer[8 * ELEM] = {0};
    memcpy(buffer, p, (size_t)count * ELEM);
    return load8(buffer);
}

INLINE __m256 load8_f32_part(const float *p, int count) {  // norms
    if (count >= 8) return _mm256_loadu_ps(p);
    _Alignas(32) float buffer[8] = {0};
    memcpy(buffer, p, (size_t)count * sizeof(float));
    return _mm256_loadu_ps(buffer);
}

// All ones in the 32-bit lanes whose bit of `bits` is set.
INLINE __m256i lanes_of(unsigned bits) {
    const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    return _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32((int)bits), bit), bit);
}

// The first `count` of 8 elements of x with the channels outside `keep` zeroed (+0, as
// masked_fill): the input a sparse model's adapters see.
INLINE void store_masked(const char *x, char *out, unsigned keep, int count) {
    _Alignas(32) char buffer[8 * ELEM] = {0};
    memcpy(buffer, x, (size_t)count * ELEM);
    const __m256i lanes = lanes_of(keep);
#if DT == F32
    _mm256_store_si256((__m256i *)buffer,
                       _mm256_and_si256(_mm256_load_si256((const __m256i *)buffer), lanes));
#else
    const __m128i words = _mm_packs_epi32(_mm256_castsi256_si128(lanes),
                                          _mm256_extracti128_si256(lanes, 1));
    _mm_store_si128((__m128i *)buffer,
                    _mm_and_si128(_mm_load_si128((const __m128i *)buffer), words));
#endif
    memcpy(out, buffer, (size_t)count * ELEM);
}

// As combine_group above, one slice at a time.
INLINE void combine_group(const float *low, const float *high, const char *bias, char *out,
                          int last, tail_t tail) {
    for (int s = 0; s < GROUP / SLICE; s++) {
        const int count = last ? tail - s * SLICE : SLICE;
        if (count <= 0) break;
        const float *l = low + s * SLICE, *h = high + s * SLICE;
        slice_t y = {_mm256_add_ps(_mm256_load_ps(l), _mm256_load_ps(h)),
                     _mm256_add_ps(_mm256_load_ps(l + 8), _mm256_load_ps(h + 8))};
        if (bias) {
            const slice_t b = load_slice_part(bias + s * SLICE * ELEM, count);
            y.a = _mm256_add_ps(y.a, b.a);
            y.b = _mm256_add_ps(y.b, b.b);
        }
        store_slice_part(out + s * SLICE * ELEM, y, count);
    }
}
#endif

// ---------------------------------------------------------------------------------------------
// Per-thread buffers, grown as needed and kept: allocating per call would fault in fresh pages
// every time. Never freed; the threads (the caller's, OpenMP's pool) are long-lived.

static __thread int32_t *index_cache;
static __thread int64_t index_capacity;
static __thread float *values_cache;
static __thread int64_t values_capacity;
static __thread float *sums_cache;
static __thread int64_t sums_capacity;
static __thread float *private_sums;  // of the OpenMP threads
static __thread int64_t private_capacity;
#if DOT_PAIRS
static __thread uint32_t *pairs_cache;
static __thread int64_t pairs_capacity;
#endif

static void *grow(void *buffer, int64_t *capacity, int64_t count, size_t size) {
    if (count <= *capacity) return buffer;
    free(buffer);
    const size_t bytes = ((size_t)count * size + 63) / 64 * 64;
    void *fresh = aligned_alloc(64, bytes);
    *capacity = fresh ? count : 0;
    return fresh;
}

// ---------------------------------------------------------------------------------------------
// Gather: the kept channels of the union among channels [j_begin, j_end) (j_begin a multiple
// of 16), ascending, appended at entry `kept` of `index`, and x of each row compacted to them
// (0 where the row drops the channel) into values[t * ldv ...]; where `masked` is not NULL,
// also x of each row with the channels it drops zeroed, masked [m][ldm] (x's type). Returns
// the new entry count.

#if defined(__AVX512F__)
static int64_t gather(const char *x, int64_t ldx, const float *norms, const float *thresholds,
                      int64_t m, int64_t j_begin, int64_t j_end, int32_t *index, float *values,
                      int64_t ldv, int64_t kept, char *masked, int64_t ldm) {
    const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    __mmask16 keep[MAX_M];
    for (int64_t j0 = j_begin; j0 < j_end; j0 += LANES) {
        const __mmask16 valid =
            j_end - j0 >= LANES ? 0xffff : (__mmask16)((1u << (j_end - j0)) - 1);
        const __m512 norm = norms ? _mm512_maskz_loadu_ps(valid, norms + j0) : _mm512_set1_ps(1.0f);
        __mmask16 any = 0;
        for (int64_t t = 0; t < m; t++) {
            const __m512 xv = load16_masked(x + (t * ldx + j0) * ELEM, valid);
            // |x| * norm, one rounding, as channel_scores computes it (|x| * 1 is exact for
            // TEAL); >= is false for NaN, as in torch.
            const __m512 score = _mm512_mul_ps(_mm512_abs_ps(xv), norm);
            keep[t] = _mm512_mask_cmp_ps_mask(valid, score, _mm512_set1_ps(thresholds[t]),
                                              _CMP_GE_OQ);
            any |= keep[t];
        }
        for (int64_t t = 0; masked != NULL && t < m; t++) {
            store_masked(x + (t * ldx + j0) * ELEM, masked + (t * ldm + j0) * ELEM, keep[t], valid);
        }
        if (!any) continue;
        // Full-width stores of compressed vectors (faster than compress-stores to memory); the
        // buffers have slack past k.
        const __m512i channels = _mm512_add_epi32(iota, _mm512_set1_epi32((int)j0));
        _mm512_storeu_si512(index + kept, _mm512_maskz_compress_epi32(any, channels));
        for (int64_t t = 0; t < m; t++) {
            const __m512 xv = load16_masked(x + (t * ldx + j0) * ELEM, keep[t]);
            _mm512_storeu_ps(values + t * ldv + kept, _mm512_maskz_compress_ps(any, xv));
        }
        kept += __builtin_popcount(any);
    }
    return kept;
}

#if DOT_PAIRS
// The compacted x of each row as bf16 pairs, pairs[t * ldp + q] = (x of entry 2q + 1 in the low
// half, x of entry 2q in the high half), for an even number of entries. The values are exact
// bf16 values in fp32, so their top halves are their bf16 bits.
static void build_pairs(const float *values, int64_t ldv, int64_t rows, int64_t entries,
                        uint32_t *pairs, int64_t ldp) {
    const __m512i high = _mm512_set1_epi32((int)0xffff0000u);
    const int64_t count = entries / 2;  // even
    for (int64_t t = 0; t < rows; t++) {
        const float *v = values + t * ldv;
        for (int64_t q = 0; q < count; q += 8) {  // 16 entries, 8 pairs
            const __m512i first = _mm512_loadu_si512(v + 2 * q);
            const __m512i second = _mm512_loadu_si512(v + 2 * q + 1);
            const __m512i both = _mm512_or_si512(_mm512_and_si512(first, high),
                                                 _mm512_srli_epi32(second, 16));
            _mm256_storeu_si256((__m256i *)(pairs + t * ldp + q),
                                _mm512_castsi512_si256(_mm512_maskz_compress_epi32(0x5555, both)));
        }
    }
}
#endif

#else
// AVX2 has no compress: COMPRESS[bits] lists the lanes whose bit is set, first, for one
// permute per 8 channels (filled when the module loads).
static int32_t COMPRESS[256][8];

static void fill_compress_table(void) {
    for (int bits = 0; bits < 256; bits++) {
        int count = 0;
        for (int lane = 0; lane < 8; lane++) {
            if (bits >> lane & 1) COMPRESS[bits][count++] = lane;
        }
        while (count < 8) COMPRESS[bits][count++] = 0;
    }
}

static int64_t gather(const char *x, int64_t ldx, const float *norms, const float *thresholds,
                      int64_t m, int64_t j_begin, int64_t j_end, int32_t *index, float *values,
                      int64_t ldv, int64_t kept, char *masked, int64_t ldm) {
    const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    unsigned keep[MAX_M];
    for (int64_t j0 = j_begin; j0 < j_end; j0 += 8) {
        const int count = j_end - j0 >= 8 ? 8 : (int)(j_end - j0);
        const unsigned valid = (1u << count) - 1;
        const __m256 norm = norms ? load8_f32_part(norms + j0, count) : _mm256_set1_ps(1.0f);
        unsigned any = 0;
        for (int64_t t = 0; t < m; t++) {
            const __m256 xv = load8_part(x + (t * ldx + j0) * ELEM, count);
            // As in the AVX-512 gather: |x| * norm, one rounding; >= is false for NaN.
            const __m256 score = _mm256_mul_ps(_mm256_and_ps(xv, magnitude), norm);
            const __m256 hit = _mm256_cmp_ps(score, _mm256_set1_ps(thresholds[t]), _CMP_GE_OQ);
            keep[t] = valid & (unsigned)_mm256_movemask_ps(hit);
            any |= keep[t];
        }
        for (int64_t t = 0; masked != NULL && t < m; t++) {
            store_masked(x + (t * ldx + j0) * ELEM, masked + (t * ldm + j0) * ELEM, keep[t], count);
        }
        if (!any) continue;
        // Full-width stores (the buffers have slack past k).
        const __m256i order = _mm256_loadu_si256((const __m256i *)COMPRESS[any]);
        const __m256i channels = _mm256_add_epi32(iota, _mm256_set1_epi32((int)j0));
        _mm256_storeu_si256((__m256i *)(index + kept),
                            _mm256_permutevar8x32_epi32(channels, order));
        for (int64_t t = 0; t < m; t++) {
            const __m256 xv = _mm256_and_ps(load8_part(x + (t * ldx + j0) * ELEM, count),
                                            _mm256_castsi256_ps(lanes_of(keep[t])));
            _mm256_storeu_ps(values + t * ldv + kept, _mm256_permutevar8x32_ps(xv, order));
        }
        kept += __builtin_popcount(any);
    }
    return kept;
}
#endif

// ---------------------------------------------------------------------------------------------
// Stream.

// The two halves of K (channels below and from K_SPLIT(k)) are two separate sums, added at the
// end, so that two threads can stream whole rows of w (half of the rows each) rather than half
// of every row, which short rows (n of 1000 or so) need to approach the memory bandwidth when
// few input rows make the work memory bound (up to SPLIT_K_ROWS; with more, the arithmetic
// bounds it and threads split the columns instead, each summing both halves). Always two sums,
// however many threads and input rows, so that the result depends on neither; split at a fixed
// channel, never by the kept channels, so that a row's result does not depend on the others.
#define PARTS 2
#define K_SPLIT(k) ((k) / 2 / LANES * LANES)

typedef struct {
    const char *w;                // [k, n]
    const int32_t *index;         // [entries + AHEAD_MAX]
    const void *x;                // [rows][ldx]: compacted x (fp32), or its bf16 pairs (DOT_PAIRS)
    const char *bias;             // [n] or NULL
    char *out;                    // [m, n]
    float *sums;                  // [PARTS][rows][lds]: each half's sums
    int64_t ldx, lds, m, n;
    int64_t begin[PARTS], end[PARTS];  // each half's entries: [begin[p], end[p])
    int64_t full_groups;          // groups of 32 columns without the partial last one
    tail_t tail;                  // columns of the partial last group
} job_t;

// One group of columns of the tile (at byte `offset` of the rows; `acc` its accumulators, row t
// at acc + t * lda) times R kept rows: the R rows' weights loaded once, then each input row's
// accumulators updated in entry order. x: the rows' compacted x from the first of the R entries.
INLINE void multiply_group(const job_t *job, const char *const *row, const char *const *next,
                           const void *x, float *acc, int64_t lda, int64_t offset,
                           tail_t tail, const int T, const int R, const int MASKED) {
    const int64_t ldx = job->ldx;  // a local: the stores below may alias *job
#pragma GCC unroll 4
    for (int r = 0; r < R; r++) {
#pragma GCC unroll 2
        for (int line = 0; line < GROUP * ELEM; line += 64) {
            if (PREFETCH_BYTES) _mm_prefetch(next[r] + offset + line, PREFETCH_HINT);
        }
    }
#if DOT_PAIRS
    // Pair q = rows 2q (earlier: the high halves) and 2q + 1 (the low halves), column by column.
    __m512bh lo[MAX_BLOCK_ROWS / 2], hi[MAX_BLOCK_ROWS / 2];
#pragma GCC unroll 2
    for (int q = 0; q < R / 2; q++) {
        const char *first = row[2 * q] + offset, *second = row[2 * q + 1] + offset;
        const __m512i a =
            MASKED ? _mm512_maskz_loadu_epi16(tail, first) : _mm512_loadu_si512(first);
        const __m512i b =
            MASKED ? _mm512_maskz_loadu_epi16(tail, second) : _mm512_loadu_si512(second);
        lo[q] = (__m512bh)_mm512_unpacklo_epi16(b, a);
        hi[q] = (__m512bh)_mm512_unpackhi_epi16(b, a);
    }
    const uint32_t *pairs = x;
#pragma GCC unroll 16
    for (int t = 0; t < T; t++) {
        float *a = acc + t * lda;
        __m512 acc_lo = _mm512_load_ps(a), acc_hi = _mm512_load_ps(a + LANES);
#pragma GCC unroll 2
        for (int q = 0; q < R / 2; q++) {
            const __m512bh xp = (__m512bh)_mm512_set1_epi32((int)pairs[t * ldx + q]);
            acc_lo = _mm512_dpbf16_ps(acc_lo, lo[q], xp);
            acc_hi = _mm512_dpbf16_ps(acc_hi, hi[q], xp);
        }
        _mm512_store_ps(a, acc_lo);
        _mm512_store_ps(a + LANES, acc_hi);
    }
#elif defined(__AVX512F__)
    pair_t w[MAX_BLOCK_ROWS];
#pragma GCC unroll 4
    for (int r = 0; r < R; r++) {
        w[r] = MASKED ? load_group_masked(row[r] + offset, tail) : load_group(row[r] + offset);
    }
    const float *values = x;
#pragma GCC unroll 16
    for (int t = 0; t < T; t++) {
        float *a = acc + t * lda;
        __m512 lo = _mm512_load_ps(a), hi = _mm512_load_ps(a + LANES);
#pragma GCC unroll 4
        for (int r = 0; r < R; r++) {
            const __m512 xb = _mm512_set1_ps(values[t * ldx + r]);
            lo = _mm512_fmadd_ps(w[r].a, xb, lo);
            hi = _mm512_fmadd_ps(w[r].b, xb, hi);
        }
        _mm512_store_ps(a, lo);
        _mm512_store_ps(a + LANES, hi);
    }
#else
    // The same FMAs one slice at a time (the R rows' weights of a whole group would not fit in
    // the 16 registers).
    const float *values = x;
#pragma GCC unroll 2
    for (int s = 0; s < GROUP / SLICE; s++) {
        const int64_t at = offset + s * SLICE * ELEM;
        slice_t w[MAX_BLOCK_ROWS];
#pragma GCC unroll 8
        for (int r = 0; r < R; r++) {
            w[r] = MASKED ? load_slice_part(row[r] + at, tail - s * SLICE)
                          : load_slice(row[r] + at);
        }
#pragma GCC unroll 16
        for (int t = 0; t < T; t++) {
            float *a = acc + t * lda + s * SLICE;
            __m256 lo = _mm256_load_ps(a), hi = _mm256_load_ps(a + 8);
#pragma GCC unroll 8
            for (int r = 0; r < R; r++) {
                const __m256 xb = _mm256_set1_ps(values[t * ldx + r]);
                lo = _mm256_fmadd_ps(w[r].a, xb, lo);
                hi = _mm256_fmadd_ps(w[r].b, xb, hi);
            }
            _mm256_store_ps(a, lo);
            _mm256_store_ps(a + 8, hi);
        }
    }
#endif
}

// R kept rows (entries c .. c + R - 1) into the tile's accumulators: `groups` groups from column
// col0, the last one the partial last group of the matrix when `partial`.
INLINE void multiply_rows(const job_t *job, float *acc, int64_t lda, int64_t col0, int64_t groups,
                          int partial, int64_t c, int64_t ahead, const int T, const int R) {
    const int64_t row_bytes = job->n * ELEM;
    const char *base = job->w + col0 * ELEM;
    const char *row[MAX_BLOCK_ROWS], *next[MAX_BLOCK_ROWS];
#pragma GCC unroll 4
    for (int r = 0; r < R; r++) {
        row[r] = base + job->index[c + r] * row_bytes;
        next[r] = base + job->index[c + r + ahead] * row_bytes;
    }
#if DOT_PAIRS
    const void *x = (const uint32_t *)job->x + c / 2;
#else
    const void *x = (const float *)job->x + c;
#endif
    const int64_t full = groups - partial;
    // A short run of each row (at most CONVERGE_BYTES) is read from both ends towards its
    // middle: the hardware prefetchers run on past the end of a stream, and where rows are
    // skipped that reads a row nobody wants (with half of 1792-byte rows kept, ascending reads
    // streamed 10-20% slower). Each group's sums are independent of the others': same bits.
    if (groups * GROUP * ELEM <= CONVERGE_BYTES) {
        for (int64_t low = 0, high = full - 1; low <= high; low++, high--) {
            multiply_group(job, row, next, x, acc + low * GROUP, lda, low * GROUP * ELEM, 0, T,
                           R, 0);
            if (high == low) break;
            multiply_group(job, row, next, x, acc + high * GROUP, lda, high * GROUP * ELEM, 0, T,
                           R, 0);
        }
    } else {
        for (int64_t g = 0; g < full; g++) {
            multiply_group(job, row, next, x, acc + g * GROUP, lda, g * GROUP * ELEM, 0, T, R, 0);
        }
    }
    if (partial) {
        multiply_group(job, row, next, x, acc + full * GROUP, lda, full * GROUP * ELEM, job->tail,
                       T, R, 1);
    }
}

// Accumulators in L1 for this many groups of columns (at least one).
#define TILE_GROUPS(T) \
    (TILE_ACC_BYTES / ((T) * GROUP * 4) > 0 ? TILE_ACC_BYTES / ((T) * GROUP * 4) : 1)

// Half `part` of the kept rows into its sums, for groups [g0, g1) of the columns, in tiles of
// columns whose accumulators (T rows) stay in L1.
INLINE void run_part(const job_t *job, int part, int64_t g0, int64_t g1, const int T) {
    const int64_t max_groups = TILE_GROUPS(T);
    const int64_t tiles = (g1 - g0 + max_groups - 1) / max_groups;
    const int64_t first = job->begin[part], end = job->end[part], lds = job->lds;
    float *sums = job->sums + part * T * lds;
    const int block = T <= SPLIT_K_ROWS ? BLOCK_ROWS_FEW : BLOCK_ROWS;
    for (int64_t tile = 0; tile < tiles; tile++) {
        // Tiles of equal width, give or take a group.
        const int64_t t0 = g0 + (g1 - g0) * tile / tiles, t1 = g0 + (g1 - g0) * (tile + 1) / tiles;
        const int64_t groups = t1 - t0, col0 = t0 * GROUP;
        const int partial = t1 > job->full_groups;
        float *acc = sums + col0;
        for (int t = 0; t < T; t++) memset(acc + t * lds, 0, groups * GROUP * sizeof(float));
        // Prefetch far enough ahead to keep about PREFETCH_BYTES in flight, whole blocks.
        const int64_t block_bytes = block * groups * GROUP * ELEM;
        int64_t ahead = block * ((PREFETCH_BYTES + block_bytes - 1) / block_bytes);
        if (ahead > AHEAD_MAX) ahead = AHEAD_MAX;
        // Blocks of `block` entries, then the rest: pairs (DOT_PAIRS: each half has an even
        // number of entries, completed with a zero entry) or single rows.
        const int rest = DOT_PAIRS ? 2 : 1;
        int64_t c = first;
        for (; c + block <= end; c += block) {
            multiply_rows(job, acc, lds, col0, groups, partial, c, ahead, T, block);
        }
        for (; c < end; c += rest) {
            multiply_rows(job, acc, lds, col0, groups, partial, c, ahead, T, rest);
        }
    }
}

// out[:, groups [g0, g1)] = (first half's sums + second half's) + bias, rounded once.
static void combine(const job_t *job, int64_t g0, int64_t g1, int rows) {
    const int64_t lds = job->lds, end = g1 < job->full_groups ? g1 : job->full_groups;
    for (int64_t t = 0; t < job->m; t++) {
        const float *low = job->sums + t * lds, *high = job->sums + (rows + t) * lds;
        char *out = job->out + t * job->n * ELEM;
        for (int64_t g = g0; g < g1; g++) {
            const int64_t col = g * GROUP;
            combine_group(low + col, high + col, job->bias ? job->bias + col * ELEM : NULL,
                          out + col * ELEM, g >= end, job->tail);
        }
    }
}

typedef void (*part_fn)(const job_t *, int, int64_t, int64_t);

// One function per row count so the loops over rows unroll fully. Row counts above 8 run as the
// next even one (a zero row costs arithmetic, no reads).
#define DEFINE_PART(T)                                                            \
    static void part_##T(const job_t *job, int part, int64_t g0, int64_t g1) { \
        run_part(job, part, g0, g1, T);                                           \
    }
DEFINE_PART(1)
DEFINE_PART(2)
DEFINE_PART(3)
DEFINE_PART(4)
DEFINE_PART(5)
DEFINE_PART(6)
DEFINE_PART(7)
DEFINE_PART(8)
DEFINE_PART(10)
DEFINE_PART(12)
DEFINE_PART(14)
DEFINE_PART(16)

static const part_fn PARTS_FOR[MAX_M + 1] = {
    0,       part_1,  part_2,  part_3,  part_4,  part_5,  part_6,  part_7, part_8,
    part_10, part_10, part_12, part_12, part_14, part_14, part_16, part_16,
};
// The rows each entry of PARTS_FOR computes (the buffers hold that many rows).
static const int PADDED_ROWS[MAX_M + 1] = {0,  1,  2,  3,  4,  5,  6,  7, 8,
                                           10, 10, 12, 12, 14, 14, 16, 16};

// ---------------------------------------------------------------------------------------------
// The layer by a team of threads, in phases with the team's barrier between them: thresholds
// (top-k: each thread a share of the rows), gather (the first two threads one half of the
// channels each), stream, combine. The standalone call (sparse_linear below) runs it on an
// OpenMP team; kernels/csrc/cpu_ops.c's one-call decode step runs it on its own, by address.

typedef void (*sync_fn)(void *team_context);

// The halves' entries start at fixed places of the lists, so that two threads can gather one
// each: the low half at 0, the high half at HIGH_BASE(k), past the low half's most entries,
// its zero entry and its padding for the prefetches.
#define HIGH_BASE(k) ((K_SPLIT(k) + 2 + AHEAD_MAX + LANES - 1) / LANES * LANES)
// Entries of the lists, with the high half's padding and the slack of full-vector stores.
#define LIST_LENGTH(k) (HIGH_BASE(k) + (k) - K_SPLIT(k) + 2 + AHEAD_MAX + 2 * LANES)

typedef struct {
    const char *x;              // [m][ldx]
    int64_t ldx;
    const char *w;              // [k, n]
    const float *norms;         // [k] or NULL (TEAL)
    const float *thresholds;    // [m], or NULL: found from keep or threshold
    int64_t keep;               // > 0: each row's threshold is its keep-th largest score
    float threshold;            // otherwise every row's
    const char *bias;           // [n] or NULL
    char *out;                  // [m, n]
    int64_t m, n, k;
    char *masked;               // [m, k]: x with the dropped channels zeroed, or NULL: not wanted
} layer_args_t;

typedef struct {
    job_t job;
    const layer_args_t *args;
    const float *thresholds;    // [m]: the caller's, or found (thread 0's thresholds_cache)
    int32_t *index;
    float *values;
    int64_t ldv, ldp;
    int rows;
    int64_t kept[PARTS];
} call_t;

static __thread float thresholds_cache[MAX_M];

static int top_k_thresholds(const char *x, int64_t ldx, const float *norms, float *out,
                            int64_t m, int64_t k, int64_t keep);

// The calling thread's buffers for this call (grown as needed); -1 when one cannot be had.
static int prepare(call_t *call, const layer_args_t *a) {
    const int64_t ldv = (LIST_LENGTH(a->k) + LANES + 15) / 16 * 16;
    // Rows of sums a whole number of groups (128 bytes) long, so that two threads' columns never
    // share an aligned pair of cache lines (the L2 prefetcher fetches lines in pairs: a shared
    // pair bounces between the cores on every store), and not a multiple of 4 KB long (rows of a
    // tile all in the same L1 sets).
    int64_t lds = (a->n + GROUP - 1) / GROUP * GROUP + GROUP;
    if (lds * 4 % 4096 == 0) lds += GROUP;
    const int rows = PADDED_ROWS[a->m];
    index_cache = grow(index_cache, &index_capacity, LIST_LENGTH(a->k), sizeof(int32_t));
    values_cache = grow(values_cache, &values_capacity, rows * ldv, sizeof(float));
    sums_cache = grow(sums_cache, &sums_capacity, PARTS * rows * lds, sizeof(float));
    if (!index_cache || !values_cache || !sums_cache) return -1;
    *call = (call_t){{a->w, index_cache, values_cache, a->bias, a->out, sums_cache, ldv, lds, a->m,
                      a->n, {0, HIGH_BASE(a->k)}, {0, 0}, a->n / GROUP, TAIL_OF(a->n % GROUP)},
                     a, a->thresholds ? a->thresholds : thresholds_cache, index_cache,
                     values_cache, ldv, 0, rows, {0, 0}};
#if DOT_PAIRS
    call->ldp = (ldv / 2 + 2 * LANES + 15) / 16 * 16;
    pairs_cache = grow(pairs_cache, &pairs_capacity, rows * call->ldp, sizeof(uint32_t));
    if (!pairs_cache) return -1;
    call->job.x = pairs_cache;
    call->job.ldx = call->ldp;
#endif
    return 0;
}

// This thread's share of the rows' thresholds, where the caller gave none. -1: no buffer.
static int find_thresholds(const call_t *call, int thread, int team) {
    const layer_args_t *a = call->args;
    if (a->thresholds) return 0;
    const int64_t r0 = a->m * thread / team, r1 = a->m * (thread + 1) / team;
    if (r0 >= r1) return 0;
    float *out = (float *)call->thresholds + r0;  // thread 0's thresholds_cache
    if (a->keep > 0) {
        return top_k_thresholds(a->x + r0 * a->ldx * ELEM, a->ldx, a->norms, out, r1 - r0, a->k,
                                a->keep);
    }
    for (int64_t t = 0; t < r1 - r0; t++) out[t] = a->threshold;
    return 0;
}

// Half `half` of the channels into its entries [begin, end) of the lists: the kept channels
// ascending, an even count where VDPBF16PS pairs them (a zero entry completes an odd one), the
// index padded past the end with valid rows for the prefetches, and x of the padding rows (up
// to PADDED_ROWS) zero. Returns the number of kept channels, without the zero entry.
static int64_t gather_half(call_t *call, int half) {
    const layer_args_t *a = call->args;
    job_t *job = &call->job;
    const int64_t split = K_SPLIT(a->k), begin = job->begin[half], ldv = call->ldv, m = a->m;
    int32_t *index = call->index;
    float *values = call->values;
    int64_t end = gather(a->x, a->ldx, a->norms, call->thresholds, m, half ? split : 0,
                         half ? a->k : split, index, values, ldv, begin, a->masked, a->k);
    const int64_t kept = end - begin;
    if (DOT_PAIRS && kept % 2) {
        index[end] = index[end - 1];
        for (int64_t t = 0; t < m; t++) values[t * ldv + end] = 0.0f;
        end++;
    }
    const int32_t last = end > begin ? index[end - 1] : 0;
    for (int64_t i = 0; i < AHEAD_MAX; i++) index[end + i] = last;
    for (int64_t t = m; t < call->rows; t++) {
        memset(values + t * ldv + begin, 0, (end - begin) * sizeof(float));
    }
#if DOT_PAIRS
    build_pairs(values + begin, ldv, call->rows, end - begin, (uint32_t *)job->x + begin / 2,
                call->ldp);
#endif
    job->end[half] = end;
    return kept;
}

// Streams the kept rows and combines the sums into out: on thread 0 alone where few bytes are
// read, else split as described at the top. Returns 0, or -1 when a buffer cannot be had.
static int stream(const call_t *call, int thread, int team, sync_fn sync, void *context) {
    const job_t *job = &call->job;
    const int64_t groups = (job->n + GROUP - 1) / GROUP;
    const int64_t kept = call->kept[0] + call->kept[1];
    const part_fn run = PARTS_FOR[job->m];
    if (team <= 1 || kept * job->n * ELEM < PARALLEL_MIN_BYTES) {
        if (thread == 0) {
            for (int part = 0; part < PARTS; part++) run(job, part, 0, groups);
            combine(job, 0, groups, call->rows);
        }
        sync(context);
        return 0;
    }
    if (job->m <= SPLIT_K_ROWS) {
        // Threads in twos, one per half of the rows of w, each two a range of the columns (an
        // odd one out idles), into the shared sums; then every thread adds up a range.
        const int64_t couples = team / 2, couple = thread / 2;
        if (couple < couples) {
            const int64_t g0 = groups * couple / couples;
            run(job, thread % 2, g0, groups * (couple + 1) / couples);
        }
        sync(context);
        combine(job, groups * thread / team, groups * (thread + 1) / team, call->rows);
        return 0;
    }
    // Each thread both halves of a range of the columns, into sums of its own: sums that two
    // cores write side by side slow both down (however the lines are aligned).
    const int64_t g0 = groups * thread / team, g1 = groups * (thread + 1) / team;
    job_t mine = *job;
    mine.sums = private_sums = grow(private_sums, &private_capacity,
                                    PARTS * call->rows * job->lds, sizeof(float));
    int status = 0;
    if (mine.sums == NULL) {
        status = -1;
    } else if (g0 < g1) {
        run(&mine, 0, g0, g1);
        run(&mine, 1, g0, g1);
        combine(&mine, g0, g1, call->rows);
    }
    sync(context);
    return status;
}

// This thread's part of the layer; every thread of the team calls it with the same arguments
// and meets the others at sync(context) four times, whatever happens. Thread 0's buffers go to
// the others through *shared. Returns the number of kept channels (the union over the rows),
// or -1 when a buffer cannot be had.
static int64_t sparse_team(const layer_args_t *a, int thread, int team, sync_fn sync,
                           void *context, void **shared) {
    static __thread call_t own;
    int failed = 0;
    if (thread == 0) {
        failed = prepare(&own, a) != 0;
        *shared = failed ? NULL : &own;
    }
    sync(context);
    call_t *call = *shared;
    if (call != NULL) failed |= find_thresholds(call, thread, team) != 0;
    sync(context);
    if (call != NULL && thread < 2) {
        if (team == 1) {
            call->kept[0] = gather_half(call, 0);
            call->kept[1] = gather_half(call, 1);
        } else {
            call->kept[thread] = gather_half(call, thread);
        }
    }
    sync(context);
    if (call == NULL) {
        sync(context);
        return -1;
    }
    failed |= stream(call, thread, team, sync, context) != 0;
    return failed ? -1 : call->kept[0] + call->kept[1];
}

// A spinning barrier for the standalone call's OpenMP team: its phases are short, and OpenMP's
// barrier sleeps where the server asks threads to wait passively (a futex wake-up per phase).
typedef struct {
    atomic_int arrived, generation;
    int size;
} barrier_t;

static void spin_sync(void *context) {
    barrier_t *barrier = context;
    if (barrier->size <= 1) return;
    const int generation = atomic_load_explicit(&barrier->generation, memory_order_acquire);
    if (atomic_fetch_add_explicit(&barrier->arrived, 1, memory_order_acq_rel) ==
        barrier->size - 1) {
        atomic_store_explicit(&barrier->arrived, 0, memory_order_relaxed);
        atomic_store_explicit(&barrier->generation, generation + 1, memory_order_release);
        return;
    }
    for (unsigned spins = 0;
         atomic_load_explicit(&barrier->generation, memory_order_acquire) == generation; spins++) {
        if (spins < (1u << 10)) {
            _mm_pause();
        } else {
            sched_yield();  // more threads than cores: the one awaited may need this core
        }
    }
}

// Returns the number of kept channels, or -1 when a buffer cannot be allocated.
static int64_t sparse_linear(const layer_args_t *a, int threads) {
    void *shared = NULL;
    barrier_t barrier = {0, 0, 1};
    if (threads <= 1 || a->k * a->n * ELEM < PARALLEL_MIN_BYTES) {
        return sparse_team(a, 0, 1, spin_sync, &barrier, &shared);
    }
    int64_t result = 0;
#pragma omp parallel num_threads(threads)
    {
#pragma omp single
        barrier.size = omp_get_num_threads();  // its implied barrier publishes the size
        const int64_t kept = sparse_team(a, omp_get_thread_num(), barrier.size, spin_sync,
                                         &barrier, &shared);
        if (omp_get_thread_num() == 0) result = kept;
    }
    return result;
}

// ---------------------------------------------------------------------------------------------
// Top-k thresholds (kernels/sparse.py, input_top_k_thresholds): per row t of x, the keep-th
// largest score |x[t, j]| * norms[j] (norms NULL: |x[t, j]|), each score one fp32 product as
// torch computes channel_scores. Non-negative floats order as their bit patterns, so the score
// is found by radix selection on the bits, a digit at a time from the top: a histogram of the
// candidates' digit, the bucket that holds the wanted rank, its members the next candidates.
// NaN scores (sign bit cleared) order above infinity, as torch.topk orders them.

static __thread uint32_t *keys_cache;
static __thread int64_t keys_capacity;

// The rank-th smallest (from 0) of count keys below 2^31; reorders the keys. Three digits (bits
// 30-20: the exponent and 3 bits of mantissa, then 19-10, then 9-0): the first splits the
// scores of a row finely, the later ones only see the few candidates left.
static uint32_t select_key(uint32_t *keys, int64_t count, int64_t rank) {
    static const int shifts[3] = {20, 10, 0}, widths[3] = {11, 10, 10};
    for (int pass = 0; pass < 3; pass++) {
        const int shift = shifts[pass];
        const uint32_t mask = (1u << widths[pass]) - 1;
        uint32_t histogram[1 << 11];
        memset(histogram, 0, sizeof(uint32_t) << widths[pass]);
        for (int64_t i = 0; i < count; i++) histogram[(keys[i] >> shift) & mask]++;
        uint32_t bucket = 0;
        while (rank >= histogram[bucket]) rank -= histogram[bucket++];
        int64_t kept = 0;
#if defined(__AVX512F__)
        // The bucket's keys to the front, 16 at a time (the last, partial vector masked).
        const __m512i wanted = _mm512_set1_epi32((int)bucket), digit = _mm512_set1_epi32((int)mask);
        for (int64_t i = 0; i < count; i += LANES) {
            const __mmask16 lanes = count - i >= LANES ? 0xffff : (__mmask16)((1u << (count - i)) - 1);
            const __m512i v = _mm512_maskz_loadu_epi32(lanes, keys + i);
            const __m512i d = _mm512_and_si512(_mm512_srli_epi32(v, shift), digit);
            const __mmask16 hit = _mm512_mask_cmpeq_epi32_mask(lanes, d, wanted);
            _mm512_mask_compressstoreu_epi32(keys + kept, hit, v);
            kept += __builtin_popcount(hit);
        }
#else
        // The bucket's keys to the front, without branches (kept <= i: in place).
        for (int64_t i = 0; i < count; i++) {
            const uint32_t v = keys[i];
            keys[kept] = v;
            kept += ((v >> shift) & mask) == bucket;
        }
#endif
        count = kept;
    }
    return keys[0];  // every candidate left has the same bits
}

static int top_k_thresholds(const char *x, int64_t ldx, const float *norms, float *out,
                            int64_t m, int64_t k, int64_t keep) {
    uint32_t *keys = keys_cache = grow(keys_cache, &keys_capacity, k + LANES, sizeof(uint32_t));
    if (keys == NULL) return -1;
    for (int64_t t = 0; t < m; t++) {
        const char *row = x + t * ldx * ELEM;
        // The scores' bits, sign cleared (NaN -> positive NaN) as keys; whether any is a NaN.
#if defined(__AVX512F__)
        const __m512i magnitude = _mm512_set1_epi32(0x7fffffff);
        const __m512i infinity = _mm512_set1_epi32(0x7f800000);
        __mmask16 nan_seen = 0;
        for (int64_t j = 0; j < k; j += LANES) {
            const __mmask16 lanes = k - j >= LANES ? 0xffff : (__mmask16)((1u << (k - j)) - 1);
            __m512 score = _mm512_abs_ps(load16_masked(row + j * ELEM, lanes));
            if (norms != NULL) score = _mm512_mul_ps(score, _mm512_maskz_loadu_ps(lanes, norms + j));
            const __m512i bits = _mm512_and_si512(_mm512_castps_si512(score), magnitude);
            nan_seen |= _mm512_mask_cmpgt_epu32_mask(lanes, bits, infinity);
            _mm512_mask_storeu_epi32(keys + j, lanes, bits);
        }
#else
        const __m256i magnitude = _mm256_set1_epi32(0x7fffffff);
        const __m256i infinity = _mm256_set1_epi32(0x7f800000);
        unsigned nan_seen = 0;
        for (int64_t j = 0; j < k; j += 8) {  // full-width stores: keys has slack past k
            const int count = k - j >= 8 ? 8 : (int)(k - j);
            __m256 score = _mm256_and_ps(load8_part(row + j * ELEM, count),
                                         _mm256_castsi256_ps(magnitude));
            if (norms != NULL) score = _mm256_mul_ps(score, load8_f32_part(norms + j, count));
            const __m256i bits = _mm256_and_si256(_mm256_castps_si256(score), magnitude);
            // Signed compare: the bits are below 2^31.
            nan_seen |= (unsigned)_mm256_movemask_ps(
                _mm256_castsi256_ps(_mm256_cmpgt_epi32(bits, infinity)));
            _mm256_storeu_si256((__m256i *)(keys + j), bits);
        }
#endif
        const uint32_t key = select_key(keys, k, k - keep);
        // A NaN score is among the top keep (it orders above all): torch's min over them is NaN.
        if (nan_seen) {
            out[t] = NAN;
        } else {
            memcpy(&out[t], &key, sizeof(float));
        }
    }
    return 0;
}

// ---------------------------------------------------------------------------------------------
// Python binding: linear(x_ptr, ldx, w_ptr, norms_ptr or 0, thresholds_ptr, bias_ptr or 0,
// out_ptr, m, n, k, threads) -> the number of kept channels (the union over the rows); pointers
// as the integers Tensor.data_ptr() returns. The caller (kernels/sparse.py) has checked types,
// shapes and contiguity (x: unit element stride; w: [k, n], out: [m, n], bias: [n] contiguous;
// norms: [k], thresholds: [m] contiguous fp32); here only what indexes tables is checked.

static PyObject *py_linear(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 11) {
        PyErr_SetString(PyExc_TypeError, "linear() takes 11 integer arguments");
        return NULL;
    }
    long long v[11];
    for (int i = 0; i < 11; i++) v[i] = PyLong_AsLongLong(args[i]);
    if (PyErr_Occurred()) return NULL;
    if (v[7] < 1 || v[7] > MAX_M || v[8] < 1 || v[9] < 1) {
        PyErr_SetString(PyExc_ValueError, "linear() needs 1 <= m <= MAX_M, n >= 1 and k >= 1");
        return NULL;
    }
    const layer_args_t a = {(const char *)(intptr_t)v[0], v[1], (const char *)(intptr_t)v[2],
                            (const float *)(intptr_t)v[3], (const float *)(intptr_t)v[4], 0, 0.0f,
                            (const char *)(intptr_t)v[5], (char *)(intptr_t)v[6], v[7], v[8],
                            v[9], NULL};
    int64_t kept;
    // The weights stream for tens of microseconds or more: let other Python threads run.
    Py_BEGIN_ALLOW_THREADS
    kept = sparse_linear(&a, (int)v[10]);
    Py_END_ALLOW_THREADS
    if (kept < 0) return PyErr_NoMemory();
    return PyLong_FromLongLong(kept);
}

// top_k_thresholds(x_ptr, ldx, norms_ptr or 0, out_ptr, m, k, keep) -> None; out: fp32 [m].
static PyObject *py_top_k_thresholds(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError, "top_k_thresholds() takes 7 integer arguments");
        return NULL;
    }
    long long v[7];
    for (int i = 0; i < 7; i++) v[i] = PyLong_AsLongLong(args[i]);
    if (PyErr_Occurred()) return NULL;
    if (v[4] < 1 || v[5] < 1 || v[6] < 1 || v[6] >= v[5]) {
        PyErr_SetString(PyExc_ValueError, "top_k_thresholds() needs m, k >= 1 and 1 <= keep < k");
        return NULL;
    }
    if (top_k_thresholds((const char *)(intptr_t)v[0], v[1], (const float *)(intptr_t)v[2],
                         (float *)(intptr_t)v[3], v[4], v[5], v[6]) != 0) {
        return PyErr_NoMemory();
    }
    Py_RETURN_NONE;
}

// The layer by address, for a team of threads already running in another module (kernels/
// csrc/cpu_ops.c's one-call decode step): every thread of the team calls it with the same
// arguments, keep > 0 (top-k) or *threshold for every row, and masked [m, k] (or NULL) for x
// with each row's dropped channels zeroed; it returns once this thread's share is done (the
// caller's barrier after it completes the layer). Returns 0, or -1 when a buffer cannot be
// allocated.
static int sparse_entry(const void *x, int64_t ldx, const void *w, const float *norms,
                        int64_t keep, const float *threshold, const void *bias, void *out,
                        void *masked, int64_t m, int64_t n, int64_t k, int thread, int team,
                        sync_fn sync, void *context, void **shared) {
    const layer_args_t a = {x,   ldx, w, norms, NULL, keep, keep > 0 ? 0.0f : *threshold,
                            bias, out, m, n,     k,    masked};
    return sparse_team(&a, thread, team, sync, context, shared) < 0 ? -1 : 0;
}

// entry_address("sparse") -> sparse_entry's address as an int (0 for any other name)
static PyObject *py_entry_address(PyObject *module, PyObject *name) {
    (void)module;
    const char *text = PyUnicode_AsUTF8(name);
    if (text == NULL) return NULL;
    return PyLong_FromVoidPtr(strcmp(text, "sparse") == 0 ? (void *)sparse_entry : NULL);
}

static PyMethodDef METHODS[] = {
    {"linear", (PyCFunction)(void (*)(void))py_linear, METH_FASTCALL, "sparse linear layer"},
    {"top_k_thresholds", (PyCFunction)(void (*)(void))py_top_k_thresholds, METH_FASTCALL,
     "keep-th largest channel score per row"},
    {"entry_address", py_entry_address, METH_O, "the kernel's address, for C callers"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef MODULE = {
    PyModuleDef_HEAD_INIT, .m_name = MODULE_NAME, .m_size = -1, .m_methods = METHODS,
};

PyMODINIT_FUNC MODULE_INIT(void) {
#if !defined(__AVX512F__)
    fill_compress_table();
#endif
    PyObject *module = PyModule_Create(&MODULE);
    if (module != NULL && PyModule_AddIntConstant(module, "MAX_M", MAX_M) != 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
