// int4 weights from the file's portable bytes into our kernels' layout, at memory speed.
//
//   portable (mixtral/quant/int4.py): byte j of a row holds column 2j in its high nibble and
//             column 2j + 1 in its low one
//   ours (lowbit.cpp): each 64 columns are 32 bytes, byte i holding column i in its low nibble
//             and column i + 32 in its high one
//
// So bytes t and 16 + t of a 32-byte chunk of portable bytes (columns 2t, 2t+1 and
// 32 + 2t, 33 + 2t) make bytes 2t and 2t + 1 of ours. It runs when a model loads and each
// time an offloaded expert is paged in, where a shuffle in PyTorch operations took ~0.3-0.5 s
// per 14336 x 4096 matrix; plain loops that the compiler vectorises, no intrinsics.

#include <ATen/Parallel.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cstdint>

#include "simd.h"

namespace {

at::Tensor int4_repack(const at::Tensor& portable) {
  TORCH_CHECK(portable.scalar_type() == at::kByte && portable.dim() >= 1,
              "int4_repack: expected uint8 [..., N, K/2], got ", portable.scalar_type(), " ",
              portable.sizes());
  const int64_t half = portable.size(-1);
  TORCH_CHECK(half % 32 == 0, "int4_repack: K = ", 2 * half, " is not a multiple of 64");
  const at::Tensor src = portable.contiguous();
  at::Tensor out = at::empty_like(src);
  const uint8_t* p = src.data_ptr<uint8_t>();
  uint8_t* o = out.data_ptr<uint8_t>();
  const int64_t chunks = src.numel() / 32;
  at::parallel_for(0, chunks, 4096, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const uint8_t* s = p + 32 * c;
      uint8_t* d = o + 32 * c;
      for (int t = 0; t < 16; ++t) {
        const uint8_t a = s[t], b = s[16 + t];
        d[2 * t] = static_cast<uint8_t>((a >> 4) | (b & 0xF0));
        d[2 * t + 1] = static_cast<uint8_t>((a & 0x0F) | (b << 4));
      }
    }
  });
  return out;
}

}  // namespace

MIXTRAL_FRAGMENT(m) { m.def("int4_repack(Tensor portable) -> Tensor"); }

MIXTRAL_IMPL(m) { m.impl("int4_repack", int4_repack); }
