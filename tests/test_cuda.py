"""The same oracles on a CUDA GPU (skipped where there is none; CI has none)."""

from __future__ import annotations

import pytest
import torch

import mixtral
from mixtral.cache import KVCache
from mixtral.default_model import random_tiny
from mixtral.generate import GenerationParams, generate

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_load_onto_gpu_matches_transformers(hf_tiny, hf_tiny_dir):
    model = mixtral.load(hf_tiny_dir, device="cuda")
    assert {p.device.type for p in model.parameters()} == {"cuda"}
    tokens = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = model(tokens.cuda()).cpu()
        expected = hf_tiny(tokens).logits
    assert (got - expected).abs().max().item() <= 1e-4


def test_bf16_on_gpu_agrees_with_fp32(hf_tiny, hf_tiny_dir):
    model = mixtral.load(hf_tiny_dir, dtype="bf16", device="cuda")
    tokens = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = model(tokens.cuda()).cpu()
        expected = hf_tiny(tokens).logits
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.75


def test_incremental_decode_on_gpu(hf_tiny_dir):
    model = mixtral.load(hf_tiny_dir, device="cuda")
    tokens = torch.randint(0, 320, (1, 20), device="cuda")
    cache = KVCache(model.args, 1, 32, device="cuda")
    with torch.no_grad():
        full = model(tokens)
        steps = [model(tokens[:, :7], torch.arange(7, device="cuda")[None], cache)]
        steps += [model(tokens[:, i:i + 1], torch.tensor([[i]], device="cuda"), cache)
                  for i in range(7, 20)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_greedy_generation_gpu_equals_cpu():
    prompt = [1, 415, 14088, 349, 5344, 28723]
    cpu = list(generate(random_tiny(), prompt, GenerationParams(max_tokens=24)))
    gpu = list(generate(random_tiny(device="cuda"), prompt, GenerationParams(max_tokens=24)))
    assert gpu == cpu
