// The float weight an int8 or int4 one stands for, for prompts on float activations: the
// float GEMM then beats any matrix-vector kernel once x has many rows. (On int8 activations,
// AVX2's default, q8.cpp's integer products take prompts too.)

#include <ATen/Parallel.h>

#include <cstdint>
#include <vector>

#include "lowbit.h"
#include "simd.h"

namespace MIXTRAL_NS::lowbit {
namespace {

using simd::L;
using simd::vf;

// rows of the weight, each made by row(n, fp32 buffer), stored in T
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
      for (int i = 0; i < 32; i += L) {  // bytes i..i+L-1: columns 2i..2i+2L-1
        vf lo, hi, first, second;
        simd::nibbles(wn + k / 2 + i, lo, hi);  // the odd columns, the even ones
        simd::zip(simd::fmadd(hi, s, o), simd::fmadd(lo, s, o), first, second);
        simd::store(row + k + 2 * i, first);
        simd::store(row + k + 2 * i + L, second);
      }
    }
  });
}

}  // namespace
}  // namespace MIXTRAL_NS::lowbit

MIXTRAL_IMPL(m) {
  m.impl("int8_dequant", MIXTRAL_NS::lowbit::int8_dequant);
  m.impl("int4_dequant", MIXTRAL_NS::lowbit::int4_dequant);
}
