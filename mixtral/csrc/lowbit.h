// What the matrix-vector ops share across files (lowbit.cpp, bf16.cpp, moe.cpp, dequant.cpp):
// the ops themselves, for the MoE step to call, and the conversions of x and y. In the tier's
// own namespace (MIXTRAL_NS, e.g. mixtral_avx2), so that several tiers' builds live in one
// process.

#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "simd.h"

namespace MIXTRAL_NS::lowbit {

// x [M, K] @ W.T -> [M, N] in x's dtype (fp32 or bf16), fp32 arithmetic; layouts in lowbit.cpp
at::Tensor int8_mv(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales, bool qx);
at::Tensor int4_mv(const at::Tensor& x, const at::Tensor& w, const at::Tensor& sz, int64_t group,
                   bool qx);
at::Tensor bf16_mv(const at::Tensor& x, const at::Tensor& w);

// A product on x [..., K] with more than two dimensions (a decoding step's [B, 1, K]): `op`
// on x seen as [M, K], its y [M, N] seen as [..., N]. In C++ the two views cost well under
// a microsecond; from Python each was a dispatch of several.
template <typename Op>
at::Tensor on_rows(const at::Tensor& x, const Op& op) {
  const at::Tensor y = op(x.reshape({-1, x.size(-1)}));
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() = y.size(1);
  return y.view(shape);
}

// x [M, K] as contiguous fp32 (bf16 is converted: a few KB, cheaper here than another op);
// `op` names the caller in errors
at::Tensor float_x(const at::Tensor& x, int64_t K, const char* op);

// y (fp32) in the dtype of x, rounded to nearest even for bf16
at::Tensor like_x(const at::Tensor& y, const at::Tensor& x);

inline void store_row(const float* src, int64_t K, float* dst) {
  std::memcpy(dst, src, K * sizeof(float));
}

inline void store_row(const float* src, int64_t K, c10::BFloat16* dst) {
  int64_t k = 0;
  for (; k + simd::L <= K; k += simd::L) simd::store(dst + k, simd::load(src + k));  // nearest even
  for (; k < K; ++k) dst[k] = c10::BFloat16(src[k]);
}

}  // namespace MIXTRAL_NS::lowbit
