// A decoding step's MoE in one op: the Python path in fast.py took ~35 Python-level steps per
// layer for the same operations.

#include <ATen/ops/cat.h>
#include <ATen/ops/silu.h>
#include <ATen/ops/softmax.h>
#include <ATen/ops/topk.h>

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

#include "lowbit.h"

namespace MIXTRAL_NS::lowbit {

// The MoE of one decoding step: for each row, its chosen experts in ascending order (as the
// sorted dispatch adds them), each w2(silu(gate) * up) from the fused [2F, D] bank w13 and the
// [D, F] bank w2, weighted and summed. The same operations, in the same dtype, as the Python
// path in fast.py, without its ~35 Python-level steps per layer.
//   x [M, D], chosen [M, k] int64, weights [M, k] (x's dtype); banks [E, ...] as
//   int8_mv (bits 8: w [E, N, K] int8, s [E, N] fp32), int4_mv (bits 4: w [E, N, K/2], s = sz)
//   or bf16_mv (bits 16: w [E, N, K] bf16; s13 and s2 unused, e.g. empty)
at::Tensor moe_decode(const at::Tensor& x, const at::Tensor& chosen, const at::Tensor& weights,
                      const at::Tensor& w13, const at::Tensor& s13, const at::Tensor& w2,
                      const at::Tensor& s2, int64_t bits, int64_t group, bool qx) {
  TORCH_CHECK(bits == 8 || bits == 4 || bits == 16, "moe_decode: bits must be 8, 4 or 16, got ",
              bits);
  TORCH_CHECK(x.dim() == 2 && chosen.dim() == 2 && chosen.size(0) == x.size(0) &&
                  weights.sizes() == chosen.sizes() && chosen.scalar_type() == at::kLong &&
                  weights.scalar_type() == x.scalar_type(),
              "moe_decode: need x [M, D], chosen int64 [M, k] and weights [M, k] in x's dtype");
  TORCH_CHECK(w13.dim() == 3 && w2.dim() == 3 && w13.size(0) == w2.size(0),
              "moe_decode: banks must be [E, N, K]");
  const int64_t E = w13.size(0), F = w13.size(1) / 2, k = chosen.size(1);
  const at::Tensor ids = chosen.contiguous();
  const int64_t* ip = ids.data_ptr<int64_t>();
  auto mv = [&](const at::Tensor& in, const at::Tensor& w, const at::Tensor& s, int64_t e) {
    if (bits == 16) return bf16_mv(in, w.select(0, e));
    return bits == 8 ? int8_mv(in, w.select(0, e), s.select(0, e), qx)
                     : int4_mv(in, w.select(0, e), s.select(0, e), group, qx);
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
      const at::Tensor h = mv(xm, w13, s13, e);  // [1, 2F]
      const at::Tensor act = at::silu(h.narrow(1, 0, F)).mul_(h.narrow(1, F, F));
      const at::Tensor term = mv(act, w2, s2, e).mul_(weights[m][j]);
      out = out.defined() ? out.add_(term) : term;
    }
    rows.push_back(out);
  }
  return rows.size() == 1 ? rows[0] : at::cat(rows);
}

// The routing of model.py's `route` (the same ATen operations: top-k of the fp32 router
// logits, a softmax over them, in x's dtype), then moe_decode: x [..., D] and its router
// logits [..., E] -> [..., D]. One call from Python where routing and the reshapes around it
// took eight.
at::Tensor moe_route(const at::Tensor& x, const at::Tensor& logits, int64_t top_k,
                     const at::Tensor& w13, const at::Tensor& s13, const at::Tensor& w2,
                     const at::Tensor& s2, int64_t bits, int64_t group, bool qx) {
  TORCH_CHECK(x.dim() >= 1 && logits.dim() >= 1 && logits.size(-1) == w13.size(0) &&
                  logits.numel() / logits.size(-1) == x.numel() / x.size(-1),
              "moe_route: need x [..., D] and logits [..., E] for the same rows, got ",
              x.sizes(), " and ", logits.sizes());
  const auto [top, chosen] = at::topk(logits.to(at::kFloat), top_k, -1);
  const at::Tensor weights = at::softmax(top, -1).to(x.scalar_type());
  const int64_t D = x.size(-1);
  return moe_decode(x.reshape({-1, D}), chosen.reshape({-1, top_k}),
                    weights.reshape({-1, top_k}), w13, s13, w2, s2, bits, group, qx)
      .view(x.sizes());
}

}  // namespace MIXTRAL_NS::lowbit

MIXTRAL_FRAGMENT(m) {
  m.def("moe_route(Tensor x, Tensor logits, int top_k, Tensor w13, Tensor s13, Tensor w2, "
        "Tensor s2, int bits, int group, bool qx=False) -> Tensor");
}

MIXTRAL_IMPL(m) {
  m.impl("moe_decode", MIXTRAL_NS::lowbit::moe_decode);
  m.impl("moe_route", MIXTRAL_NS::lowbit::moe_route);
}
