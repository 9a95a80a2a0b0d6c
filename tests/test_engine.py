"""Continuous batching against the reference loop: every request gets exactly the tokens it gets
alone, whatever joins, leaves, chunks or is cancelled around it."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from mixtral.cache import CacheRows, KVCache
from mixtral.default_model import random_tiny
from mixtral.engine import Engine
from mixtral.generate import GenerationParams, generate


@pytest.fixture(scope="module")
def model():
    return random_tiny()


class Collect:
    def __init__(self):
        self.tokens: list[int] = []
        self.done = threading.Event()
        self.error = None

    def token(self, t):
        self.tokens.append(t)

    def finish(self, error):
        self.error = error
        self.done.set()


def run(engine, prompt, params, constraint=None) -> Collect:
    c = Collect()
    c.job = engine.submit(prompt, params, c.token, c.finish, constraint)
    return c


PROMPTS = [[1, 415, 2936, 9060], list(range(1, 40)), [1, 28705], list(range(100, 123)),
           [1] + list(range(500, 560))]


@pytest.mark.parametrize("chunk", [4, 512])
def test_batched_greedy_equals_alone(model, chunk):
    params = [GenerationParams(max_tokens=n) for n in (30, 7, 22, 15, 11)]  # they leave early
    expected = [list(generate(model, p, q)) for p, q in zip(PROMPTS, params, strict=True)]
    engine = Engine(model, max_batch=3, prefill_chunk=chunk)  # 5 jobs, 3 slots: some wait
    try:
        results = [run(engine, p, q) for p, q in zip(PROMPTS, params, strict=True)]
        for r in results:
            assert r.done.wait(60) and r.error is None
    finally:
        engine.stop()
    assert [r.tokens for r in results] == expected


def test_seeded_sampling_is_batch_independent(model):
    params = [GenerationParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=s,
                               presence_penalty=0.5) for s in range(4)]
    expected = [list(generate(model, PROMPTS[0], q)) for q in params]
    engine = Engine(model, max_batch=4)
    try:
        results = [run(engine, PROMPTS[0], q) for q in params]
        assert all(r.done.wait(60) for r in results)
    finally:
        engine.stop()
    assert [r.tokens for r in results] == expected
    assert len({tuple(r.tokens) for r in results}) == 4  # different seeds, different answers


def test_cancel_frees_the_slot_at_once(model):
    engine = Engine(model, max_batch=1)
    try:
        long = run(engine, PROMPTS[0], GenerationParams(max_tokens=1500))
        waiting = run(engine, PROMPTS[1], GenerationParams(max_tokens=3))
        while len(long.tokens) < 5:
            time.sleep(0.005)
        assert engine.running == 1 and engine.queue_depth == 1
        long.job.cancel()
        assert long.done.wait(5) and long.error is None and len(long.tokens) < 1500
        assert waiting.done.wait(30) and len(waiting.tokens) == 3  # took the freed slot
        expected = list(generate(model, PROMPTS[1], GenerationParams(max_tokens=3)))
        assert waiting.tokens == expected
    finally:
        engine.stop()


def test_a_failing_request_fails_alone(model):
    class Broken:
        def allowed(self, remaining=None):
            raise RuntimeError("grammar broke")

        def advance(self, token):
            pass

    engine = Engine(model, max_batch=2)
    try:
        good = run(engine, PROMPTS[0], GenerationParams(max_tokens=10))
        bad = run(engine, PROMPTS[1], GenerationParams(max_tokens=10), Broken())
        assert bad.done.wait(30) and "grammar broke" in str(bad.error)
        assert good.done.wait(30) and good.error is None
        assert good.tokens == list(generate(model, PROMPTS[0], GenerationParams(max_tokens=10)))
    finally:
        engine.stop()


def test_engine_context_limit(model):
    engine = Engine(model, max_seq_len=32)
    try:
        assert engine.check([1] * 10, GenerationParams()) == 22
        with pytest.raises(ValueError, match="exceeds the model's context of 32 tokens"):
            engine.submit([1] * 10, GenerationParams(max_tokens=30), print, print)
    finally:
        engine.stop()


def test_scattered_cache_rows_equal_dense(model):
    args = model.args
    cache = KVCache(args, 4, 16)
    dense = KVCache(args, 2, 16)
    k = torch.randn(2, args.n_kv_heads, 3, args.head_dim)
    v = torch.randn(2, args.n_kv_heads, 3, args.head_dim)
    positions = torch.tensor([[0, 1, 2], [4, 5, 6]])
    rows = cache.rows([3, 1])
    assert isinstance(rows, CacheRows)
    got = rows.update(0, positions, k, v, span=7)
    want = dense.update(0, positions, k, v, span=7)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(cache.k[0, 3, :, :3], k[0])
    assert cache.k[0, 0].abs().sum() == 0 and cache.k[0, 2].abs().sum() == 0  # untouched
