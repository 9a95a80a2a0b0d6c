"""Shared fixtures: small random Mixtrals built by the reference implementation (transformers),
and writers for each on-disk layout that do not use our own conversion code."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# the suite's engines keep torch's thread count: an adaptive one (the product's default) would
# change this process's count for every later test whenever a test's own subprocess is busy.
# tests/test_threads.py tests the adaptive policy itself, without this setting.
os.environ.setdefault("MIXTRAL_THREADS", "fixed")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def hf_mixtral(seed: int = 0, std: float = 0.25, dtype: torch.dtype = torch.float32, **overrides):
    """A random-weights transformers MixtralForCausalLM. std is large enough that logits are
    O(1) and a wrong q/k permutation or routing shows up far above the 1e-4 tolerance."""
    from transformers import MixtralConfig, MixtralForCausalLM

    kw = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, num_local_experts=8,
              num_experts_per_tok=2, max_position_embeddings=256, rope_theta=1e6)
    kw.update(overrides)
    cfg = MixtralConfig(**kw)
    torch.manual_seed(seed)
    model = MixtralForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, std)
    return model.to(dtype)


def unpermute_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF rotate-half q/k rows -> Mistral adjacent-pair rows (llama.cpp's formulation)."""
    rows, cols = w.shape
    return w.reshape(n_heads, 2, rows // n_heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def mistral_state_dict(hf_model, fused: bool = False) -> dict[str, torch.Tensor]:
    """The Mistral consolidated state dict for an HF model, built independently of
    mixtral.formats. fused=True gives the original release's `block_sparse_moe.w1/w2/w3`."""
    cfg = hf_model.config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    sd = hf_model.state_dict()
    out = {"tok_embeddings.weight": sd["model.embed_tokens.weight"],
           "norm.weight": sd["model.norm.weight"], "output.weight": sd["lm_head.weight"]}
    F = cfg.intermediate_size
    for i in range(cfg.num_hidden_layers):
        p, q = f"model.layers.{i}.", f"layers.{i}."
        out[q + "attention_norm.weight"] = sd[p + "input_layernorm.weight"]
        out[q + "ffn_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
        out[q + "attention.wq.weight"] = unpermute_rope(sd[p + "self_attn.q_proj.weight"], heads)
        out[q + "attention.wk.weight"] = unpermute_rope(sd[p + "self_attn.k_proj.weight"], kv_heads)
        out[q + "attention.wv.weight"] = sd[p + "self_attn.v_proj.weight"]
        out[q + "attention.wo.weight"] = sd[p + "self_attn.o_proj.weight"]
        gate_up, down = sd[p + "mlp.experts.gate_up_proj"], sd[p + "mlp.experts.down_proj"]
        w1, w3 = gate_up[:, :F], gate_up[:, F:]  # [E, F, D] each
        if fused:
            out[q + "block_sparse_moe.gate.weight"] = sd[p + "mlp.gate.weight"]
            out[q + "block_sparse_moe.w1"] = w1.reshape(-1, w1.shape[-1])
            out[q + "block_sparse_moe.w3"] = w3.reshape(-1, w3.shape[-1])
            # stored transposed: [E*F, D], as in consolidated.0X.pt
            out[q + "block_sparse_moe.w2"] = down.transpose(1, 2).reshape(-1, down.shape[1])
        else:
            out[q + "feed_forward.gate.weight"] = sd[p + "mlp.gate.weight"]
            for e in range(cfg.num_local_experts):
                out[q + f"feed_forward.experts.{e}.w1.weight"] = w1[e]
                out[q + f"feed_forward.experts.{e}.w2.weight"] = down[e]
                out[q + f"feed_forward.experts.{e}.w3.weight"] = w3[e]
    return {k: v.contiguous().clone() for k, v in out.items()}


def params_json(cfg) -> dict:
    params = {"dim": cfg.hidden_size, "n_layers": cfg.num_hidden_layers,
              "head_dim": cfg.head_dim or cfg.hidden_size // cfg.num_attention_heads,
              "hidden_dim": cfg.intermediate_size, "n_heads": cfg.num_attention_heads,
              "n_kv_heads": cfg.num_key_value_heads, "norm_eps": cfg.rms_norm_eps,
              "vocab_size": cfg.vocab_size, "max_seq_len": cfg.max_position_embeddings,
              "moe": {"num_experts": cfg.num_local_experts,
                      "num_experts_per_tok": cfg.num_experts_per_tok}}
    theta = cfg.rope_parameters["rope_theta"]
    if theta != 1e6 or cfg.sliding_window is not None:  # absent, Mistral infers 1e6 (1e4 w/ SWA)
        params["rope_theta"] = theta
    if cfg.sliding_window is not None:
        params["sliding_window"] = cfg.sliding_window
    return params


def write_layout(hf_model, layout: str, folder: Path) -> Path:
    """Write hf_model to `folder` in one of the on-disk layouts, with third-party tools only."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    if layout == "hf":
        hf_model.save_pretrained(folder)
    elif layout == "hf-sharded":
        hf_model.save_pretrained(folder, max_shard_size="40KB")
        assert (folder / "model.safetensors.index.json").exists()
    elif layout == "hf-fused":  # transformers v5's in-memory layout, saved as is
        hf_model.config.save_pretrained(folder)
        sd = {k: v.contiguous() for k, v in hf_model.state_dict().items()}
        save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    elif layout in ("mistral-safetensors", "mistral-pth"):
        (folder / "params.json").write_text(json.dumps(params_json(hf_model.config)))
        sd = mistral_state_dict(hf_model)
        if layout == "mistral-safetensors":
            save_file(sd, folder / "consolidated.safetensors")
        else:
            torch.save(sd, folder / "consolidated.00.pth")
    elif layout == "mistral-fused-pt":  # the hub's consolidated.0X.pt, split across files
        (folder / "params.json").write_text(json.dumps(params_json(hf_model.config)))
        sd = mistral_state_dict(hf_model, fused=True)
        keys = sorted(sd)
        half = len(keys) // 2
        torch.save({k: sd[k] for k in keys[:half]}, folder / "consolidated.00.pt")
        torch.save({k: sd[k] for k in keys[half:]}, folder / "consolidated.01.pt")
    else:
        raise ValueError(layout)
    return folder


LAYOUTS = ["hf", "hf-sharded", "hf-fused", "mistral-safetensors", "mistral-pth",
           "mistral-fused-pt"]


@pytest.fixture(scope="session")
def hf_tiny():
    return hf_mixtral()


@pytest.fixture(scope="session")
def hf_tiny_dir(hf_tiny, tmp_path_factory) -> Path:
    return write_layout(hf_tiny, "hf", tmp_path_factory.mktemp("hf_tiny"))


def _top_tier() -> str:
    """This process's tier: the machine's, capped by a MIXTRAL_ISA set before pytest started
    (which also capped PyTorch and oneDNN, so the tests must not go above it)."""
    from mixtral import cpu

    return cpu.probe().tier


def tiers_up_to_machine(lowest: str = "generic") -> list:
    """pytest params for every tier from `lowest` up; tiers above this process's (the CPU's,
    or MIXTRAL_ISA's) are skipped by name."""
    from mixtral import cpu

    top = _top_tier()
    return [pytest.param(t, marks=() if cpu.TIERS.index(t) <= cpu.TIERS.index(top) else
                         pytest.mark.skip(reason=f"tier {t} needs a CPU that has it; this "
                                          f"process runs at {top}"))
            for t in cpu.TIERS[cpu.TIERS.index(lowest):]]


@pytest.fixture
def isa(request, monkeypatch):
    """Run the test with MIXTRAL_ISA capped to the parametrized tier (our path choices and
    kernel builds; PyTorch's own dispatch keeps the process's, which only a fresh process
    changes: tests/test_tiers.py does that)."""
    from mixtral import cpu, kernels

    monkeypatch.setenv("MIXTRAL_ISA", request.param)
    cpu.probe.cache_clear()
    kernels.available.cache_clear()
    yield request.param
    monkeypatch.undo()
    cpu.probe.cache_clear()
    kernels.available.cache_clear()


# The chat page (tests/browsing.py) on the module's `server` at desktop size, for the page tests
# (which import the `browser` fixture); no script error by its end.
@pytest.fixture
def page(browser, server):
    from browsing import open_page

    page = open_page(browser, server.url)
    yield page
    assert page.errors == []
    page.context.close()


# A live server on the default model for the HTTP API's tests (one per module), and a client.
@pytest.fixture(scope="module")
def server():
    from serving import LiveServer

    s = LiveServer()
    yield s
    s.stop()


@pytest.fixture
def api(server):
    import httpx

    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client
