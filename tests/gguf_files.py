"""GGUF files for the tests, laid out as llama.cpp writes them, with the gguf package's own
GGUFWriter and quantizers (K-quants, which it cannot quantize, as random valid blocks): each
writer returns the canonical state the file stands for, as the gguf package dequantizes it,
which is the oracle a loaded model is compared with."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as T

from mixtral.config import ModelArgs
from mixtral.model import Transformer

ARGS = ModelArgs(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=64, hidden_dim=256,
                 num_experts=4, num_experts_per_tok=2, vocab_size=320, max_seq_len=256)
NAMES = {"tok_embeddings": "token_embd", "norm": "output_norm", "output": "output",
         "attention_norm": "attn_norm", "attention.wq": "attn_q", "attention.wk": "attn_k",
         "attention.wv": "attn_v", "attention.wo": "attn_output", "ffn_norm": "ffn_norm",
         "feed_forward.gate": "ffn_gate_inp", "feed_forward.experts.w1": "ffn_gate_exps",
         "feed_forward.experts.w2": "ffn_down_exps", "feed_forward.experts.w3": "ffn_up_exps"}


def gguf_name(canonical: str) -> str:
    base = canonical.removesuffix(".weight")
    if base.startswith("layers."):
        _, layer, rest = base.split(".", 2)
        return f"blk.{layer}.{NAMES[rest]}.weight"
    return f"{NAMES[base]}.weight"


def random_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Transformer(ARGS).state_dict().items()}
    return {k: (torch.rand(s, generator=g) + 0.5 if "norm" in k else
                torch.randn(s, generator=g) * 0.05) for k, s in shapes.items()}


def random_blocks(kind: T, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Valid K-quant bytes (gguf has no K-quant quantizer): random, with sane fp16 scales."""
    block, size = gguf.GGML_QUANT_SIZES[kind]
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape)) // block
    blocks = rng.integers(0, 256, (n, size), dtype=np.uint8)
    d = (rng.uniform(0.5, 1.5, (n, 1)) * 1e-3).astype(np.float16).view(np.uint8)
    if kind == T.Q6_K:  # ql, qh, 16 int8 scales, then d; scales of one sign and size, as
        blocks[:, 192:208] = rng.integers(16, 48, (n, 16), dtype=np.uint8)  # fitted ones are
        blocks[:, -2:] = d
    else:
        blocks[:, 0:2], blocks[:, 2:4] = d, d[::-1]  # d, dmin first
    return blocks.reshape(*shape[:-1], shape[-1] // block * size)


def write_gguf(path: Path, state: dict[str, torch.Tensor], kinds: dict[str, T] | None = None,
               per_expert: bool = False, tokens: list[str] | None = None,
               arch: str = "llama", args: ModelArgs = ARGS,
               named: tuple[str, gguf.LlamaFileType] | None = None) -> dict[str, torch.Tensor]:
    """A GGUF file as llama.cpp lays it out (`named`: its general.name and file type); returns
    the canonical state the file stands for (each tensor as the gguf package dequantizes it)."""
    w = gguf.GGUFWriter(str(path), arch)
    if named is not None:
        w.add_name(named[0])
        w.add_file_type(named[1])
    w.add_block_count(args.n_layers)
    w.add_context_length(args.max_seq_len)
    w.add_embedding_length(args.dim)
    w.add_feed_forward_length(args.hidden_dim)
    w.add_head_count(args.n_heads)
    w.add_head_count_kv(args.n_kv_heads)
    w.add_key_length(args.head_dim)
    w.add_rope_freq_base(args.rope_theta)
    w.add_layer_norm_rms_eps(args.norm_eps)
    w.add_expert_count(args.num_experts)
    w.add_expert_used_count(args.num_experts_per_tok)
    if tokens is not None:
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
    meant = {}
    for i, (name, t) in enumerate(state.items()):
        kind = (kinds or {}).get(name.split(".")[-1] if "experts" in name else
                                 name.removesuffix(".weight").split(".")[-1], T.F32)
        if "norm" in name or "gate.weight" in name or "tok_embeddings" in name:
            kind = T.F32  # llama.cpp keeps norms and the router float
        if kind in (T.Q4_K, T.Q5_K, T.Q6_K):
            data = random_blocks(kind, tuple(t.shape), i)
        elif kind == T.F32:
            data = t.float().numpy()
        else:
            data = gguf.quants.quantize(t.float().numpy(), kind)
        meant[name] = torch.from_numpy(gguf.quants.dequantize(data, kind).copy()).reshape(t.shape)
        parts = [(gguf_name(name), data)]
        if per_expert and "experts" in name:
            g = gguf_name(name).replace("_exps.weight", "")
            parts = [(f"{g}.{e}.weight", data[e]) for e in range(data.shape[0])]
        for key, part in parts:
            w.add_tensor(key, part, raw_dtype=None if kind == T.F32 else kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return meant


def default_gguf(path: Path, kinds: dict[str, T] | None = None) -> dict[str, torch.Tensor]:
    """The default model (mixtral/data/default) as a GGUF file with Mixtral's own vocabulary,
    as llama.cpp's converter would write it (F32 unless `kinds` says otherwise)."""
    from mixtral.checkpoint import load
    from mixtral.checkpoint.gguf import _mixtral_pieces

    model = load(Path(__file__).parent.parent / "mixtral" / "data" / "default", dtype="fp32")
    state = {k: v.detach() for k, v in model.state_dict().items()}
    return write_gguf(path, state, kinds, tokens=list(_mixtral_pieces()), args=model.args)
