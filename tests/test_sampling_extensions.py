"""vLLM's sampling extensions (top_k, min_p, repetition_penalty, logit_bias) and the logprobs
of what was sampled, each against a direct computation written here from its definition; and
the engine and the reference loop agreeing on them."""

from __future__ import annotations

import math
import threading

import pytest
import torch

from mixtral.default_model import random_tiny
from mixtral.engine import Engine
from mixtral.generate import GenerationParams, Sampler, generate
from mixtral.sampling import LOGPROB_FLOOR, log_probabilities, make_generator, probabilities, sample

V = 12


def direct(logits: torch.Tensor, temperature: float, top_k: int = 0, min_p: float = 0.0,
           top_p: float = 1.0) -> torch.Tensor:
    """vLLM's order, one row, in plain Python: temperature, min_p, top_k, then top_p over the
    renormalised rest -> the normalised distribution."""
    p = torch.softmax(logits.double() / temperature, -1).tolist()
    best = max(p)
    p = [x if x >= min_p * best else 0.0 for x in p]
    if top_k > 0:
        kth = sorted(p, reverse=True)[top_k - 1]
        p = [x if x >= kth else 0.0 for x in p]
    total = sum(p)
    p = [x / total for x in p]
    kept, mass = set(), 0.0
    for i in sorted(range(len(p)), key=lambda i: -p[i]):
        if mass >= top_p:
            break
        kept.add(i)
        mass += p[i]
    q = [x if i in kept else 0.0 for i, x in enumerate(p)]
    return torch.tensor(q, dtype=torch.float64) / sum(q)


@pytest.mark.parametrize("temperature,top_k,min_p,top_p", [
    (1.0, 3, 0.0, 1.0), (0.7, 0, 0.2, 1.0), (1.3, 5, 0.05, 0.8), (1.0, 1, 0.0, 1.0),
    (2.0, V, 0.0, 0.5), (1.0, 0, 1.0, 1.0)])
def test_filters_match_the_direct_computation(temperature, top_k, min_p, top_p):
    logits = torch.randn(1, V, generator=torch.Generator().manual_seed(3)) * 2
    want = direct(logits[0], temperature, top_k, min_p, top_p)
    got = probabilities(logits, temperature, top_p, top_k, min_p)[0].double()
    torch.testing.assert_close(got / got.sum(), want, atol=1e-6, rtol=1e-5)
    logp = log_probabilities(logits, temperature, top_p, top_k, min_p)[0]
    torch.testing.assert_close(logp.exp(), want, atol=1e-6, rtol=1e-5)
    drawn = {int(sample(logits, temperature, top_p, make_generator(s), top_k, min_p))
             for s in range(300)}
    assert drawn <= {i for i in range(V) if want[i] > 0}


def test_top_k_minus_one_and_zero_are_off():
    logits = torch.randn(1, V)
    for off in (0, -1):
        torch.testing.assert_close(probabilities(logits, 1.0, top_k=off),
                                   torch.softmax(logits.double(), -1).float())


def test_bad_settings_are_value_errors():
    for kw in ({"top_k": -2}, {"min_p": 1.5}, {"min_p": -0.1}, {"repetition_penalty": 0.0}):
        with pytest.raises(ValueError):
            Sampler(GenerationParams(**kw), 4, V)


def adjusted(logits: torch.Tensor, seen: set[int], penalty: float,
             bias: dict[int, float]) -> torch.Tensor:
    """Logit bias, then the repetition penalty on `seen` tokens, written out per token."""
    out = logits.clone()
    for i in range(V):
        x = float(logits[0, i]) + bias.get(i, 0.0)
        if i in seen:
            x = x / penalty if x > 0 else x * penalty
        out[0, i] = x
    return out


@pytest.mark.parametrize("penalty", [1.0, 1.3, 0.8])
def test_repetition_penalty_and_logit_bias_against_a_direct_computation(penalty):
    gen = torch.Generator().manual_seed(0)
    steps = [torch.randn(1, V, generator=gen) * 3 for _ in range(5)]
    bias = {4: 2.5, 7: -100.0}
    prompt = [1, 2, 3]
    params = GenerationParams(temperature=0.0, repetition_penalty=penalty,
                              logit_bias=tuple(bias.items()), logprobs=V)
    sampler = Sampler(params, 5, V, prompt=prompt)
    seen = set(prompt)
    for logits in steps:
        want = adjusted(logits, seen, penalty, bias)
        token = sampler(logits)
        assert token == int(want.argmax())  # greedy picks the top of what was adjusted
        logp = torch.log_softmax(want.double(), -1)[0]
        entry = sampler.logprob
        assert entry is not None and entry.token == token
        assert entry.logprob == pytest.approx(float(logp[token]), abs=1e-5)  # fp32 logits
        assert [i for i, _ in entry.top][0] == token
        assert entry.logprob == max(v for _, v in entry.top)  # greedy's has the top logprob
        assert sum(math.exp(v) for _, v in entry.top) <= 1 + 1e-9
        seen.add(token)


def test_logprobs_of_a_filtered_distribution_are_floored_not_infinite():
    params = GenerationParams(temperature=1.0, top_k=2, seed=0, logprobs=5)
    sampler = Sampler(params, 1, V)
    sampler(torch.randn(1, V))
    assert sampler.logprob is not None
    values = [v for _, v in sampler.logprob.top]
    assert all(math.isfinite(v) for v in values) and values[2:] == [LOGPROB_FLOOR] * 3
    assert math.fsum(math.exp(v) for v in values[:2]) == pytest.approx(1.0)
    assert sampler.logprob.token in [i for i, _ in sampler.logprob.top[:2]]


def test_the_engine_and_the_reference_loop_agree():
    model = random_tiny()
    prompt = [1, 415, 2936, 9060, 415]
    params = [GenerationParams(max_tokens=10, temperature=t, seed=s, top_k=k, min_p=m,
                               repetition_penalty=r, logit_bias=((415, 3.0), (28705, -5.0)),
                               logprobs=3)
              for t, s, k, m, r in [(0.0, None, 0, 0.0, 1.2), (1.0, 1, 5, 0.0, 1.1),
                                    (0.9, 2, 0, 0.1, 1.0), (1.5, 3, 40, 0.02, 1.3)]]
    expected = [list(generate(model, prompt, p)) for p in params]
    engine = Engine(model, max_batch=4)
    got: list[list[int]] = [[] for _ in params]
    logprobs: list[list] = [[] for _ in params]
    done = [threading.Event() for _ in params]
    try:
        for i, p in enumerate(params):
            job = engine.job(prompt, p, got[i].append, lambda e, i=i: done[i].set())
            job.on_logprob = logprobs[i].append
            engine.enqueue([job])
        assert all(d.wait(60) for d in done)
    finally:
        engine.stop()
    assert got == expected
    for tokens, entries in zip(got, logprobs, strict=True):
        assert [e.token for e in entries] == tokens
        assert all(len(e.top) == 3 and math.isfinite(e.logprob) for e in entries)
    assert all(e.top[0] == (e.token, e.logprob) for e in logprobs[0])  # greedy: the top one
