// int8 and int4 matrix-vector products by integer dot products against int8-quantized
// activations: llama.cpp's way on CPUs without AVX-512 (its Q8_0 x Q8_0 and Q4_0 x Q8_0).
//
// Why: on AVX2 the float path (lowbit.cpp) is compute-bound, not memory-bound: widening int4
// nibbles to fp32 costs ~7 instructions per 16 weights and int8 ~3 per 8, so 2 cores stream
// int4 at ~20 GB/s and int8 at ~35. Here each row of x is first quantized, in blocks of 32
// columns, to int8 with one fp32 scale per block (d = max|x| / 127, q = round(x / d), ties to
// even); then 32 weights times 32 activations are one vpmaddubsw (u8 x s8 -> 16 pair sums in
// int16) and one vpmaddwd (-> 8 int32), converted and scaled once per block: ~12 instructions
// per 64 int4 weights where the float path takes ~36.
//
// The cost is the activations' rounding: each x[k] moves by up to d / 2 (0.4 % of its block's
// largest value), a relative error of ~1e-3 in each product (tests: within 2 % of the largest
// output on random data, and equal to the same arithmetic done in float64). The float path
// stays the default where it is not compute-bound (AVX-512); mixtral.fast chooses.
//
//   int8: y[n] = scale[n] * sum_b d_b * sum_{k in b} q[k] w[n, k]
//         (vpmaddubsw wants one unsigned operand: |w| and q with w's sign, llama.cpp's trick;
//          pair sums <= 2 * 128 * 127 fit int16)
//   int4: y[n] = sum_groups scale * sum_b d_b * sum_{k in b} q[k] nibble[k] + offset * sum_k x[k]
//         (nibbles are unsigned already; pair sums <= 2 * 15 * 127; the offsets' term uses the
//          exact x; x comes in the nibbles' order, lowbit.cpp's nibble_x, so each block of 32
//          is the odd or the even columns of 64)
//
// Written with 256-bit integer instructions (AVX2), which every tier's build has.

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstdint>

#include "q8.h"
#include "simd.h"

namespace MIXTRAL_NS::q8 {
namespace {

using simd::unrolled;

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

inline float hmax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}

inline __m256i load32(const void* p) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}

// 32 u8 x 32 s8 -> 8 int32 sums of 4 products each
inline __m256i dot32(__m256i u, __m256i s) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
}

// n_blocks blocks of 32 values of x -> their int8 values q and scales d
void quantize(const float* x, int64_t n_blocks, int8_t* q, float* d) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  for (int64_t i = 0; i < n_blocks; ++i) {
    const float* src = x + i * kBlock;
    __m256 v[4];
    unrolled<4>([&](auto j) { v[j] = load8(src + 8 * j); });
    const __m256 a = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v[0]),
                                                 _mm256_andnot_ps(sign, v[1])),
                                   _mm256_max_ps(_mm256_andnot_ps(sign, v[2]),
                                                 _mm256_andnot_ps(sign, v[3])));
    const float dd = hmax(a) / 127.0f, id = dd > 0 ? 1.0f / dd : 0.0f;
    d[i] = dd;
    __m256i n[4];  // rounded to nearest, ties to even (the MXCSR default)
    unrolled<4>([&](auto j) { n[j] = _mm256_cvtps_epi32(_mm256_mul_ps(v[j], _mm256_set1_ps(id))); });
    // 4 x 8 int32 -> 32 int8; the packs interleave 128-bit lanes, the permute undoes it
    const __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(n[0], n[1]),
                                         _mm256_packs_epi32(n[2], n[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + i * kBlock),
                        _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
  }
}

struct Quantized {
  at::Tensor q, d;  // int8 [M, K], fp32 [M, K/32]
};

Quantized quantize(const at::Tensor& x) {
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(K % kBlock == 0, "q8: K must be a multiple of ", kBlock, ", got ", K);
  Quantized out{at::empty({M, K}, x.options().dtype(at::kChar)),
                at::empty({M, K / kBlock}, x.options().dtype(at::kFloat))};
  quantize(x.data_ptr<float>(), M * K / kBlock, out.q.data_ptr<int8_t>(), out.d.data_ptr<float>());
  return out;
}

template <int MB, int R, int C>
inline void zero(__m256 (&acc)[MB][R][C]) {
  unrolled<MB>([&](auto m) {
    unrolled<R>([&](auto r) { unrolled<C>([&](auto c) { acc[m][r][c] = _mm256_setzero_ps(); }); });
  });
}

template <int C>
inline __m256 add_all(const __m256 (&acc)[C]) {
  __m256 t = acc[0];
  unrolled<C - 1>([&](auto c) { t = _mm256_add_ps(t, acc[c + 1]); });
  return t;
}

// ---- int8 weights ----------------------------------------------------------------------------

struct Int8Kernel {
  const int8_t* xq;  // [M, K]
  const float* dx;   // [M, K/32]
  const int8_t* w;
  const float* scale;
  float* y;
  int64_t K, N;

  template <int MB, int R>
  [[gnu::flatten]] void block(int64_t m0, int64_t n0) const {
    constexpr int U = simd::unroll<MB, R>;
    const int64_t B = K / kBlock;
    __m256 acc[MB][R][U];
    zero(acc);
    auto step = [&](int64_t b, auto u) {  // block b into accumulators u
      __m256i xv[MB];
      __m256 d[MB];
      unrolled<MB>([&](auto m) {
        xv[m] = load32(xq + (m0 + m) * K + b * kBlock);
        d[m] = _mm256_set1_ps(dx[(m0 + m) * B + b]);
      });
      unrolled<R>([&](auto r) {
        const __m256i wv = load32(w + (n0 + r) * K + b * kBlock);
        const __m256i aw = _mm256_sign_epi8(wv, wv);  // |w| as u8 (|-128| = 128 too)
        unrolled<MB>([&](auto m) {
          const __m256i p = dot32(aw, _mm256_sign_epi8(xv[m], wv));
          acc[m][r][u] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), d[m], acc[m][r][u]);
        });
      });
    };
    int64_t b = 0;
    for (; b + U <= B; b += U) unrolled<U>([&](auto u) { step(b + u, u); });
    for (; b < B; ++b) step(b, std::integral_constant<int, 0>{});
    unrolled<MB>([&](auto m) {
      unrolled<R>([&](auto r) {
        y[(m0 + m) * N + n0 + r] = scale[n0 + r] * hsum(add_all(acc[m][r]));
      });
    });
  }
};

// ---- int4 weights (lowbit.cpp's layout: the portable bytes, x in nibble order) --------------

struct Int4Kernel {
  const int8_t* xq;
  const float* dx;
  const float* xsum;  // [M, K/group]: the exact x summed per group
  const uint8_t* w;
  const float* sz;
  float* y;
  int64_t K, group, N;

  template <int MB, int R>
  [[gnu::flatten]] void block(int64_t m0, int64_t n0) const {
    constexpr int C = simd::unroll<MB, R> < 2 ? simd::unroll<MB, R> : 2;
    const int64_t groups = K / group, B = K / kBlock;
    const __m256i low = _mm256_set1_epi8(15);
    __m256 sums[MB][R][1];
    float off[MB][R] = {};
    zero(sums);
    for (int64_t g = 0; g < groups; ++g) {
      __m256 acc[MB][R][C];
      zero(acc);
      for (int64_t k = g * group; k < (g + 1) * group; k += 2 * kBlock) {
        __m256i x0[MB], x1[MB];
        __m256 d0[MB], d1[MB];
        unrolled<MB>([&](auto m) {
          const int8_t* xm = xq + (m0 + m) * K + k;
          const float* dm = dx + (m0 + m) * B + k / kBlock;
          x0[m] = load32(xm), x1[m] = load32(xm + kBlock);
          d0[m] = _mm256_set1_ps(dm[0]), d1[m] = _mm256_set1_ps(dm[1]);
        });
        unrolled<R>([&](auto r) {
          const __m256i v = load32(w + (n0 + r) * (K / 2) + k / 2);
          const __m256i lo = _mm256_and_si256(v, low);
          const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
          unrolled<MB>([&](auto m) {
            acc[m][r][0] =
                _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot32(lo, x0[m])), d0[m], acc[m][r][0]);
            acc[m][r][C - 1] =
                _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot32(hi, x1[m])), d1[m], acc[m][r][C - 1]);
          });
        });
      }
      unrolled<R>([&](auto r) {
        const float* so = sz + ((n0 + r) * groups + g) * 2;
        const __m256 s = _mm256_set1_ps(so[0]);
        unrolled<MB>([&](auto m) {
          sums[m][r][0] = _mm256_fmadd_ps(add_all(acc[m][r]), s, sums[m][r][0]);
          off[m][r] += so[1] * xsum[(m0 + m) * groups + g];
        });
      });
    }
    unrolled<MB>([&](auto m) {
      unrolled<R>([&](auto r) {
        y[(m0 + m) * N + n0 + r] = hsum(sums[m][r][0]) + off[m][r];
      });
    });
  }
};

void group_sums(const float* x, int64_t n_groups, int64_t group, float* out) {
  for (int64_t i = 0; i < n_groups; ++i) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t k = 0; k < group; k += 8) acc = _mm256_add_ps(acc, load8(x + i * group + k));
    out[i] = hsum(acc);
  }
}

// Many rows of x (a prompt: the integer dot products beat dequantizing for the float GEMM at
// every M measured, 1.2-1.6x at 512): x in chunks of rows that stay in L2 (kTileBytes), and
// for each chunk the thread's weight rows kRows at a time, each weight block loaded once for
// all the chunk's rows (its rows come from L1, the chunk from L2).
constexpr int64_t kManyRows = 16, kTileBytes = 256 * 1024;

template <typename Kernel>
void for_tiles(const Kernel& kernel, int64_t M, int64_t n0, int64_t n1, int64_t x_row_bytes) {
  if (M <= kManyRows) return simd::for_blocks(kernel, M, n0, n1, x_row_bytes);
  const int64_t chunk = std::max<int64_t>(4, kTileBytes / x_row_bytes);
  for (int64_t m = 0; m < M; m += chunk)
    simd::for_blocks(kernel, m, std::min(M, m + chunk), n0, n1, true);
}

}  // namespace

at::Tensor int8_mv(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales) {
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  const Quantized xq = quantize(x);
  at::Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));
  const Int8Kernel kernel{xq.q.data_ptr<int8_t>(), xq.d.data_ptr<float>(), w.data_ptr<int8_t>(),
                          scales.data_ptr<float>(), y.data_ptr<float>(), K, N};
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    for_tiles(kernel, M, n0, n1, K);  // x's row: K bytes
  });
  return y;
}

at::Tensor int4_mv(const at::Tensor& x, const at::Tensor& w, const at::Tensor& sz, int64_t group) {
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0), groups = K / group;
  const Quantized xq = quantize(x);
  at::Tensor xsum = at::empty({M, groups}, x.options().dtype(at::kFloat));
  group_sums(x.data_ptr<float>(), M * groups, group, xsum.data_ptr<float>());
  at::Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));
  const Int4Kernel kernel{xq.q.data_ptr<int8_t>(), xq.d.data_ptr<float>(), xsum.data_ptr<float>(),
                          w.data_ptr<uint8_t>(), sz.data_ptr<float>(), y.data_ptr<float>(), K,
                          group, N};
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    for_tiles(kernel, M, n0, n1, K);  // x's row: K bytes
  });
  return y;
}

}  // namespace MIXTRAL_NS::q8
