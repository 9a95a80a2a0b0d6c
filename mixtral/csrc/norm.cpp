// RMSNorm as one op: model.py's RMSNorm is eight PyTorch operations (two dtype round trips,
// pow, mean, add, rsqrt, two products), each a few microseconds of dispatch and allocation for
// a few thousand multiplications; a decoding step of the bench model runs 17 of them.
//
//   x [..., D] fp32 or bf16, weight [D] in x's dtype -> weight * (x * r) in x's dtype,
//   r = 1 / sqrt(mean(x^2) + eps), all in fp32 as the reference computes it:
//   (x * r) is rounded to x's dtype, then multiplied by the weight (for bf16 the product of
//   two bf16 values is exact in fp32 and rounded once, as PyTorch's bf16 multiply does).
//
// Equal to the reference, bit for bit: the one step whose order of operations matters, the
// mean of the squares, is PyTorch's own (at::pow, at::mean on the row in fp32, whose summation
// order depends on the vector width PyTorch dispatches at); the rest is elementwise and done
// here in the reference's order and precision. Two ATen calls from C++ cost about a
// microsecond; the eight from Python, with their dtype round trips, ~50 on the shared machine.

#include <ATen/ops/empty_like.h>
#include <ATen/ops/mean.h>
#include <ATen/ops/pow.h>

#include <cmath>
#include <cstdint>

#include "simd.h"

namespace {

// one row: y = weight * (x * r) with r = 1 / sqrt(mean + eps), rounded where the reference is
template <typename T>
void normalize(const T* x, const T* w, int64_t D, float mean, float eps, T* y) {
  const float r = 1.0f / std::sqrt(mean + eps);  // add, then rsqrt: 1 / sqrt in ATen too
  for (int64_t i = 0; i < D; ++i) {
    const T scaled = static_cast<T>(static_cast<float>(x[i]) * r);  // rounded to x's dtype
    y[i] = static_cast<T>(static_cast<float>(w[i]) * static_cast<float>(scaled));
  }
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.dim() >= 1 && weight.dim() == 1 && x.size(-1) == weight.size(0),
              "rms_norm: need x [..., D] and weight [D], got ", x.sizes(), " and ",
              weight.sizes());
  TORCH_CHECK(x.scalar_type() == weight.scalar_type() &&
                  (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "rms_norm: x and weight must both be fp32 or both bf16, got ", x.scalar_type(),
              " and ", weight.scalar_type());
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous();
  at::Tensor y = at::empty_like(xc);
  const int64_t D = x.size(-1), M = D ? xc.numel() / D : 0;
  const at::Tensor xf = xc.to(at::kFloat);  // exact; xc itself when fp32
  const at::Tensor mean = at::mean(at::pow(xf, 2), {-1}, true).contiguous();  // PyTorch's order
  const float* mp = mean.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m) {
    if (x.scalar_type() == at::kFloat)
      normalize(xc.data_ptr<float>() + m * D, wc.data_ptr<float>(), D, mp[m], float(eps),
                y.data_ptr<float>() + m * D);
    else
      normalize(xc.data_ptr<c10::BFloat16>() + m * D, wc.data_ptr<c10::BFloat16>(), D, mp[m],
                float(eps), y.data_ptr<c10::BFloat16>() + m * D);
  }
  return y;
}

}  // namespace

MIXTRAL_FRAGMENT(m) { m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor"); }

MIXTRAL_IMPL(m) { m.impl("rms_norm", rms_norm); }
