"""Model hyperparameters: one dataclass whose defaults are the real Mixtral-8x7B, plus presets.

Torch-free on purpose: `mixtral info` and the server's model cards read this without building
anything. Readers for `config.json` / `params.json` live with the formats (`formats.py`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any


@dataclass(frozen=True)
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 8
    head_dim: int = 128
    hidden_dim: int = 14336  # per expert
    num_experts: int = 8
    num_experts_per_tok: int = 2
    vocab_size: int = 32000
    rope_theta: float = 1e6
    norm_eps: float = 1e-5
    max_seq_len: int = 32768
    sliding_window: int | None = None  # Mixtral attends densely over its 32k context
    router_aux_loss_coef: float = 0.02  # the hub config's value; used by training only

    def __post_init__(self) -> None:
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "hidden_dim",
                     "num_experts", "num_experts_per_tok", "vocab_size", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ModelArgs.{name} must be a positive integer, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"ModelArgs: n_heads={self.n_heads} is not a multiple of "
                             f"n_kv_heads={self.n_kv_heads} (grouped-query attention needs it)")
        if self.num_experts_per_tok > self.num_experts:
            raise ValueError(f"ModelArgs: num_experts_per_tok={self.num_experts_per_tok} exceeds "
                             f"num_experts={self.num_experts}")
        if self.head_dim % 2:
            raise ValueError(f"ModelArgs: head_dim={self.head_dim} must be even for RoPE")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError("ModelArgs: sliding_window must be None or >= 1, "
                             f"got {self.sliding_window}")
        if not 0 < self.rope_theta < math.inf or not 0 < self.norm_eps < math.inf:
            raise ValueError(f"ModelArgs: rope_theta ({self.rope_theta}) and norm_eps "
                             f"({self.norm_eps}) must be positive and finite")

    def to_dict(self) -> dict:
        return asdict(self)

    def with_(self, **changes: Any) -> ModelArgs:
        return replace(self, **changes)


PRESETS: dict[str, ModelArgs] = {
    "mixtral-8x7b": ModelArgs(),
    # The random-weights model the CPU anchors were measured on (shared/reference/anchors-cpu.md).
    "bench": ModelArgs(dim=1024, n_layers=8, n_heads=16, n_kv_heads=4, head_dim=64,
                       hidden_dim=3584, max_seq_len=4096),
    # Small enough for unit tests, same vocabulary as the real tokenizer so text round-trips.
    "tiny": ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=128,
                      max_seq_len=2048),
}


def preset(name: str) -> ModelArgs:
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    return PRESETS[name]


# --- sizes ---------------------------------------------------------------------------------------

def param_counts(args: ModelArgs) -> dict[str, int]:
    """Parameter counts by part, plus `total` and `active` (what one token touches)."""
    d, hd = args.dim, args.head_dim
    attention = d * args.n_heads * hd * 2 + d * args.n_kv_heads * hd * 2  # wq, wo; wk, wv
    expert = 3 * d * args.hidden_dim  # w1, w2, w3
    per_layer_fixed = attention + args.num_experts * d + 2 * d  # + router + two norms
    embed = args.vocab_size * d
    fixed = args.n_layers * per_layer_fixed + 2 * embed + d  # + tok_embeddings, output, norm
    return {
        "attention": args.n_layers * attention,
        "experts": args.n_layers * args.num_experts * expert,
        "embeddings": 2 * embed,
        "total": fixed + args.n_layers * args.num_experts * expert,
        "active": fixed + args.n_layers * args.num_experts_per_tok * expert,
    }


# Weight-only quantization as the engine applies it: every matmul weight (attention, experts,
# output head) is quantized; embeddings, norms and the router stay bf16.
#   int8: one bf16 scale per output row.
#   int4: groups of INT4_GROUP_SIZE input columns, a bf16 scale and zero point per group.
INT4_GROUP_SIZE = 128


def weight_bytes(args: ModelArgs, bits: int) -> int:
    """Bytes of weights at 16 (bf16/fp16), 32, 8 or 4 bits per matmul weight."""
    counts = param_counts(args)
    if bits in (16, 32):
        return counts["total"] * bits // 8
    d, hd, L, E = args.dim, args.head_dim, args.n_layers, args.num_experts
    matmul = counts["attention"] + counts["experts"] + args.vocab_size * d  # + output head
    # output rows of wq, wk, wv, wo; of each expert's w1, w3, w2; of the output head
    rows = (L * ((args.n_heads + 2 * args.n_kv_heads) * hd + d + E * (2 * args.hidden_dim + d))
            + args.vocab_size)
    kept_bf16 = (counts["total"] - matmul) * 2
    if bits == 8:
        return matmul + rows * 2 + kept_bf16
    if bits == 4:
        return matmul // 2 + (matmul // INT4_GROUP_SIZE) * 4 + kept_bf16
    raise ValueError(f"weight_bytes: bits must be 32, 16, 8 or 4, got {bits}")


def kv_cache_bytes_per_token(args: ModelArgs, bytes_per_value: int = 2) -> int:
    return 2 * args.n_layers * args.n_kv_heads * args.head_dim * bytes_per_value  # keys + values
