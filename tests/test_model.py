"""The model against its oracles: transformers' Mixtral (logits through every loader path), a
dense per-expert MoE, and the cache-free forward for incremental decoding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import LAYOUTS, hf_mixtral, write_layout

import mixtral
from mixtral import formats
from mixtral.cache import KVCache
from mixtral.config import ModelArgs
from mixtral.model import ExpertBank, MoeLayer, Transformer
from mixtral.prefill import chunks, prefill

# GQA ratios 1/2/4, top-1/2/3 of 4 or 8 experts, rope_theta other than 1e6, head_dim != dim/heads,
# and a sliding window.
CONFIGS = {
    "gqa1-top1of4": dict(num_key_value_heads=4, num_local_experts=4, num_experts_per_tok=1),
    "gqa2-top2of8-theta1e4": dict(num_key_value_heads=2, rope_theta=1e4),
    "gqa4-top3of8-headdim24": dict(num_attention_heads=8, num_key_value_heads=2, head_dim=24,
                                   num_experts_per_tok=3, rope_theta=5e5),
    "top2of4-window6": dict(num_local_experts=4, sliding_window=6),
}
TOL = 1e-4  # max |logit difference| in fp32


@pytest.fixture(scope="module", params=list(CONFIGS))
def reference(request):
    """(HF model, token batch, HF logits) for one config."""
    hf = hf_mixtral(seed=len(request.param), **CONFIGS[request.param])
    tokens = torch.randint(0, hf.config.vocab_size, (2, 24),
                           generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = hf(tokens).logits
    assert logits.abs().max() > 1.0  # weights big enough for errors to show
    return hf, tokens, logits


@pytest.mark.parametrize("layout", LAYOUTS)
def test_logits_match_transformers(reference, layout, tmp_path):
    hf, tokens, expected = reference
    model = mixtral.load(write_layout(hf, layout, tmp_path / layout))
    with torch.no_grad():
        got = model(tokens)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert (got - expected).abs().max().item() <= TOL


def test_router_logits_match_transformers(hf_tiny, hf_tiny_dir):
    tokens = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf_tiny(tokens, output_router_logits=True).router_logits
        logits, router = mixtral.load(hf_tiny_dir)(tokens, return_router_logits=True)
    assert len(router) == len(ref) == 2
    for ours, theirs in zip(router, ref, strict=True):
        assert ours.shape == (32, 8)
        torch.testing.assert_close(ours, theirs, atol=TOL, rtol=0)


def test_wrong_rope_permutation_is_caught(hf_tiny, hf_tiny_dir, monkeypatch):
    # The parity test must be able to fail: skipping the q/k permutation gives plausible,
    # wrong logits, far outside the tolerance.
    monkeypatch.setattr(formats, "rope_hf_to_mistral", lambda w, head_dim: w)
    tokens = torch.randint(0, 320, (1, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        diff = (mixtral.load(hf_tiny_dir)(tokens) - hf_tiny(tokens).logits).abs().max()
    assert diff > 100 * TOL


def test_sliding_window_changes_attention():
    args = ModelArgs(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=8, hidden_dim=48,
                     num_experts=4, vocab_size=50, max_seq_len=64, sliding_window=4)
    torch.manual_seed(0)
    windowed = Transformer(args)
    windowed.init_weights(std=0.3)
    dense = Transformer(args.with_(sliding_window=None))
    dense.load_state_dict(windowed.state_dict())
    tokens = torch.randint(0, 50, (1, 12))
    with torch.no_grad():
        a, b = windowed(tokens), dense(tokens)
    torch.testing.assert_close(a[:, :4], b[:, :4])  # inside the window: identical
    assert (a[:, 4:] - b[:, 4:]).abs().max() > 1e-3


# --- the MoE layer -------------------------------------------------------------------------------

def dense_moe(layer: MoeLayer, x: torch.Tensor) -> torch.Tensor:
    """Every expert on every token, combined with HF's softmax-all -> top-k -> renormalise."""
    x = x.reshape(-1, x.shape[-1])
    probs = torch.softmax(layer.gate(x).float(), dim=-1)
    top, idx = probs.topk(layer.top_k, dim=-1)
    top = top / top.sum(-1, keepdim=True)
    w1, w2, w3 = layer.experts.w1, layer.experts.w2, layer.experts.w3
    all_out = torch.einsum("efd,nd->nef", w1, x)
    all_out = F.silu(all_out) * torch.einsum("efd,nd->nef", w3, x)
    all_out = torch.einsum("edf,nef->ned", w2, all_out)  # [N, E, D]
    chosen = all_out.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))  # [N, k, D]
    return (chosen * top[..., None]).sum(1)


@pytest.mark.parametrize("top_k,experts", [(1, 4), (2, 8), (3, 8), (8, 8)])
def test_moe_equals_dense_oracle(top_k, experts):
    args = ModelArgs(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=8, hidden_dim=48,
                     num_experts=experts, num_experts_per_tok=top_k, vocab_size=10)
    torch.manual_seed(top_k)
    layer = MoeLayer(args)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(3, 7, 32)
    with torch.no_grad():
        out, logits = layer(x)
        torch.testing.assert_close(out.reshape(-1, 32), dense_moe(layer, x), atol=1e-5, rtol=1e-5)
    assert logits.shape == (21, experts)


def test_moe_skips_experts_no_token_chose():
    args = ModelArgs(dim=16, n_layers=1, n_heads=2, n_kv_heads=2, head_dim=8, hidden_dim=24,
                     num_experts=8, num_experts_per_tok=2, vocab_size=10)
    torch.manual_seed(0)
    layer = MoeLayer(args)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(1, 1, 16)  # one token: exactly 2 of 8 experts run
    with torch.no_grad():
        chosen = layer.gate(x[0]).topk(2).indices[0].tolist()
        expected, _ = layer(x)
        for e in set(range(8)) - set(chosen):  # poison every expert the router did not pick
            for w in (layer.experts.w1, layer.experts.w2, layer.experts.w3):
                w[e] = float("nan")
        out, _ = layer(x)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected)


class _Scaled(ExpertBank):
    """Expert e multiplies by e + 1 and records that it ran."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, int]] = []

    def expert(self, e, x):
        self.calls.append((e, len(x)))
        return x * (e + 1)


def test_expert_bank_runs_each_chosen_expert_once_on_its_rows():
    bank = _Scaled()
    x = torch.arange(1.0, 6.0)[:, None]  # rows sorted by expert: 2 for expert 1, 3 for expert 3
    out = bank(x, [0, 2, 0, 3])
    assert bank.calls == [(1, 2), (3, 3)]  # experts no row chose are never called
    torch.testing.assert_close(out, torch.tensor([[2.0], [4.0], [12.0], [16.0], [20.0]]))
    with pytest.raises(TypeError, match="abstract"):  # a bank must say how an expert computes
        ExpertBank()  # type: ignore[abstract]


# --- the KV cache --------------------------------------------------------------------------------

def small_model(**changes) -> Transformer:
    args = ModelArgs(dim=48, n_layers=2, n_heads=6, n_kv_heads=2, head_dim=8, hidden_dim=64,
                     num_experts=4, vocab_size=97, max_seq_len=64).with_(**changes)
    torch.manual_seed(0)
    model = Transformer(args)
    model.init_weights(std=0.2)
    return model.eval()


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("chunk", [1, 3, 7])
def test_incremental_decode_equals_full_forward(window, chunk):
    model = small_model(sliding_window=window)
    tokens = torch.randint(0, 97, (1, 20), generator=torch.Generator().manual_seed(4))
    cache = KVCache(model.args, 1, 32)
    with torch.no_grad():
        full = model(tokens)
        steps = []
        for start in range(0, 20, chunk):  # prefill in chunks, then the same code decodes
            positions = torch.arange(start, min(start + chunk, 20))[None]
            steps.append(model(tokens[:, start:start + chunk], positions, cache))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_prefill_in_chunks_from_any_start_equals_one_forward():
    model = small_model()
    ids = torch.randint(0, 97, (20,), generator=torch.Generator().manual_seed(8)).tolist()
    full = model(torch.tensor([ids]))
    for chunk in (1, 6, 20, 64):
        cache = KVCache(model.args, 1, 32)
        got = torch.cat(list(chunks(model, ids, cache, chunk)), dim=1)
        torch.testing.assert_close(got, full, atol=1e-5, rtol=1e-5)
    cache = KVCache(model.args, 1, 32)  # the engine's way: a prompt fed in two calls
    prefill(model, ids[:13], cache)
    torch.testing.assert_close(prefill(model, ids[13:], cache, 3, start=13), full[:, -1],
                               atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="nothing to prefill"):
        prefill(model, [], cache)
    with pytest.raises(ValueError, match="chunk must be at least 1 token, got 0"):
        prefill(model, ids, cache, 0)


def test_cache_rows_at_different_positions():
    # two sequences of different lengths share one cache and decode in one batch
    model = small_model()
    a = torch.randint(0, 97, (1, 9), generator=torch.Generator().manual_seed(5))
    b = torch.randint(0, 97, (1, 5), generator=torch.Generator().manual_seed(6))
    cache = KVCache(model.args, 2, 16)
    with torch.no_grad():
        ref_a, ref_b = model(a), model(b)
        model(a[:, :8], torch.arange(8)[None], _rows(cache, 0))
        model(b[:, :4], torch.arange(4)[None], _rows(cache, 1))
        step = model(torch.stack([a[0, 8:], b[0, 4:]]), torch.tensor([[8], [4]]), cache)
    torch.testing.assert_close(step[0, 0], ref_a[0, 8], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(step[1, 0], ref_b[0, 4], atol=1e-5, rtol=1e-5)


def _rows(cache: KVCache, row: int) -> KVCache:
    view = object.__new__(KVCache)
    view.k, view.v = cache.k[:, row:row + 1], cache.v[:, row:row + 1]  # views share storage
    return view


def test_last_only_and_position_overflow():
    model = small_model()
    tokens = torch.randint(0, 97, (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens, last_only=True), model(tokens)[:, -1:])
        with pytest.raises(ValueError, match="position 8 does not fit"):
            model(tokens[:, :1], torch.tensor([[8], [8]]), KVCache(model.args, 2, 8))


def test_bf16_checkpoint_stays_bf16(tmp_path):
    hf = hf_mixtral(dtype=torch.bfloat16)
    path = write_layout(hf, "hf", tmp_path / "bf16")
    model = mixtral.load(path)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    tokens = torch.randint(0, 320, (1, 12), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ours, theirs = model(tokens), hf(tokens).logits.float()
        fp32 = mixtral.load(path, dtype="fp32")
        assert {p.dtype for p in fp32.parameters()} == {torch.float32}
    # bf16 vs bf16: both round at different points; agreement is loose but top-1 mostly holds
    assert (ours.argmax(-1) == theirs.argmax(-1)).float().mean() >= 0.75
