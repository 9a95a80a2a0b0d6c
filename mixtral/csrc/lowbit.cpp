// Weight-only int8 and int4 matrix-vector products for decoding on CPU (a few rows of x).
//
// Decoding is memory-bound: each weight byte is read once per step, so the kernel's job is to
// stream the weights at the machine's bandwidth while converting them to fp32 on the fly.
// For one row of x, PyTorch's own low-bit kernels (_weight_int8pack_mm,
// _weight_int4pack_mm_for_cpu) stream 26-38 GB/s on this project's 2-core machine, these 36-58.
//
// Layouts (made once by mixtral/kernels.py from the portable checkpoint form):
//   int8  w [N, K] int8, one fp32 scale per row:            y = scale[n] * sum_k x[k] w[n, k]
//   int4  w [N, K/2] uint8; each 64 columns of a row are 32 bytes, byte i holding column i in
//         its low nibble and column i + 32 in its high nibble (so one load unpacks into vectors
//         in column order). sz [N, K/g, 2] fp32 = (scale, offset) per group of g columns
//         (g % 64 == 0), the weight being q * scale + offset (q in 0..15):
//         y = sum_groups scale * sum_k x[k] q[k] + offset * sum_k x[k]
//
// x is fp32 or bf16 [M, K] (M small; the caller dequantizes and uses a GEMM for long prompts);
// the arithmetic is fp32 and y [M, N] comes back in x's dtype.
// Work is split over output rows with at::parallel_for, i.e. PyTorch's own OpenMP team.

#include <ATen/Parallel.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/silu.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <utility>
#include <cstring>
#include <type_traits>
#include <vector>

#include <immintrin.h>

#if !defined(__AVX512F__) || !defined(__AVX512BW__)
#error "these kernels are AVX-512 (F, BW) code; mixtral.kernels builds them only on such CPUs"
#endif

namespace {

// ---- int8 ------------------------------------------------------------------------------------

// One output row n for MB rows of x. Rows are visited in memory order, so each thread streams
// one contiguous range of the weight matrix (what the hardware prefetcher follows best).
template <int MB>
inline void int8_row(const float* x, int64_t K, const int8_t* w, float scale, float* y,
                     int64_t N) {
  __m512 acc[MB][2];
  for (int m = 0; m < MB; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    const __m512i b = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k)));
    const __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm512_castsi512_si256(b)));
    const __m512 w1 = _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(b, 1)));
    for (int m = 0; m < MB; ++m) {
      acc[m][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + m * K + k), acc[m][0]);
      acc[m][1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + m * K + k + 16), acc[m][1]);
    }
  }
  for (; k < K; k += 16) {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k));
    const __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
    for (int m = 0; m < MB; ++m)
      acc[m][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + m * K + k), acc[m][0]);
  }
  for (int m = 0; m < MB; ++m)
    y[m * N] = scale * _mm512_reduce_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]));
}

inline void int8_rows(const float* x, int64_t M, int64_t K, const int8_t* w, const float* scale,
                      float* y, int64_t N, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) int8_row<4>(x + m * K, K, w + n * K, scale[n], y + m * N + n, N);
    for (; m + 2 <= M; m += 2) int8_row<2>(x + m * K, K, w + n * K, scale[n], y + m * N + n, N);
    for (; m < M; ++m) int8_row<1>(x + m * K, K, w + n * K, scale[n], y + m * N + n, N);
  }
}

// ---- int4 ------------------------------------------------------------------------------------

// One output row n: per group, acc = sum_k x[k] q[k], then y += scale * acc + offset * xsum.
// fp32 x: nibbles -> int32 -> fp32 and FMAs. bf16 x (AVX512-BF16): nibbles -> bf16 through a
// 16-entry table and vdpbf16ps, 32 products per instruction, exact (small integers times bf16
// are exact in fp32): half the instructions, which matters as int4 is nearly compute-bound.
template <int MB>
inline void int4_row(const float* x, const float* xsum, int64_t K, int64_t group,
                     const uint8_t* w, const float* sz, float* y, int64_t N) {
  const int64_t groups = K / group;
  __m512 total[MB];
  float off[MB];
  for (int m = 0; m < MB; ++m) total[m] = _mm512_setzero_ps(), off[m] = 0.f;
  const __m512i low = _mm512_set1_epi32(15);
  for (int64_t g = 0; g < groups; ++g) {
    __m512 acc[MB][2];
    for (int m = 0; m < MB; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
    for (int64_t k = g * group; k < (g + 1) * group; k += 64) {
      for (int half = 0; half < 2; ++half) {  // bytes 0-15, then 16-31 of the chunk
        const __m512i v = _mm512_cvtepu8_epi32(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k / 2 + 16 * half)));
        const __m512 lo = _mm512_cvtepi32_ps(_mm512_and_si512(v, low));  // columns k+16h+i
        const __m512 hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4));  // columns k+32+16h+i
        for (int m = 0; m < MB; ++m) {
          acc[m][0] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(x + m * K + k + 16 * half), acc[m][0]);
          acc[m][1] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(x + m * K + k + 32 + 16 * half),
                                      acc[m][1]);
        }
      }
    }
    const __m512 s = _mm512_set1_ps(sz[2 * g]);
    for (int m = 0; m < MB; ++m) {
      total[m] = _mm512_fmadd_ps(_mm512_add_ps(acc[m][0], acc[m][1]), s, total[m]);
      off[m] += sz[2 * g + 1] * xsum[m * groups + g];
    }
  }
  for (int m = 0; m < MB; ++m) y[m * N] = _mm512_reduce_add_ps(total[m]) + off[m];
}

#if defined(__AVX512BF16__)
template <int MB>
inline void int4_row_bf16(const c10::BFloat16* x, const float* xsum, int64_t K, int64_t group,
                          const uint8_t* w, const float* sz, float* y, int64_t N) {
  const int64_t groups = K / group;
  // bf16 bit patterns of 0..15 (entries 16-31 unused)
  const __m512i table = _mm512_set_epi16(
      0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x4170, 0x4160, 0x4150, 0x4140, 0x4130,
      0x4120, 0x4110, 0x4100, 0x40E0, 0x40C0, 0x40A0, 0x4080, 0x4040, 0x4000, 0x3F80, 0);
  const __m512i low = _mm512_set1_epi16(15);
  __m512 total[MB];
  float off[MB];
  for (int m = 0; m < MB; ++m) total[m] = _mm512_setzero_ps(), off[m] = 0.f;
  for (int64_t g = 0; g < groups; ++g) {
    __m512 acc[MB][2];
    for (int m = 0; m < MB; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
    for (int64_t k = g * group; k < (g + 1) * group; k += 64) {
      const __m512i v = _mm512_cvtepu8_epi16(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k / 2)));
      const __m512bh lo = (__m512bh)_mm512_permutexvar_epi16(_mm512_and_si512(v, low), table);
      const __m512bh hi = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(v, 4), table);
      for (int m = 0; m < MB; ++m) {
        const __m512bh x0 = (__m512bh)_mm512_loadu_si512(x + m * K + k);
        const __m512bh x1 = (__m512bh)_mm512_loadu_si512(x + m * K + k + 32);
        acc[m][0] = _mm512_dpbf16_ps(acc[m][0], lo, x0);
        acc[m][1] = _mm512_dpbf16_ps(acc[m][1], hi, x1);
      }
    }
    const __m512 s = _mm512_set1_ps(sz[2 * g]);
    for (int m = 0; m < MB; ++m) {
      total[m] = _mm512_fmadd_ps(_mm512_add_ps(acc[m][0], acc[m][1]), s, total[m]);
      off[m] += sz[2 * g + 1] * xsum[m * groups + g];
    }
  }
  for (int m = 0; m < MB; ++m) y[m * N] = _mm512_reduce_add_ps(total[m]) + off[m];
}
#endif

// X is float or c10::BFloat16 (the latter only with AVX512-BF16)
template <typename X>
inline void int4_rows(const X* x, const float* xsum, int64_t M, int64_t K, int64_t group,
                      const uint8_t* w, const float* sz, float* y, int64_t N, int64_t n0,
                      int64_t n1) {
  const int64_t groups = K / group;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* wn = w + n * (K / 2);
    const float* szn = sz + n * groups * 2;
    for (int64_t m = 0; m < M;) {
      const int64_t mb = M - m >= 4 ? 4 : M - m >= 2 ? 2 : 1;
      const X* xm = x + m * K;
      const float* xs = xsum + m * groups;
      float* ym = y + m * N + n;
      if constexpr (std::is_same_v<X, float>) {
        if (mb == 4) int4_row<4>(xm, xs, K, group, wn, szn, ym, N);
        else if (mb == 2) int4_row<2>(xm, xs, K, group, wn, szn, ym, N);
        else int4_row<1>(xm, xs, K, group, wn, szn, ym, N);
      } else {
#if defined(__AVX512BF16__)
        if (mb == 4) int4_row_bf16<4>(xm, xs, K, group, wn, szn, ym, N);
        else if (mb == 2) int4_row_bf16<2>(xm, xs, K, group, wn, szn, ym, N);
        else int4_row_bf16<1>(xm, xs, K, group, wn, szn, ym, N);
#endif
      }
      m += mb;
    }
  }
}

// ---- ops -------------------------------------------------------------------------------------

inline void store_row(const float* src, int64_t K, float* dst) {
  std::memcpy(dst, src, K * sizeof(float));
}

inline void store_row(const float* src, int64_t K, c10::BFloat16* dst) {
  int64_t k = 0;
  // round to nearest even, as c10::BFloat16 does (the weights are finite)
  const __m512i bias = _mm512_set1_epi32(0x7FFF), one = _mm512_set1_epi32(1);
  for (; k + 16 <= K; k += 16) {
    __m512i b = _mm512_castps_si512(_mm512_loadu_ps(src + k));
    b = _mm512_add_epi32(b, _mm512_add_epi32(bias, _mm512_and_si512(_mm512_srli_epi32(b, 16), one)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + k),
                        _mm512_cvtepi32_epi16(_mm512_srli_epi32(b, 16)));
  }
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

at::Tensor int8_mv(const at::Tensor& x_in, const at::Tensor& w, const at::Tensor& scales) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kChar && w.is_contiguous(),
              "int8_mv: w must be contiguous int8 [N, K]");
  const int64_t N = w.size(0), K = w.size(1);
  const at::Tensor x = float_x(x_in, K, "int8_mv");
  const int64_t M = x.size(0);
  TORCH_CHECK(K % 16 == 0, "int8_mv: K must be a multiple of 16, got ", K);
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.numel() == N && scales.is_contiguous(),
              "int8_mv: scales must be contiguous fp32 [N]");
  at::Tensor y = at::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const int8_t* wp = w.data_ptr<int8_t>();
  const float* sp = scales.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    int8_rows(xp, M, K, wp, sp, yp, N, n0, n1);
  });
  return like_x(y, x_in);
}

// sum of n (a multiple of 16) values, in fp32
inline float group_sum(const float* x, int64_t n) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t k = 0; k < n; k += 16) acc = _mm512_add_ps(acc, _mm512_loadu_ps(x + k));
  return _mm512_reduce_add_ps(acc);
}

inline float group_sum(const c10::BFloat16* x, int64_t n) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t k = 0; k < n; k += 16) {  // bf16 -> fp32: the 16 bits become the high half
    const __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + k)));
    acc = _mm512_add_ps(acc, _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)));
  }
  return _mm512_reduce_add_ps(acc);
}

at::Tensor int4_mv(const at::Tensor& x_in, const at::Tensor& w, const at::Tensor& sz,
                   int64_t group) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kByte && w.is_contiguous(),
              "int4_mv: w must be contiguous uint8 [N, K/2]");
  const int64_t N = w.size(0), K = w.size(1) * 2;
  TORCH_CHECK(group % 64 == 0 && K % group == 0,
              "int4_mv: need group % 64 == 0 and K % group == 0; got group=", group, " K=", K);
  TORCH_CHECK(sz.scalar_type() == at::kFloat && sz.is_contiguous() && sz.dim() == 3 &&
                  sz.size(0) == N && sz.size(1) == K / group && sz.size(2) == 2,
              "int4_mv: sz must be contiguous fp32 [N, K/group, 2], got ", sz.sizes());
#if defined(__AVX512BF16__)
  const bool bf16 = x_in.scalar_type() == at::kBFloat16;
#else
  const bool bf16 = false;
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
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    if (bf16)
      int4_rows(x.data_ptr<c10::BFloat16>(), xs, M, K, group, wp, sp, yp, N, n0, n1);
    else
      int4_rows(x.data_ptr<float>(), xs, M, K, group, wp, sp, yp, N, n0, n1);
  });
  return like_x(y, x_in);
}

// The MoE of one decoding step on quantized experts: for each row, its chosen experts in
// ascending order (as the sorted dispatch adds them), each w2(silu(gate) * up) from the fused
// [2F, D] bank w13 and the [D, F] bank w2, weighted and summed. The same operations, in the
// same dtype, as the Python path in fast.py, without its ~35 Python-level steps per layer.
//   x [M, D], chosen [M, k] int64, weights [M, k] (x's dtype); banks [E, ...] as int8_mv
//   (bits 8: w [E, N, K] int8, s [E, N] fp32) or int4_mv (bits 4: w [E, N, K/2], s = sz)
at::Tensor moe_decode(const at::Tensor& x, const at::Tensor& chosen, const at::Tensor& weights,
                      const at::Tensor& w13, const at::Tensor& s13, const at::Tensor& w2,
                      const at::Tensor& s2, int64_t bits, int64_t group) {
  TORCH_CHECK(bits == 8 || bits == 4, "moe_decode: bits must be 8 or 4, got ", bits);
  TORCH_CHECK(x.dim() == 2 && chosen.dim() == 2 && chosen.size(0) == x.size(0) &&
                  weights.sizes() == chosen.sizes() && chosen.scalar_type() == at::kLong &&
                  weights.scalar_type() == x.scalar_type(),
              "moe_decode: need x [M, D], chosen int64 [M, k] and weights [M, k] in x's dtype");
  TORCH_CHECK(w13.dim() == 3 && w2.dim() == 3 && w13.size(0) == w2.size(0),
              "moe_decode: banks must be [E, N, K]");
  const int64_t E = w13.size(0), F = w13.size(1) / 2, k = chosen.size(1);
  const at::Tensor ids = chosen.contiguous();
  const int64_t* ip = ids.data_ptr<int64_t>();
  auto mv = [&](const at::Tensor& in, const at::Tensor& w, const at::Tensor& sc) {
    return bits == 8 ? int8_mv(in, w, sc) : int4_mv(in, w, sc, group);
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
      const at::Tensor h = mv(xm, w13.select(0, e), s13.select(0, e));  // [1, 2F]
      const at::Tensor act = at::silu(h.narrow(1, 0, F)).mul_(h.narrow(1, F, F));
      const at::Tensor term = mv(act, w2.select(0, e), s2.select(0, e)).mul_(weights[m][j]);
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
    const __m512 s = _mm512_set1_ps(sp[n]);
    for (int64_t k = 0; k < K; k += 16) {
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wn + k));
      _mm512_storeu_ps(row + k, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b)), s));
    }
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
      const float s = sp[(n * groups + k / group) * 2], o = sp[(n * groups + k / group) * 2 + 1];
      const __m512 sv = _mm512_set1_ps(s), ov = _mm512_set1_ps(o);
      for (int half = 0; half < 2; ++half) {
        const __m512i v = _mm512_cvtepu8_epi32(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(wn + k / 2 + 16 * half)));
        const __m512 lo = _mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(15)));
        const __m512 hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4));
        _mm512_storeu_ps(row + k + 16 * half, _mm512_fmadd_ps(lo, sv, ov));
        _mm512_storeu_ps(row + k + 32 + 16 * half, _mm512_fmadd_ps(hi, sv, ov));
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY(mixtral, m) {
  m.def("int8_mv(Tensor x, Tensor w, Tensor scales) -> Tensor");
  m.def("int4_mv(Tensor x, Tensor w, Tensor sz, int group) -> Tensor");
  m.def("moe_decode(Tensor x, Tensor chosen, Tensor weights, Tensor w13, Tensor s13, "
        "Tensor w2, Tensor s2, int bits, int group) -> Tensor");
  m.def("int8_dequant(Tensor w, Tensor scales, Tensor(a!) out) -> Tensor(a!)");
  m.def("int4_dequant(Tensor w, Tensor sz, int group, Tensor(a!) out) -> Tensor(a!)");
}

TORCH_LIBRARY_IMPL(mixtral, CPU, m) {
  m.impl("int8_mv", int8_mv);
  m.impl("int4_mv", int4_mv);
  m.impl("moe_decode", moe_decode);
  m.impl("int8_dequant", int8_dequant);
  m.impl("int4_dequant", int4_dequant);
}
