// int4 scales from the file's form into our kernels' (the bytes need nothing: the kernels read
// the file's own, lowbit.cpp). It runs when a model loads and each time an offloaded expert
// is paged in (in place there).

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "simd.h"

namespace {

// The file's scales_and_zeros [..., K/g, N, 2] (scale, zero with w = (q - 8) * scale + zero) ->
// ours [..., N, K/g, 2] fp32 (scale, offset with w = q * scale + offset), each value first
// rounded to `dtype` as PyTorch's int4 module holds them (Int4Linear), so that an expert paged
// in here equals one loaded resident. One pass, where a transpose, two casts and a stack in
// PyTorch operations took ~3 ms an expert of Mixtral's (mixtral.offload packs at each miss).
template <typename R>
void scales_as(const float* s, float* o, int64_t m, int64_t groups, int64_t n) {
  at::parallel_for(0, m * n, 1024, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {  // r: one output row (matrix b, row i)
      const int64_t b = r / n, i = r % n;
      const float* src = s + (b * groups * n + i) * 2;
      float* dst = o + r * groups * 2;
      for (int64_t g = 0; g < groups; ++g) {
        const float scale = static_cast<float>(static_cast<R>(src[g * n * 2]));
        const float zero = static_cast<float>(static_cast<R>(src[g * n * 2 + 1]));
        dst[2 * g] = scale;
        dst[2 * g + 1] = zero - 8 * scale;
      }
    }
  });
}

// `into`: where to write (undefined: a new tensor)
at::Tensor int4_scales_into(const at::Tensor& scales_and_zeros, at::ScalarType dtype,
                            const at::Tensor& into) {
  TORCH_CHECK(scales_and_zeros.dim() >= 3 && scales_and_zeros.size(-1) == 2,
              "int4_scales: expected scales_and_zeros [..., K/g, N, 2], got ",
              scales_and_zeros.sizes());
  const at::Tensor s = scales_and_zeros.to(at::kFloat).contiguous();
  const int64_t groups = s.size(-3), n = s.size(-2), m = s.numel() / (groups * n * 2);
  std::vector<int64_t> shape(s.sizes().begin(), s.sizes().end());
  std::swap(shape[shape.size() - 3], shape[shape.size() - 2]);
  at::Tensor out = into.defined() ? into.narrow(0, 0, s.numel()).view(shape)
                                  : at::empty(shape, s.options());
  const float* src = s.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  if (dtype == at::kFloat) {
    scales_as<float>(src, dst, m, groups, n);
  } else if (dtype == at::kBFloat16) {
    scales_as<c10::BFloat16>(src, dst, m, groups, n);
  } else if (dtype == at::kHalf) {
    scales_as<c10::Half>(src, dst, m, groups, n);
  } else {
    TORCH_CHECK(false, "int4_scales: dtype must be float32, bfloat16 or float16, got ", dtype);
  }
  return out;
}

at::Tensor int4_scales(const at::Tensor& scales_and_zeros, at::ScalarType dtype) {
  return int4_scales_into(scales_and_zeros, dtype, at::Tensor());
}

// The same in place (a paged-in expert's scales, as read: fp32, contiguous), through a scratch
// buffer this thread keeps: no fresh memory to fault in at each miss.
void int4_scales_(at::Tensor& scales_and_zeros, at::ScalarType dtype) {
  TORCH_CHECK(scales_and_zeros.scalar_type() == at::kFloat && scales_and_zeros.is_contiguous(),
              "int4_scales_: expected contiguous fp32 scales_and_zeros");
  thread_local at::Tensor scratch;
  if (!scratch.defined() || scratch.numel() < scales_and_zeros.numel())
    scratch = at::empty({scales_and_zeros.numel()}, scales_and_zeros.options());
  const at::Tensor out = int4_scales_into(scales_and_zeros, dtype, scratch);
  std::memcpy(scales_and_zeros.data_ptr<float>(), out.data_ptr<float>(),
              sizeof(float) * scales_and_zeros.numel());
}

}  // namespace

MIXTRAL_FRAGMENT(m) {
  m.def("int4_scales(Tensor scales_and_zeros, ScalarType dtype) -> Tensor");
  m.def("int4_scales_(Tensor(a!) scales_and_zeros, ScalarType dtype) -> ()");
}

MIXTRAL_IMPL(m) {
  m.impl("int4_scales", int4_scales);
  m.impl("int4_scales_", int4_scales_);
}
