// Matrix-vector products on int8-quantized activations (q8.cpp), called by lowbit.cpp's ops
// when asked to quantize x. In the tier's own namespace (MIXTRAL_NS, e.g. mixtral_avx2), so that
// several tiers' builds can live in one process.

#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace MIXTRAL_NS::q8 {

// Columns per activation block, each with its own fp32 scale (llama.cpp's Q8_0 block).
constexpr int64_t kBlock = 32;

// x [M, K] contiguous fp32 (K % 32 == 0; for int4 in the nibbles' order, lowbit.cpp's
// nibble_x), the weights as lowbit.cpp's int8_mv and int4_mv take them (checked there)
// -> y [M, N] fp32
at::Tensor int8_mv(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales);
at::Tensor int4_mv(const at::Tensor& x, const at::Tensor& w, const at::Tensor& sz, int64_t group);

}  // namespace MIXTRAL_NS::q8
