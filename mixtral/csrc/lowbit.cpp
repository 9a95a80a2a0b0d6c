// Weight-only int8, int4 and bf16 matrix-vector products for decoding on CPU (a few rows of x).
//
// Decoding is memory-bound: each weight byte is read once per step, so the kernel's job is to
// stream the weights at the machine's bandwidth while converting them to fp32 on the fly.
// For one row of x on this project's 2-core machine (Zen 5, ~40-45 GB/s), PyTorch's own
// low-bit kernels (_weight_int8pack_mm, _weight_int4pack_mm_for_cpu) stream 25-32 GB/s at its
// AVX-512 dispatch and int4 at 9 at AVX2; these stream int8 and bf16 at 34-47 GB/s on every
// tier, int4 at 28-42 on AVX-512 and 20-24 on AVX2, where converting the nibbles to fp32 is
// the limit (~13 GB/s a core). Written once for every tier in terms of simd.h (8 fp32 lanes
// on AVX2, 16 on AVX-512).
//
// Layouts (made once by mixtral/kernels.py from the portable checkpoint form):
//   int8  w [N, K] int8, one fp32 scale per row:            y = scale[n] * sum_k x[k] w[n, k]
//   int4  w [N, K/2] uint8; each 64 columns of a row are 32 bytes, byte i holding column i in
//         its low nibble and column i + 32 in its high nibble (so one load unpacks into vectors
//         in column order). sz [N, K/g, 2] fp32 = (scale, offset) per group of g columns
//         (g % 64 == 0), the weight being q * scale + offset (q in 0..15):
//         y = sum_groups scale * sum_k x[k] q[k] + offset * sum_k x[k]
//   bf16  w [N, K] bf16 (an nn.Linear weight as it is): for CPUs where oneDNN cannot pack bf16
//         weights (AVX2), whose bf16 F.linear converts the whole weight first
//
// x is fp32 or bf16 [M, K] (M small; the caller dequantizes and uses a GEMM for long prompts);
// the arithmetic is fp32 and y [M, N] comes back in x's dtype. The activations stay in fp32:
// quantizing them to int8 for integer dot products (llama.cpp's way) would be faster on AVX2
// but adds ~1e-3 relative error to every product, which the tests' 1e-5 bounds do not allow.
// Work is split over output rows with at::parallel_for, i.e. PyTorch's own OpenMP team.

#include <ATen/Parallel.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/silu.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "q8.h"
#include "simd.h"

namespace {

namespace q8 = MIXTRAL_NS::q8;
using simd::L;
using simd::vf;

using simd::for_blocks;
using simd::unrolled;

// the sum of an accumulator array
template <int C>
inline vf add_all(const vf (&acc)[C]) {
  vf t = acc[0];
  unrolled<C - 1>([&](auto c) { t = simd::add(t, acc[c + 1]); });
  return t;
}

template <int C>
inline float total(const vf (&acc)[C]) {
  return simd::sum(add_all(acc));
}

// zeroes an accumulator array [A][B][C]
template <int A, int B, int C>
inline void zero(vf (&acc)[A][B][C]) {
  unrolled<A>([&](auto a) {
    unrolled<B>([&](auto b) { unrolled<C>([&](auto c) { acc[a][b][c] = simd::zero(); }); });
  });
}

// ---- int8 ------------------------------------------------------------------------------------

struct Int8Kernel {
  const float* x;  // [M, K] fp32
  const int8_t* w;
  const float* scale;
  float* y;
  int64_t K, N;

  template <int MB, int R>
  [[gnu::flatten]] void block(int64_t m0, int64_t n0) const {
    constexpr int U = simd::unroll<MB, R>;
    const float* xm = x + m0 * K;
    const int8_t* wn = w + n0 * K;
    vf acc[MB][R][U];
    zero(acc);
    auto step = [&](int64_t k, auto u) {  // columns k..k+L-1 into accumulators u
      vf xv[MB];
      unrolled<MB>([&](auto m) { xv[m] = simd::load(xm + m * K + k); });
      unrolled<R>([&](auto r) {
        const vf wv = simd::load_i8(wn + r * K + k);
        unrolled<MB>([&](auto m) { acc[m][r][u] = simd::fmadd(wv, xv[m], acc[m][r][u]); });
      });
    };
    int64_t k = 0;
    for (; k + U * L <= K; k += U * L) unrolled<U>([&](auto u) { step(k + u * L, u); });
    for (; k < K; k += L) step(k, std::integral_constant<int, 0>{});  // K % 16 == 0
    unrolled<MB>([&](auto m) {
      unrolled<R>([&](auto r) {
        y[(m0 + m) * N + n0 + r] = scale[n0 + r] * total(acc[m][r]);
      });
    });
  }
};

// ---- int4 ------------------------------------------------------------------------------------

// Per group and row: acc = sum_k x[k] q[k], then y += scale * acc + offset * xsum.
// fp32 x: nibbles -> int32 -> fp32 and FMAs. bf16 x with AVX512-BF16: Int4Bf16Kernel.
struct Int4Kernel {
  const float* x;     // [M, K] fp32
  const float* xsum;  // [M, K/group]: x summed per group
  const uint8_t* w;
  const float* sz;
  float* y;
  int64_t K, group, N;

  template <int MB, int R>
  [[gnu::flatten]] void block(int64_t m0, int64_t n0) const {
    // accumulators per row: half the products of a 64-column chunk (32/L loads, 2 nibbles
    // each), as the group's reduction costs more than chains beyond that gain
    constexpr int P = 32 / L;
    constexpr int C = simd::unroll<MB, R> < P ? simd::unroll<MB, R> : P;
    const int64_t groups = K / group;
    const float* xm = x + m0 * K;
    vf sums[MB][R][1];
    float off[MB][R] = {};
    zero(sums);
    for (int64_t g = 0; g < groups; ++g) {
      vf acc[MB][R][C];
      zero(acc);
      for (int64_t k = g * group; k < (g + 1) * group; k += 64) {
        unrolled<32 / L>([&](auto v) {  // bytes v*L.. of the chunk: columns k+i.. and k+32+i..
          constexpr int i = decltype(v)::value * L, c0 = (2 * v) % C, c1 = (2 * v + 1) % C;
          vf xl[MB], xh[MB];
          unrolled<MB>([&](auto m) {
            xl[m] = simd::load(xm + m * K + k + i);
            xh[m] = simd::load(xm + m * K + k + 32 + i);
          });
          unrolled<R>([&](auto r) {
            vf lo, hi;
            simd::nibbles(w + (n0 + r) * (K / 2) + k / 2 + i, lo, hi);
            unrolled<MB>([&](auto m) {
              acc[m][r][c0] = simd::fmadd(lo, xl[m], acc[m][r][c0]);
              acc[m][r][c1] = simd::fmadd(hi, xh[m], acc[m][r][c1]);
            });
          });
        });
      }
      unrolled<R>([&](auto r) {
        const float* so = sz + ((n0 + r) * groups + g) * 2;
        const vf s = simd::set1(so[0]);
        unrolled<MB>([&](auto m) {
          sums[m][r][0] = simd::fmadd(add_all(acc[m][r]), s, sums[m][r][0]);
          off[m][r] += so[1] * xsum[(m0 + m) * groups + g];
        });
      });
    }
    unrolled<MB>([&](auto m) {
      unrolled<R>([&](auto r) {
        y[(m0 + m) * N + n0 + r] = simd::sum(sums[m][r][0]) + off[m][r];
      });
    });
  }
};

#if defined(__AVX512BF16__)
// bf16 x: nibbles -> bf16 through a 16-entry table and vdpbf16ps, 32 products per instruction,
// exact (small integers times bf16 are exact in fp32): half the instructions of Int4Kernel,
// which matters as int4 is nearly compute-bound.
struct Int4Bf16Kernel {
  const c10::BFloat16* x;  // [M, K] bf16
  const float* xsum;
  const uint8_t* w;
  const float* sz;
  float* y;
  int64_t K, group, N;

  template <int MB, int R>
  [[gnu::flatten]] void block(int64_t m0, int64_t n0) const {
    constexpr int C = simd::unroll<MB, R> < 2 ? simd::unroll<MB, R> : 2;
    const int64_t groups = K / group;
    const c10::BFloat16* xm = x + m0 * K;
    // bf16 bit patterns of 0..15 (entries 16-31 unused)
    const __m512i table = _mm512_set_epi16(
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x4170, 0x4160, 0x4150, 0x4140, 0x4130,
        0x4120, 0x4110, 0x4100, 0x40E0, 0x40C0, 0x40A0, 0x4080, 0x4040, 0x4000, 0x3F80, 0);
    const __m512i low = _mm512_set1_epi16(15);
    vf sums[MB][R][1];
    float off[MB][R] = {};
    zero(sums);
    for (int64_t g = 0; g < groups; ++g) {
      vf acc[MB][R][C];
      zero(acc);
      for (int64_t k = g * group; k < (g + 1) * group; k += 64) {
        __m512bh x0[MB], x1[MB];
        unrolled<MB>([&](auto m) {
          x0[m] = (__m512bh)_mm512_loadu_si512(xm + m * K + k);
          x1[m] = (__m512bh)_mm512_loadu_si512(xm + m * K + k + 32);
        });
        unrolled<R>([&](auto r) {
          const __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256(
              reinterpret_cast<const __m256i*>(w + (n0 + r) * (K / 2) + k / 2)));
          const __m512bh lo = (__m512bh)_mm512_permutexvar_epi16(_mm512_and_si512(v, low), table);
          const __m512bh hi = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(v, 4), table);
          unrolled<MB>([&](auto m) {
            acc[m][r][0] = _mm512_dpbf16_ps(acc[m][r][0], lo, x0[m]);
            acc[m][r][C - 1] = _mm512_dpbf16_ps(acc[m][r][C - 1], hi, x1[m]);
          });
        });
      }
      unrolled<R>([&](auto r) {
        const float* so = sz + ((n0 + r) * groups + g) * 2;
        const vf s = simd::set1(so[0]);
        unrolled<MB>([&](auto m) {
          sums[m][r][0] = simd::fmadd(add_all(acc[m][r]), s, sums[m][r][0]);
          off[m][r] += so[1] * xsum[(m0 + m) * groups + g];
        });
      });
    }
    unrolled<MB>([&](auto m) {
      unrolled<R>([&](auto r) {
        y[(m0 + m) * N + n0 + r] = simd::sum(sums[m][r][0]) + off[m][r];
      });
    });
  }
};
#endif

// ---- bf16 ------------------------------------------------------------------------------------

// Each load of 2L bf16 weights gives the even-indexed and the odd-indexed columns as fp32
// (simd::bf16_pairs: a shift and a mask, no conversion), so x comes "paired" (pair_x): in each
// block of 2L columns, the even ones and then the odd ones. Columns past the last whole block
// (K % 2L) stay in place and are done one by one.
struct Bf16Kernel {
  const float* x;  // [M, K] fp32, paired
  const c10::BFloat16* w;
  float* y;
  int64_t K, N;

  template <int MB, int R>
  [[gnu::flatten]] void block(int64_t m0, int64_t n0) const {
    constexpr int U = simd::unroll<MB, R>;  // blocks per step (two FMAs each, one accumulator)
    const float* xm = x + m0 * K;
    const c10::BFloat16* wn = w + n0 * K;
    vf acc[MB][R][U];
    zero(acc);
    auto step = [&](int64_t k, auto u) {  // columns k..k+2L-1 into accumulators u
      vf xe[MB], xo[MB];
      unrolled<MB>([&](auto m) {
        xe[m] = simd::load(xm + m * K + k);
        xo[m] = simd::load(xm + m * K + k + L);
      });
      unrolled<R>([&](auto r) {
        vf even, odd;
        simd::bf16_pairs(wn + r * K + k, even, odd);
        unrolled<MB>([&](auto m) {
          acc[m][r][u] = simd::fmadd(odd, xo[m], simd::fmadd(even, xe[m], acc[m][r][u]));
        });
      });
    };
    int64_t k = 0;
    for (; k + 2 * L * U <= K; k += 2 * L * U)
      unrolled<U>([&](auto u) { step(k + 2 * L * u, u); });
    for (; k + 2 * L <= K; k += 2 * L) step(k, std::integral_constant<int, 0>{});
    unrolled<MB>([&](auto m) {
      unrolled<R>([&](auto r) {
        float t = total(acc[m][r]);
        for (int64_t j = k; j < K; ++j) t += xm[m * K + j] * static_cast<float>(wn[r * K + j]);
        y[(m0 + m) * N + n0 + r] = t;
      });
    });
  }
};

// x [M, K] fp32 -> the paired order Bf16Kernel reads
at::Tensor pair_x(const at::Tensor& x) {
  const int64_t M = x.size(0), K = x.size(1);
  at::Tensor out = at::empty_like(x);
  const float* src = x.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m) {
    const float* s = src + m * K;
    float* d = dst + m * K;
    int64_t k = 0;
    for (; k + 2 * L <= K; k += 2 * L)
      for (int j = 0; j < L; ++j) d[k + j] = s[k + 2 * j], d[k + L + j] = s[k + 2 * j + 1];
    for (; k < K; ++k) d[k] = s[k];
  }
  return out;
}

// ---- ops -------------------------------------------------------------------------------------

inline void store_row(const float* src, int64_t K, float* dst) {
  std::memcpy(dst, src, K * sizeof(float));
}

inline void store_row(const float* src, int64_t K, c10::BFloat16* dst) {
  int64_t k = 0;
  for (; k + L <= K; k += L) simd::store(dst + k, simd::load(src + k));  // nearest even
  for (; k < K; ++k) dst[k] = c10::BFloat16(src[k]);
}

// x [M, K] as contiguous fp32 (bf16 is converted: a few KB, cheaper here than another op)
at::Tensor float_x(const at::Tensor& x, int64_t K, const char* op) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K, op, ": x must be [M, ", K, "], got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, op,
              ": x must be fp32 or bf16, got ", x.scalar_type());
  if (x.scalar_type() == at::kFloat) return x.contiguous();
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty(xc.sizes(), xc.options().dtype(at::kFloat));
  const c10::BFloat16* src = xc.data_ptr<c10::BFloat16>();
  float* dst = out.data_ptr<float>();
  for (int64_t i = 0; i < xc.numel(); ++i) dst[i] = static_cast<float>(src[i]);
  return out;
}

// y (fp32) in the dtype of x, rounded to nearest even for bf16
at::Tensor like_x(const at::Tensor& y, const at::Tensor& x) {
  if (x.scalar_type() == at::kFloat) return y;
  at::Tensor out = at::empty(y.sizes(), y.options().dtype(at::kBFloat16));
  store_row(y.data_ptr<float>(), y.numel(), out.data_ptr<c10::BFloat16>());
  return out;
}

// qx: quantize x to int8 and use integer dot products (q8.cpp) where K % 32 == 0
at::Tensor int8_mv(const at::Tensor& x_in, const at::Tensor& w, const at::Tensor& scales,
                   bool qx) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kChar && w.is_contiguous(),
              "int8_mv: w must be contiguous int8 [N, K]");
  const int64_t N = w.size(0), K = w.size(1);
  const at::Tensor x = float_x(x_in, K, "int8_mv");
  const int64_t M = x.size(0);
  TORCH_CHECK(K % 16 == 0, "int8_mv: K must be a multiple of 16, got ", K);
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.numel() == N && scales.is_contiguous(),
              "int8_mv: scales must be contiguous fp32 [N]");
  if (qx && K % q8::kBlock == 0) return like_x(q8::int8_mv(x, w, scales), x_in);
  at::Tensor y = at::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const int8_t* wp = w.data_ptr<int8_t>();
  const float* sp = scales.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const Int8Kernel kernel{xp, wp, sp, yp, K, N};
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    for_blocks(kernel, M, n0, n1, 4 * K);  // x's row: 4 * K bytes
  });
  return like_x(y, x_in);
}

// sum of n (a multiple of 16) values, in fp32
template <typename T>
inline float group_sum(const T* x, int64_t n) {
  vf acc = simd::zero();
  for (int64_t k = 0; k < n; k += L) acc = simd::add(acc, simd::load(x + k));
  return simd::sum(acc);
}

at::Tensor int4_mv(const at::Tensor& x_in, const at::Tensor& w, const at::Tensor& sz,
                   int64_t group, bool qx) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kByte && w.is_contiguous(),
              "int4_mv: w must be contiguous uint8 [N, K/2]");
  const int64_t N = w.size(0), K = w.size(1) * 2;
  TORCH_CHECK(group % 64 == 0 && K % group == 0,
              "int4_mv: need group % 64 == 0 and K % group == 0; got group=", group, " K=", K);
  TORCH_CHECK(sz.scalar_type() == at::kFloat && sz.is_contiguous() && sz.dim() == 3 &&
                  sz.size(0) == N && sz.size(1) == K / group && sz.size(2) == 2,
              "int4_mv: sz must be contiguous fp32 [N, K/group, 2], got ", sz.sizes());
  if (qx) return like_x(q8::int4_mv(float_x(x_in, K, "int4_mv"), w, sz, group), x_in);
#if defined(__AVX512BF16__)
  const bool bf16 = x_in.scalar_type() == at::kBFloat16;
#else
  const bool bf16 = false;  // bf16 x is converted to fp32 (a few KB) and takes the fp32 path
#endif
  const at::Tensor x = bf16 ? x_in.contiguous() : float_x(x_in, K, "int4_mv");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K, "int4_mv: x must be [M, ", K, "], got ",
              x.sizes());
  const int64_t M = x.size(0), groups = K / group;
  at::Tensor xsum = at::empty({M, groups}, x.options().dtype(at::kFloat));  // x summed per group
  float* xs = xsum.data_ptr<float>();
  for (int64_t i = 0; i < M * groups; ++i)
    xs[i] = bf16 ? group_sum(x.data_ptr<c10::BFloat16>() + i * group, group)
                 : group_sum(x.data_ptr<float>() + i * group, group);
  at::Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const float* sp = sz.data_ptr<float>();
  float* yp = y.data_ptr<float>();
#if defined(__AVX512BF16__)
  if (bf16) {
    const Int4Bf16Kernel kernel{x.data_ptr<c10::BFloat16>(), xs, wp, sp, yp, K, group, N};
    at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    for_blocks(kernel, M, n0, n1, 2 * K);  // x's row: 2 * K bytes
  });
    return like_x(y, x_in);
  }
#endif
  const Int4Kernel kernel{x.data_ptr<float>(), xs, wp, sp, yp, K, group, N};
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    for_blocks(kernel, M, n0, n1, 4 * K);  // x's row: 4 * K bytes
  });
  return like_x(y, x_in);
}

// x [M, K] (fp32 or bf16) @ w.T for a bf16 w [N, K] -> [M, N] in x's dtype, fp32 arithmetic
at::Tensor bf16_mv(const at::Tensor& x_in, const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kBFloat16 && w.is_contiguous(),
              "bf16_mv: w must be contiguous bf16 [N, K], got ", w.scalar_type(), " ", w.sizes());
  const int64_t N = w.size(0), K = w.size(1);
  const at::Tensor x = pair_x(float_x(x_in, K, "bf16_mv"));
  const int64_t M = x.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const c10::BFloat16* wp = w.data_ptr<c10::BFloat16>();
  float* yp = y.data_ptr<float>();
  const Bf16Kernel kernel{xp, wp, yp, K, N};
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    for_blocks(kernel, M, n0, n1, 4 * K);  // x's row: 4 * K bytes
  });
  return like_x(y, x_in);
}

// The MoE of one decoding step: for each row, its chosen experts in ascending order (as the
// sorted dispatch adds them), each w2(silu(gate) * up) from the fused [2F, D] bank w13 and the
// [D, F] bank w2, weighted and summed. The same operations, in the same dtype, as the Python
// path in fast.py, without its ~35 Python-level steps per layer.
//   x [M, D], chosen [M, k] int64, weights [M, k] (x's dtype); banks [E, ...] as
//   int8_mv (bits 8: w [E, N, K] int8, s [E, N] fp32), int4_mv (bits 4: w [E, N, K/2], s = sz)
//   or bf16_mv (bits 16: w [E, N, K] bf16; s13 and s2 unused, e.g. empty)
at::Tensor moe_decode(const at::Tensor& x, const at::Tensor& chosen, const at::Tensor& weights,
                      const at::Tensor& w13, const at::Tensor& s13, const at::Tensor& w2,
                      const at::Tensor& s2, int64_t bits, int64_t group, bool qx) {
  TORCH_CHECK(bits == 8 || bits == 4 || bits == 16, "moe_decode: bits must be 8, 4 or 16, got ",
              bits);
  TORCH_CHECK(x.dim() == 2 && chosen.dim() == 2 && chosen.size(0) == x.size(0) &&
                  weights.sizes() == chosen.sizes() && chosen.scalar_type() == at::kLong &&
                  weights.scalar_type() == x.scalar_type(),
              "moe_decode: need x [M, D], chosen int64 [M, k] and weights [M, k] in x's dtype");
  TORCH_CHECK(w13.dim() == 3 && w2.dim() == 3 && w13.size(0) == w2.size(0),
              "moe_decode: banks must be [E, N, K]");
  const int64_t E = w13.size(0), F = w13.size(1) / 2, k = chosen.size(1);
  const at::Tensor ids = chosen.contiguous();
  const int64_t* ip = ids.data_ptr<int64_t>();
  auto mv = [&](const at::Tensor& in, const at::Tensor& w, const at::Tensor& s, int64_t e) {
    if (bits == 16) return bf16_mv(in, w.select(0, e));
    return bits == 8 ? int8_mv(in, w.select(0, e), s.select(0, e), qx)
                     : int4_mv(in, w.select(0, e), s.select(0, e), group, qx);
  };
  std::vector<at::Tensor> rows;
  for (int64_t m = 0; m < x.size(0); ++m) {
    std::vector<std::pair<int64_t, int64_t>> order;  // (expert, its column in chosen)
    for (int64_t j = 0; j < k; ++j) {
      TORCH_CHECK(ip[m * k + j] >= 0 && ip[m * k + j] < E, "moe_decode: expert ",
                  ip[m * k + j], " outside 0..", E - 1);
      order.emplace_back(ip[m * k + j], j);
    }
    std::sort(order.begin(), order.end());
    const at::Tensor xm = x.narrow(0, m, 1);
    at::Tensor out;
    for (const auto& [e, j] : order) {
      const at::Tensor h = mv(xm, w13, s13, e);  // [1, 2F]
      const at::Tensor act = at::silu(h.narrow(1, 0, F)).mul_(h.narrow(1, F, F));
      const at::Tensor term = mv(act, w2, s2, e).mul_(weights[m][j]);
      out = out.defined() ? out.add_(term) : term;
    }
    rows.push_back(out);
  }
  return rows.size() == 1 ? rows[0] : at::cat(rows);
}

// The float weight a quantized one stands for, in `dtype` (fp32 or bf16): long prompts
// multiply by it with the float GEMM, which beats any matrix-vector kernel once x has many rows.
template <typename T, typename Row>
void dequant_rows(int64_t N, int64_t K, T* out, const Row& row) {
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    std::vector<float> buf(K);
    for (int64_t n = n0; n < n1; ++n) {
      row(n, buf.data());
      store_row(buf.data(), K, out + n * K);
    }
  });
}

// into `out` [N, K] (a buffer the caller reuses: fresh pages would cost more than the work)
template <typename Row>
at::Tensor dequant(int64_t N, int64_t K, const at::Tensor& out, const Row& row) {
  TORCH_CHECK((out.scalar_type() == at::kFloat || out.scalar_type() == at::kBFloat16) &&
                  out.is_contiguous() && out.dim() == 2 && out.size(0) == N && out.size(1) == K,
              "dequantize: out must be contiguous fp32 or bf16 [", N, ", ", K, "], got ",
              out.scalar_type(), " ", out.sizes());
  if (out.scalar_type() == at::kFloat)
    dequant_rows(N, K, out.data_ptr<float>(), row);
  else
    dequant_rows(N, K, out.data_ptr<c10::BFloat16>(), row);
  return out;
}

at::Tensor int8_dequant(const at::Tensor& w, const at::Tensor& scales, const at::Tensor& out) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kChar && w.is_contiguous() &&
                  w.size(1) % 16 == 0 && scales.scalar_type() == at::kFloat &&
                  scales.numel() == w.size(0),
              "int8_dequant: need contiguous int8 w [N, K], K % 16 == 0, fp32 scales [N]");
  const int64_t K = w.size(1);
  const int8_t* wp = w.data_ptr<int8_t>();
  const float* sp = scales.data_ptr<float>();
  return dequant(w.size(0), K, out, [&](int64_t n, float* row) {
    const int8_t* wn = wp + n * K;
    const vf s = simd::set1(sp[n]);
    for (int64_t k = 0; k < K; k += L) simd::store(row + k, simd::mul(simd::load_i8(wn + k), s));
  });
}

at::Tensor int4_dequant(const at::Tensor& w, const at::Tensor& sz, int64_t group,
                        const at::Tensor& out) {
  const int64_t K = w.size(1) * 2, groups = K / group;
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kByte && w.is_contiguous() &&
                  group % 64 == 0 && K % group == 0 && sz.scalar_type() == at::kFloat &&
                  sz.is_contiguous() && sz.numel() == w.size(0) * groups * 2,
              "int4_dequant: need contiguous uint8 w [N, K/2], fp32 sz [N, K/group, 2]");
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const float* sp = sz.data_ptr<float>();
  return dequant(w.size(0), K, out, [&](int64_t n, float* row) {
    const uint8_t* wn = wp + n * (K / 2);
    for (int64_t k = 0; k < K; k += 64) {  // a 64-column chunk lies in one group
      const float* so = sp + (n * groups + k / group) * 2;
      const vf s = simd::set1(so[0]), o = simd::set1(so[1]);
      for (int i = 0; i < 32; i += L) {
        vf lo, hi;
        simd::nibbles(wn + k / 2 + i, lo, hi);
        simd::store(row + k + i, simd::fmadd(lo, s, o));
        simd::store(row + k + 32 + i, simd::fmadd(hi, s, o));
      }
    }
  });
}

}  // namespace

MIXTRAL_LIBRARY(m) {
  m.def("int8_mv(Tensor x, Tensor w, Tensor scales, bool qx=False) -> Tensor");
  m.def("int4_mv(Tensor x, Tensor w, Tensor sz, int group, bool qx=False) -> Tensor");
  m.def("bf16_mv(Tensor x, Tensor w) -> Tensor");
  m.def("moe_decode(Tensor x, Tensor chosen, Tensor weights, Tensor w13, Tensor s13, "
        "Tensor w2, Tensor s2, int bits, int group, bool qx=False) -> Tensor");
  m.def("int8_dequant(Tensor w, Tensor scales, Tensor(a!) out) -> Tensor(a!)");
  m.def("int4_dequant(Tensor w, Tensor sz, int group, Tensor(a!) out) -> Tensor(a!)");
}

MIXTRAL_IMPL(m) {
  m.impl("int8_mv", int8_mv);
  m.impl("int4_mv", int4_mv);
  m.impl("bf16_mv", bf16_mv);
  m.impl("moe_decode", moe_decode);
  m.impl("int8_dequant", int8_dequant);
  m.impl("int4_dequant", int4_dequant);
}
