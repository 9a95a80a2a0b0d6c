// The few vector operations the kernels need, for the x86 tier this translation unit is built
// for. mixtral/kernels.py compiles the same sources once per tier with explicit flags (never
// -march=native, so that one build serves every CPU of its tier):
//
//   avx2         -mavx2 -mfma -mf16c                      8 fp32 lanes (__m256)
//   avx512       + -mavx512f -mavx512bw -mavx512vl -mavx512dq   16 fp32 lanes (__m512)
//   avx512_bf16  + -mavx512bf16                           16 lanes, and vdpbf16ps where it pays
//
// The kernels are written once in terms of `L` lanes and these helpers; only a few inner loops
// (int4 with bf16 activations) have a tier-specific variant, chosen with #if on the compiler's
// own feature macros. Each build registers its ops under its own namespace (MIXTRAL_NS, e.g.
// mixtral_avx2), so several tiers' builds can be loaded into one process (the tests compare
// them); two libraries registering one namespace would abort the process.

#pragma once

#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <cstdint>
#include <type_traits>
#include <utility>

#include <immintrin.h>

#if !defined(__AVX2__) || !defined(__FMA__) || !defined(__F16C__)
#error "the kernels need at least AVX2, FMA and F16C; mixtral.kernels builds them only there"
#endif
#ifndef MIXTRAL_NS
#error "build through mixtral/kernels.py, which names the op namespace (-DMIXTRAL_NS=...)"
#endif

// TORCH_LIBRARY pastes its namespace argument with ##, which would not expand a macro: one
// level of indirection makes MIXTRAL_NS expand first.
#define MIXTRAL_LIBRARY_(ns, m) TORCH_LIBRARY(ns, m)
#define MIXTRAL_LIBRARY(m) MIXTRAL_LIBRARY_(MIXTRAL_NS, m)
#define MIXTRAL_FRAGMENT_(ns, m) TORCH_LIBRARY_FRAGMENT(ns, m)
#define MIXTRAL_FRAGMENT(m) MIXTRAL_FRAGMENT_(MIXTRAL_NS, m)
#define MIXTRAL_IMPL_(ns, m) TORCH_LIBRARY_IMPL(ns, CPU, m)
#define MIXTRAL_IMPL(m) MIXTRAL_IMPL_(MIXTRAL_NS, m)

namespace simd {

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
    defined(__AVX512DQ__)

constexpr int L = 16;  // fp32 lanes
using vf = __m512;

inline vf zero() { return _mm512_setzero_ps(); }
inline vf set1(float v) { return _mm512_set1_ps(v); }
inline vf load(const float* p) { return _mm512_loadu_ps(p); }
inline vf load(const c10::BFloat16* p) {  // bf16 -> fp32: the 16 bits become the high half
  const __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
}
inline void store(float* p, vf v) { _mm512_storeu_ps(p, v); }
inline vf add(vf a, vf b) { return _mm512_add_ps(a, b); }
inline vf mul(vf a, vf b) { return _mm512_mul_ps(a, b); }
inline vf fmadd(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
inline float sum(vf v) { return _mm512_reduce_add_ps(v); }

// L int8 -> fp32
inline vf load_i8(const int8_t* p) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
}

// L bytes -> their low nibbles and their high nibbles, as fp32
inline void nibbles(const uint8_t* p, vf& lo, vf& hi) {
  const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  lo = _mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(15)));
  hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4));
}

// 2L bf16 -> the even-indexed ones and the odd-indexed ones as fp32: one load, a shift and a
// mask (each 32-bit lane holds a pair; bf16 is the high half of an fp32)
inline void bf16_pairs(const c10::BFloat16* p, vf& even, vf& odd) {
  const __m512i v = _mm512_loadu_si512(p);
  even = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
  odd = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(int32_t(0xFFFF0000u))));
}

// a and b interleaved (a0 b0 a1 b1 ...): its first L values in `first`, the next L in `second`
inline void zip(vf a, vf b, vf& first, vf& second) {
  const __m512i f = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const __m512i s = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
  first = _mm512_permutex2var_ps(a, f, b);
  second = _mm512_permutex2var_ps(a, s, b);
}

// L fp32 -> bf16, rounded to nearest even as c10::BFloat16 does (values finite)
inline void store(c10::BFloat16* p, vf v) {
  __m512i b = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  b = _mm512_add_epi32(b, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), odd));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                      _mm512_cvtepi32_epi16(_mm512_srli_epi32(b, 16)));
}

#else  // AVX2 + FMA + F16C: no AVX-512 instruction anywhere

constexpr int L = 8;
using vf = __m256;

inline vf zero() { return _mm256_setzero_ps(); }
inline vf set1(float v) { return _mm256_set1_ps(v); }
inline vf load(const float* p) { return _mm256_loadu_ps(p); }
inline vf load(const c10::BFloat16* p) {
  const __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
}
inline void store(float* p, vf v) { _mm256_storeu_ps(p, v); }
inline vf add(vf a, vf b) { return _mm256_add_ps(a, b); }
inline vf mul(vf a, vf b) { return _mm256_mul_ps(a, b); }
inline vf fmadd(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
inline float sum(vf v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

inline vf load_i8(const int8_t* p) {
  const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
}

inline void nibbles(const uint8_t* p, vf& lo, vf& hi) {
  const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  lo = _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(15)));
  hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4));
}

inline void zip(vf a, vf b, vf& first, vf& second) {
  const vf lo = _mm256_unpacklo_ps(a, b), hi = _mm256_unpackhi_ps(a, b);  // per 128-bit half
  first = _mm256_permute2f128_ps(lo, hi, 0x20);
  second = _mm256_permute2f128_ps(lo, hi, 0x31);
}

inline void bf16_pairs(const c10::BFloat16* p, vf& even, vf& odd) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  even = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
  odd = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(int32_t(0xFFFF0000u))));
}

inline void store(c10::BFloat16* p, vf v) {
  __m256i b = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
  b = _mm256_srli_epi32(_mm256_add_epi32(b, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), odd)), 16);
  // 8 x 32 -> 8 x 16 bits (values < 2^16, so the unsigned saturation never bites)
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm_packus_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1)));
}

#endif

// Register blocking. An FMA's latency is ~4 cycles and a core issues two per cycle, so ~8
// independent accumulators must be in flight (more only add to each row's final reduction,
// which short rows feel): from up to kMaxMB rows of x times `unroll` column vectors per step,
// times, where a row of x is longer than kBlockRowsAbove, up to kRows weight rows at a time.
// Those load each x vector once for all of them: x is 4 bytes a column, more than the weight,
// and re-reading it from L2 for every row halved the speed at K = 14336 (8 rows beat 4 there by
// 1.2-1.6x). But streaming several rows side by side instead of one contiguous stream halves
// the speed of short rows (K = 4096: int8 13 vs 29 GB/s, int4 8 vs 19, one core): at 16 KB of
// x (K = 4096) one row at a time is best, at 28 KB (K = 7168) blocks of rows gain 1.2-1.6x.
// AVX-512's 32 registers hold up to 16 accumulators besides the operands, AVX2's 16 hold 8,
// which bounds the rows taken together with MB rows of x (rows_for).
constexpr int kAccumulators = 8;
constexpr int kMaxAccumulators = L == 16 ? 16 : 8;
constexpr int kRows = 8;
constexpr int64_t kBlockRowsAbove = 16 * 1024;  // bytes of one row of x
constexpr int kMaxMB = L == 16 ? 4 : 2;
template <int MB>
constexpr int rows_for = kRows < kMaxAccumulators / MB ? kRows : kMaxAccumulators / MB;
template <int MB, int R>
constexpr int unroll = kAccumulators / (MB * R) > 1 ? kAccumulators / (MB * R) : 1;

// f(0), f(1), ..., f(N-1), each index a compile-time constant (std::integral_constant). The
// kernels index their accumulator arrays only this way: GCC keeps an array of vectors in
// registers only if every index is a constant before its early optimizations; with plain loops
// it may keep the array in memory and, as the intrinsics' loads may alias anything, store every
// accumulator on every iteration (measured: AVX2 int8 at 60 % of its speed).
template <int N, typename F>
inline void unrolled(const F& f) {
  [&]<int... i>(std::integer_sequence<int, i...>) {
    (f(std::integral_constant<int, i>{}), ...);
  }(std::make_integer_sequence<int, N>{});
}

// the sum of an accumulator array
template <int C>
inline vf add_all(const vf (&acc)[C]) {
  vf t = acc[0];
  unrolled<C - 1>([&](auto c) { t = add(t, acc[c + 1]); });
  return t;
}

template <int C>
inline float total(const vf (&acc)[C]) {
  return sum(add_all(acc));
}

// zeroes an accumulator array [A][B][C]
template <int A, int B, int C>
inline void zero(vf (&acc)[A][B][C]) {
  unrolled<A>([&](auto a) {
    unrolled<B>([&](auto b) { unrolled<C>([&](auto c) { acc[a][b][c] = zero(); }); });
  });
}

// Each kernel's block<MB, R> is [[gnu::flatten]]: everything it calls (the unrolled lambdas)
// must be inlined for its accumulators to live in registers, and GCC's inlining limits would
// otherwise stop short in the larger blocks (AVX-512 int8 at 4 x 4 ran at a third of its speed).
//
// Runs kernel.block<MB, R>(m, n) (rows m.. of x, rows n.. of the weight) over weight rows
// n0..n1, one at a time, or kRows at a time (then the rest one by one) where a row of x
// takes more than kBlockRowsAbove bytes; and for each over every block of x's rows: a
// weight block is read from memory once, then from cache for the next rows of x.
template <typename Kernel>
inline void for_blocks(const Kernel& kernel, int64_t m_begin, int64_t m_end, int64_t n0,
                       int64_t n1, bool block_rows) {
  auto rows = [&](auto r, int64_t n) {  // weight rows n..n+r-1, in blocks of rows_for<MB>
    constexpr int R = decltype(r)::value;
    auto blocks = [&](auto mb, int64_t m) {
      constexpr int MB = decltype(mb)::value, RB = R < rows_for<MB> ? R : rows_for<MB>;
      static_assert(R % RB == 0);
      for (int i = 0; i < R; i += RB) kernel.template block<MB, RB>(m, n + i);
    };
    int64_t m = m_begin;
    if constexpr (kMaxMB >= 4)
      for (; m + 4 <= m_end; m += 4) blocks(std::integral_constant<int, 4>{}, m);
    for (; m + 2 <= m_end; m += 2) blocks(std::integral_constant<int, 2>{}, m);
    for (; m < m_end; ++m) blocks(std::integral_constant<int, 1>{}, m);
  };
  int64_t n = n0;
  if (block_rows)
    for (; n + kRows <= n1; n += kRows)
      rows(std::integral_constant<int, kRows>{}, n);
  for (; n < n1; ++n) rows(std::integral_constant<int, 1>{}, n);
}

template <typename Kernel>
inline void for_blocks(const Kernel& kernel, int64_t M, int64_t n0, int64_t n1,
                       int64_t x_row_bytes) {
  for_blocks(kernel, 0, M, n0, n1, x_row_bytes > kBlockRowsAbove);
}

}  // namespace simd
