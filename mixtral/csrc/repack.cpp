// int4 weights from the file's portable bytes into our kernels' layout, at memory speed.
//
//   portable (mixtral/quant/int4.py): byte j of a row holds column 2j in its high nibble and
//             column 2j + 1 in its low one
//   ours (lowbit.cpp): each 64 columns are 32 bytes, byte i holding column i in its low nibble
//             and column i + 32 in its high one
//
// So bytes t and 16 + t of a 32-byte chunk of portable bytes (columns 2t, 2t+1 and
// 32 + 2t, 33 + 2t) make bytes 2t and 2t + 1 of ours. It runs when a model loads and each
// time an offloaded expert is paged in (in place there), where a shuffle in PyTorch operations
// took ~0.3-0.5 s per 14336 x 4096 matrix.

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "simd.h"

namespace {

// One 32-byte chunk: its 16 byte pairs (t, 16 + t) -> bytes (2t, 2t + 1), with 16-byte vectors
// (both halves are loaded before anything is stored, so `d` may be `s`).
inline void repack_chunk(const uint8_t* s, uint8_t* d) {
  const __m128i lo = _mm_set1_epi8(0x0F), hi = _mm_set1_epi8(static_cast<char>(0xF0));
  const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s));
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + 16));
  const __m128i even = _mm_or_si128(_mm_and_si128(_mm_srli_epi16(a, 4), lo),
                                    _mm_and_si128(b, hi));  // (a >> 4) | (b & 0xF0)
  const __m128i odd = _mm_or_si128(_mm_and_si128(a, lo),
                                   _mm_and_si128(_mm_slli_epi16(b, 4), hi));  // (a & 15) | b << 4
  _mm_storeu_si128(reinterpret_cast<__m128i*>(d), _mm_unpacklo_epi8(even, odd));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(d + 16), _mm_unpackhi_epi8(even, odd));
}

void check(const at::Tensor& portable, const char* op) {
  TORCH_CHECK(portable.scalar_type() == at::kByte && portable.dim() >= 1, op,
              ": expected uint8 [..., N, K/2], got ", portable.scalar_type(), " ",
              portable.sizes());
  TORCH_CHECK(portable.size(-1) % 32 == 0, op, ": K = ", 2 * portable.size(-1),
              " is not a multiple of 64");
}

void repack(const uint8_t* p, uint8_t* o, int64_t chunks) {
  at::parallel_for(0, chunks, 4096, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) repack_chunk(p + 32 * c, o + 32 * c);
  });
}

at::Tensor int4_repack(const at::Tensor& portable) {
  check(portable, "int4_repack");
  const at::Tensor src = portable.contiguous();
  at::Tensor out = at::empty_like(src);
  repack(src.data_ptr<uint8_t>(), out.data_ptr<uint8_t>(), src.numel() / 32);
  return out;
}

// In place, for bytes nothing else holds (an offloaded expert just read): no second buffer.
at::Tensor& int4_repack_(at::Tensor& portable) {
  check(portable, "int4_repack_");
  TORCH_CHECK(portable.is_contiguous(), "int4_repack_: expected a contiguous tensor");
  repack(portable.data_ptr<uint8_t>(), portable.data_ptr<uint8_t>(), portable.numel() / 32);
  return portable;
}

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
  m.def("int4_repack(Tensor portable) -> Tensor");
  m.def("int4_repack_(Tensor(a!) portable) -> Tensor(a!)");
  m.def("int4_scales(Tensor scales_and_zeros, ScalarType dtype) -> Tensor");
  m.def("int4_scales_(Tensor(a!) scales_and_zeros, ScalarType dtype) -> ()");
}

MIXTRAL_IMPL(m) {
  m.impl("int4_repack", int4_repack);
  m.impl("int4_repack_", int4_repack_);
  m.impl("int4_scales", int4_scales);
  m.impl("int4_scales_", int4_scales_);
}
