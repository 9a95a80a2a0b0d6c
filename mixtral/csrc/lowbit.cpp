// Weight-only int8 and int4 matrix-vector products on fp32 activations, for decoding on CPU (a
// few rows of x). bf16 weights: bf16.cpp; int8-quantized activations (AVX2's default):
// q8.cpp; the MoE step on these: moe.cpp; dequantizing for prompts: dequant.cpp.
//
// Decoding is memory-bound: each weight byte is read once per step, so the kernel's job is to
// stream the weights at the machine's bandwidth while converting them to fp32 on the fly.
// For one row of x on this project's 2-core machine (Zen 5, ~40-45 GB/s), PyTorch's own
// low-bit kernels (_weight_int8pack_mm, _weight_int4pack_mm_for_cpu) stream 25-32 GB/s at its
// AVX-512 dispatch and int4 at 9 at AVX2; these stream int8 at 34-47 GB/s on every tier, int4
// at 28-42 on AVX-512 and 20-24 on AVX2, where converting the nibbles to fp32 is the limit
// (~13 GB/s a core; hence q8.cpp there). Written once for every tier in terms of simd.h (8 fp32
// lanes on AVX2, 16 on AVX-512).
//
// Layouts:
//   int8  w [N, K] int8, one fp32 scale per row:            y = scale[n] * sum_k x[k] w[n, k]
//   int4  w [N, K/2] uint8, the checkpoint's own portable bytes (mixtral/quant/int4.py): byte j
//         of a row holds column 2j in its high nibble and column 2j + 1 in its low one, so the
//         weights are read as the file stores them, with no repacking at load or when an
//         offloaded expert pages in. One load of bytes gives the odd columns (low nibbles) and
//         the even ones (high nibbles), so x comes in that order instead (nibble_x: in each 64
//         columns, the 32 odd ones, then the 32 even ones; K floats a call, where repacking
//         the weight moved all of its bytes). sz [N, K/g, 2] fp32 = (scale, offset) per group
//         of g columns (g % 64 == 0), the weight being q * scale + offset (q in 0..15):
//         y = sum_groups scale * sum_k x[k] q[k] + offset * sum_k x[k]
//
// x is fp32 or bf16 [M, K] (or [..., K], y then [..., N]); the arithmetic is fp32 and y [M, N]
// comes back in x's dtype. With
// `qx` the ops hand x to q8.cpp instead (quantized to int8 per 32 columns; the fast module
// asks for it where the probe says so). Work is split over output rows with at::parallel_for,
// i.e. PyTorch's own OpenMP team. This file also declares every op's schema (one list).

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "lowbit.h"
#include "q8.h"
#include "simd.h"

namespace MIXTRAL_NS::lowbit {
namespace {

namespace q8 = MIXTRAL_NS::q8;
using simd::L;
using simd::vf;
using simd::add_all;
using simd::for_blocks;
using simd::total;
using simd::unrolled;
using simd::zero;

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
        unrolled<32 / L>([&](auto v) {  // bytes v*L.. of the chunk: x's k+i.. and k+32+i..
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

}  // namespace

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
  if (x_in.dim() > 2)
    return on_rows(x_in, [&](const at::Tensor& x2) { return int8_mv(x2, w, scales, qx); });
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

// x [M, K] (K % 64 == 0) in the order of int4 weights' nibbles: in each 64 columns, the odd
// ones, then the even ones. T = float: as fp32 (bf16 x converted); T = c10::BFloat16: x is
// bf16 already and stays so (the AVX512-BF16 kernel's input)
template <typename T>
at::Tensor nibble_x(const at::Tensor& x_in, int64_t K, const char* op) {
  const at::Tensor x = std::is_same_v<T, float> ? float_x(x_in, K, op) : x_in.contiguous();
  at::Tensor out = at::empty_like(x);
  const T* src = x.data_ptr<T>();
  T* dst = out.data_ptr<T>();
  for (int64_t k = 0; k < x.numel(); k += 64)
    for (int i = 0; i < 32; ++i) dst[k + i] = src[k + 2 * i + 1], dst[k + 32 + i] = src[k + 2 * i];
  return out;
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
  if (x_in.dim() > 2)
    return on_rows(x_in, [&](const at::Tensor& x2) { return int4_mv(x2, w, sz, group, qx); });
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kByte && w.is_contiguous(),
              "int4_mv: w must be contiguous uint8 [N, K/2]");
  const int64_t N = w.size(0), K = w.size(1) * 2;
  TORCH_CHECK(group % 64 == 0 && K % group == 0,
              "int4_mv: need group % 64 == 0 and K % group == 0; got group=", group, " K=", K);
  TORCH_CHECK(sz.scalar_type() == at::kFloat && sz.is_contiguous() && sz.dim() == 3 &&
                  sz.size(0) == N && sz.size(1) == K / group && sz.size(2) == 2,
              "int4_mv: sz must be contiguous fp32 [N, K/group, 2], got ", sz.sizes());
  if (qx) return like_x(q8::int4_mv(nibble_x<float>(x_in, K, "int4_mv"), w, sz, group), x_in);
#if defined(__AVX512BF16__)
  const bool bf16 = x_in.scalar_type() == at::kBFloat16;
#else
  const bool bf16 = false;  // bf16 x is converted to fp32 (a few KB) and takes the fp32 path
#endif
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(1) == K, "int4_mv: x must be [M, ", K, "], got ",
              x_in.sizes());
  const at::Tensor x = bf16 ? nibble_x<c10::BFloat16>(x_in, K, "int4_mv")
                            : nibble_x<float>(x_in, K, "int4_mv");
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

}  // namespace MIXTRAL_NS::lowbit

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
  m.impl("int8_mv", MIXTRAL_NS::lowbit::int8_mv);
  m.impl("int4_mv", MIXTRAL_NS::lowbit::int4_mv);
}
