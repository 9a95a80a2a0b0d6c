// One decoding step of attention, fused: RoPE on this step's query and key, the key and value
// written into the KV cache, and each query head attending over its cached positions.
//
// In PyTorch this is ~35 small operations per layer (rotations, dtype round trips, the cache
// scatter, two tiny batched matmuls, the softmax), each a few microseconds of dispatch for
// almost no arithmetic; here it is one call. The rounding points are the reference's
// (model.py / fast.py): rotated q and k rounded to the model dtype, scores and softmax in fp32,
// the output rounded once.
//
//   qkv        [B, (H + 2K) * A]  this step's projections (fp32 or bf16), rows contiguous
//              (or [B, 1, ...] as the model holds a step; the output then [B, 1, H * A])
//   cos, sin   [B, A/2] fp32      the rotation of each row's position (any shape of B * A/2)
//   k_cache, v_cache [R, K, S, A] one layer of the cache (model dtype); row rows[b] is batch row b
//   positions  [B] int64          where each row's key/value goes (and its query's position);
//                                 any shape of B values, as mask any of B * span
//   mask       [B, span] bool     optional: which cached positions each row sees; without it
//                                 every row sees positions 0 .. span-1
//   -> [B, H * A] in the dtype of qkv

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

#include "simd.h"

namespace {

using simd::L;

// q . k over A values (fp32 q, k in the cache dtype)
template <typename T>
inline float dot(const float* q, const T* k, int64_t A) {
  int64_t a = 0;
  simd::vf acc = simd::zero();
  for (; a + L <= A; a += L) acc = simd::fmadd(simd::load(q + a), simd::load(k + a), acc);
  float tail = simd::sum(acc);
  for (; a < A; ++a) tail += q[a] * static_cast<float>(k[a]);
  return tail;
}

// acc += p * v over A values
template <typename T>
inline void axpy(float p, const T* v, float* acc, int64_t A) {
  int64_t a = 0;
  const simd::vf pv = simd::set1(p);
  for (; a + L <= A; a += L)
    simd::store(acc + a, simd::fmadd(pv, simd::load(v + a), simd::load(acc + a)));
  for (; a < A; ++a) acc[a] += p * static_cast<float>(v[a]);
}

template <typename T>
void attend(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
            const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& rows,
            const at::Tensor& positions, const std::optional<at::Tensor>& mask, int64_t span,
            int64_t H, int64_t K, at::Tensor& out) {
  const int64_t B = qkv.size(0), A = k_cache.size(3), half = A / 2, G = H / K;
  const T* in = qkv.data_ptr<T>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  const int64_t* rp = rows.data_ptr<int64_t>();
  const int64_t* pp = positions.data_ptr<int64_t>();
  T* kc = k_cache.data_ptr<T>();
  T* vc = v_cache.data_ptr<T>();
  const int64_t ks0 = k_cache.stride(0), ks1 = k_cache.stride(1), ks2 = k_cache.stride(2);
  const int64_t vs0 = v_cache.stride(0), vs1 = v_cache.stride(1), vs2 = v_cache.stride(2);
  const bool* mp = mask ? mask->data_ptr<bool>() : nullptr;
  const int64_t width = (H + 2 * K) * A;
  T* o = out.data_ptr<T>();
  // rotated queries, as the model dtype then fp32 (the reference rounds them there)
  std::vector<float> q(B * H * A);
  auto rotate = [&](const T* x, int64_t b, float* dst_f, T* dst_t) {
    for (int64_t i = 0; i < half; ++i) {
      const float x0 = static_cast<float>(x[2 * i]), x1 = static_cast<float>(x[2 * i + 1]);
      const float c = cp[b * half + i], s = sp[b * half + i];
      const T r0 = static_cast<T>(x0 * c - x1 * s), r1 = static_cast<T>(x0 * s + x1 * c);
      if (dst_f) dst_f[2 * i] = static_cast<float>(r0), dst_f[2 * i + 1] = static_cast<float>(r1);
      if (dst_t) dst_t[2 * i] = r0, dst_t[2 * i + 1] = r1;
    }
  };
  for (int64_t b = 0; b < B; ++b) {
    const T* row = in + b * width;
    for (int64_t h = 0; h < H; ++h) rotate(row + h * A, b, q.data() + (b * H + h) * A, nullptr);
    for (int64_t kh = 0; kh < K; ++kh) {
      T* kd = kc + rp[b] * ks0 + kh * ks1 + pp[b] * ks2;
      rotate(row + (H + kh) * A, b, nullptr, kd);
      T* vd = vc + rp[b] * vs0 + kh * vs1 + pp[b] * vs2;
      const T* vsrc = row + (H + K + kh) * A;
      for (int64_t a = 0; a < A; ++a) vd[a] = vsrc[a];
    }
  }
  const float scale = 1.0f / std::sqrt(static_cast<float>(A));
  // Each key/value head's G query heads together: a cached row is read from memory once for
  // all of them (then from L1), where one head at a time read it G times. Per head the
  // arithmetic and its order are unchanged, so the result is bit for bit the same.
  at::parallel_for(0, B * K, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> scores(G * span), acc(G * A), top(G), total(G);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / K, kh = t % K;
      const T* kb = kc + rp[b] * ks0 + kh * ks1;
      const T* vb = vc + rp[b] * vs0 + kh * vs1;
      const float* qk = q.data() + (b * H + kh * G) * A;  // the group's G query heads
      std::fill(top.begin(), top.end(), -std::numeric_limits<float>::infinity());
      for (int64_t s = 0; s < span; ++s) {
        const bool seen = !mp || mp[b * span + s];
        for (int64_t g = 0; g < G; ++g) {
          float& score = scores[g * span + s];
          score = seen ? dot(qk + g * A, kb + s * ks2, A) * scale
                       : -std::numeric_limits<float>::infinity();
          top[g] = std::max(top[g], score);
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        float* sg = scores.data() + g * span;
        total[g] = 0.f;
        for (int64_t s = 0; s < span; ++s) {
          sg[s] = std::isinf(sg[s]) ? 0.f : std::exp(sg[s] - top[g]);
          total[g] += sg[s];
        }
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t s = 0; s < span; ++s) {
        for (int64_t g = 0; g < G; ++g) {
          const float p = scores[g * span + s];
          if (p == 0.f) continue;
          axpy(p / total[g], vb + s * vs2, acc.data() + g * A, A);
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        T* oh = o + b * H * A + (kh * G + g) * A;
        for (int64_t a = 0; a < A; ++a) oh[a] = static_cast<T>(acc[g * A + a]);
      }
    }
  });
}

at::Tensor decode_attention(const at::Tensor& qkv, const at::Tensor& cos_in,
                            const at::Tensor& sin_in, const at::Tensor& k_cache,
                            const at::Tensor& v_cache, const at::Tensor& rows,
                            const at::Tensor& positions_in,
                            const std::optional<at::Tensor>& mask_in, int64_t span,
                            int64_t n_heads, int64_t n_kv_heads) {
  // the small inputs in whatever shape and strides the caller holds them (as views, copied
  // here only if they are not contiguous: cheaper than a reshape dispatched from Python)
  const at::Tensor cos = cos_in.contiguous(), sin = sin_in.contiguous();
  const at::Tensor positions = positions_in.contiguous();
  const std::optional<at::Tensor> mask =
      mask_in ? std::optional<at::Tensor>(mask_in->contiguous()) : std::nullopt;
  const int64_t H = n_heads, K = n_kv_heads;
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes() && k_cache.size(1) == K &&
                  k_cache.stride(3) == 1 && v_cache.stride(3) == 1,
              "decode_attention: caches must be [R, ", K, ", S, A] with contiguous A, got ",
              k_cache.sizes(), " and ", v_cache.sizes());
  const int64_t A = k_cache.size(3), B = qkv.size(0);
  TORCH_CHECK(K > 0 && H % K == 0 && A % 2 == 0, "decode_attention: need H % K == 0 and even A");
  TORCH_CHECK((qkv.dim() == 2 || (qkv.dim() == 3 && qkv.size(1) == 1)) &&
                  qkv.size(-1) == (H + 2 * K) * A && qkv.is_contiguous() &&
                  qkv.scalar_type() == k_cache.scalar_type() &&
                  v_cache.scalar_type() == k_cache.scalar_type(),
              "decode_attention: qkv must be contiguous [B, ", (H + 2 * K) * A, "] (or [B, 1, ",
              (H + 2 * K) * A, "]) in the cache's dtype, got ", qkv.sizes(), " ",
              qkv.scalar_type());
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat &&
                  cos.is_contiguous() && sin.is_contiguous() && cos.numel() == B * A / 2 &&
                  sin.numel() == B * A / 2,
              "decode_attention: cos/sin must be contiguous fp32 [B, A/2]");
  TORCH_CHECK(rows.scalar_type() == at::kLong && positions.scalar_type() == at::kLong &&
                  rows.is_contiguous() && positions.is_contiguous() && rows.numel() == B &&
                  positions.numel() == B,
              "decode_attention: rows and positions must be contiguous int64 [B]");
  TORCH_CHECK(span >= 1 && span <= k_cache.size(2), "decode_attention: span ", span,
              " outside the cache's 1..", k_cache.size(2));
  const int64_t* rp = rows.data_ptr<int64_t>();
  const int64_t* pp = positions.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(rp[b] >= 0 && rp[b] < k_cache.size(0) && pp[b] >= 0 && pp[b] < span,
                "decode_attention: row ", b, " has cache row ", rp[b], " and position ", pp[b],
                "; need row < ", k_cache.size(0), " and position < span ", span);
  if (mask)
    TORCH_CHECK(mask->scalar_type() == at::kBool && mask->is_contiguous() &&
                    mask->numel() == B * span,
                "decode_attention: mask must be contiguous bool [B, span]");
  at::Tensor out = qkv.dim() == 3 ? at::empty({B, 1, H * A}, qkv.options())
                                   : at::empty({B, H * A}, qkv.options());
  if (qkv.scalar_type() == at::kFloat)
    attend<float>(qkv, cos, sin, k_cache, v_cache, rows, positions, mask, span, H, K, out);
  else if (qkv.scalar_type() == at::kBFloat16)
    attend<c10::BFloat16>(qkv, cos, sin, k_cache, v_cache, rows, positions, mask, span, H, K,
                          out);
  else
    TORCH_CHECK(false, "decode_attention: dtype must be fp32 or bf16, got ", qkv.scalar_type());
  return out;
}

}  // namespace

MIXTRAL_FRAGMENT(m) {
  m.def("decode_attention(Tensor qkv, Tensor cos, Tensor sin, Tensor(a!) k_cache, "
        "Tensor(b!) v_cache, Tensor rows, Tensor positions, Tensor? mask, int span, "
        "int n_heads, int n_kv_heads) -> Tensor");
}

MIXTRAL_IMPL(m) {
  m.impl("decode_attention", decode_attention);
}
