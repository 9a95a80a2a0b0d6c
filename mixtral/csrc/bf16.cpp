// bf16 weights times fp32 activations, for CPUs where oneDNN cannot pack bf16 weights (AVX2),
// whose bf16 F.linear converts the whole weight first: w [N, K] bf16, an nn.Linear weight as it
// is. Decoding streams it at memory speed (measured ~30 GB/s on 2 cores, what a plain read of
// memory reaches there); the conversion is a shift, no arithmetic.

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <cstdint>
#include <type_traits>
#include <utility>

#include "lowbit.h"
#include "simd.h"

namespace MIXTRAL_NS::lowbit {
namespace {

using simd::L;
using simd::vf;
using simd::for_blocks;
using simd::total;
using simd::unrolled;
using simd::zero;

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

}  // namespace

// x [M, K] (fp32 or bf16) @ w.T for a bf16 w [N, K] -> [M, N] in x's dtype, fp32 arithmetic;
// x [..., K] -> [..., N]
at::Tensor bf16_mv(const at::Tensor& x_in, const at::Tensor& w) {
  if (x_in.dim() > 2)
    return on_rows(x_in, [&](const at::Tensor& x2) { return bf16_mv(x2, w); });
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

}  // namespace MIXTRAL_NS::lowbit

MIXTRAL_IMPL(m) { m.impl("bf16_mv", MIXTRAL_NS::lowbit::bf16_mv); }
