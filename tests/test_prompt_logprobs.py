"""A prompt's own logprobs (what `echo` with `logprobs` reports) against the oracle: log_softmax
of one full forward pass over the prompt, with no cache, fp32 on the tiny model. First the
prefill loop (whole vectors, every chunk size), then the engine: no reused KV however warm the
prefix cache, `max_tokens` 0 scoring only, twins sharing the scored prefill, faults kept to
their job. The HTTP shape is tested in test_completions.py."""

from __future__ import annotations

import threading

import pytest
import torch

from mixtral.cache import KVCache
from mixtral.default_model import random_tiny
from mixtral.engine import Engine
from mixtral.generate import GenerationParams, generate
from mixtral.prefill import PromptLogprobs, prefill
from mixtral.sampling import LOGPROB_FLOOR

PROMPT = [1] + list(range(300, 337))  # 38 tokens: several chunks of 4, one of 512


@pytest.fixture(scope="module")
def model():
    return random_tiny()  # fp32


@pytest.fixture(scope="module")
def oracle(model):
    """log_softmax [T, V] of one forward pass over PROMPT: row p is the distribution of the
    token at p + 1."""
    with torch.inference_mode():
        return model(torch.tensor([PROMPT]))[0].log_softmax(-1)


def check_entries(entries, oracle, top: int) -> None:
    """Each entry: the prompt token's oracle logprob and `top` alternatives that are the
    likeliest by the oracle (near-ties on random weights may order them either way)."""
    assert [e.token for e in entries] == PROMPT[1:]
    for p, e in enumerate(entries):
        row = oracle[p]
        assert e.logprob == pytest.approx(float(row[e.token]), abs=1e-5)
        assert len(e.top) == top
        kth = float(row.topk(top).values[-1]) if top else 0.0
        for token, value in e.top:
            assert value == pytest.approx(float(row[token]), abs=1e-5)
            assert value >= kth - 1e-5
        assert e.logprob >= LOGPROB_FLOOR


class Spy(PromptLogprobs):
    """PromptLogprobs that also keeps what each call gave it: (start, logits [t, V])."""

    def __init__(self, prompt, top):
        super().__init__(prompt, top)
        self.calls = []

    def add(self, start, logits):
        self.calls.append((start, logits.clone()))
        super().add(start, logits)


@pytest.mark.parametrize("chunk", [1, 7, None])
def test_prefill_gives_every_positions_whole_logits_chunk_by_chunk(model, oracle, chunk):
    scores = Spy(PROMPT, top=5)
    cache = KVCache(model.args, 1, len(PROMPT), model.dtype, model.device)
    last = prefill(model, PROMPT, cache, chunk, scores=scores)
    step = chunk or len(PROMPT)
    assert [start for start, _ in scores.calls] == list(range(0, len(PROMPT), step))
    assert all(rows.shape[0] <= step for _, rows in scores.calls)  # never more than a chunk
    whole = torch.cat([rows for _, rows in scores.calls]).log_softmax(-1)  # [T, V]
    torch.testing.assert_close(whole, oracle)
    assert scores.complete
    check_entries(scores.entries, oracle, 5)
    torch.testing.assert_close(last[0].log_softmax(-1), oracle[-1])  # the next token's, as ever


def test_the_alternatives_can_be_the_whole_vocabulary(model):
    prompt = PROMPT[:5]
    vocab = model.args.vocab_size
    scores = PromptLogprobs(prompt, top=vocab)
    prefill(model, prompt, KVCache(model.args, 1, 5, model.dtype, model.device), 2,
            scores=scores)
    with torch.inference_mode():
        want = model(torch.tensor([prompt]))[0, :-1].log_softmax(-1)
    got = torch.zeros(len(prompt) - 1, vocab)
    for p, e in enumerate(scores.entries):
        ids, values = zip(*e.top, strict=True)
        assert list(values) == sorted(values, reverse=True)  # most likely first
        assert len(set(ids)) == vocab
        got[p, torch.tensor(ids)] = torch.tensor(values)
    torch.testing.assert_close(got, want)  # every id, once each: the whole vector


def test_prefill_refuses_positions_out_of_order(model):
    scores = PromptLogprobs(PROMPT, top=2)
    cache = KVCache(model.args, 1, len(PROMPT), model.dtype, model.device)
    with pytest.raises(ValueError, match="every position in order"):
        prefill(model, PROMPT[4:], cache, start=4, scores=scores)  # 0..3 were never seen
    with pytest.raises(ValueError, match="top >= 0"):
        PromptLogprobs(PROMPT, top=-1)


class Scored:
    """A job's ids, prompt logprobs and end."""

    def __init__(self, engine, params, top, on_prompt=None):
        self.tokens, self.prompt, self.error = [], None, "not done"
        self.done = threading.Event()
        self.job = engine.job(PROMPT, params, self.tokens.append, self.finish)
        self.job.prompt_logprobs = top
        self.job.on_prompt_logprobs = on_prompt or self.keep

    def keep(self, entries):
        assert not self.tokens  # before any generated id
        self.prompt = entries

    def finish(self, error):
        self.error = error
        self.done.set()


def test_engine_scores_the_prompt_whole_despite_the_prefix_cache(model, oracle):
    params = GenerationParams(max_tokens=5)
    expected = list(generate(model, PROMPT, params))
    engine = Engine(model, max_batch=2, prefill_chunk=4, prefix_cache=1 << 24)
    try:
        warm = Scored(engine, params, None)  # an ordinary run leaves the prompt's KV cached
        engine.enqueue([warm.job])
        assert warm.done.wait(60) and warm.error is None
        again = Scored(engine, params, None)
        engine.enqueue([again.job])
        assert again.done.wait(60) and again.job.cached_tokens == len(PROMPT)
        scored = Scored(engine, params, 3)
        engine.enqueue([scored.job])
        assert scored.done.wait(60) and scored.error is None
    finally:
        engine.stop()
    assert scored.job.cached_tokens == 0  # a copied position has no logits
    check_entries(scored.prompt, oracle, 3)
    assert scored.tokens == expected == warm.tokens


def test_max_tokens_zero_scores_the_prompt_and_generates_nothing(model, oracle):
    engine = Engine(model, prefill_chunk=512)
    try:
        scored = Scored(engine, GenerationParams(max_tokens=0), 0)
        plain = Scored(engine, GenerationParams(max_tokens=0), None)
        engine.enqueue([scored.job, plain.job])
        assert scored.done.wait(60) and plain.done.wait(60)
    finally:
        engine.stop()
    assert scored.error is None and scored.tokens == [] and scored.prompt is not None
    check_entries(scored.prompt, oracle, 0)
    assert plain.error is None and plain.tokens == [] and plain.prompt is None


def test_a_twin_shares_the_scored_prefill(model):
    params = GenerationParams(max_tokens=6, temperature=1.0, seed=9)
    engine = Engine(model, max_batch=2, prefill_chunk=8)
    try:
        scored, twin = Scored(engine, params, 1), Scored(engine, params, None)
        engine.enqueue([scored.job, twin.job])  # as the n choices of one request are
        assert scored.done.wait(60) and twin.done.wait(60)
    finally:
        engine.stop()
    assert twin.job.cached_tokens == len(PROMPT)  # the scored one's KV and last logits
    assert scored.tokens == twin.tokens == list(generate(model, PROMPT, params))


def test_a_broken_prompt_logprobs_consumer_fails_only_its_job(model):
    def broken(entries):
        raise RuntimeError("consumer gone")

    params = GenerationParams(max_tokens=3)
    engine = Engine(model, max_batch=2, prefill_chunk=4)
    try:
        bad = Scored(engine, params, 1, on_prompt=broken)
        good = Scored(engine, params, 1)
        negative = Scored(engine, params, -1)
        engine.enqueue([bad.job, good.job, negative.job])
        for s in (bad, good, negative):
            assert s.done.wait(60)
    finally:
        engine.stop()
    assert isinstance(bad.error, RuntimeError) and bad.tokens == []
    assert good.error is None and len(good.tokens) == 3 and len(good.prompt) == len(PROMPT) - 1
    assert isinstance(negative.error, ValueError) and "top >= 0" in str(negative.error)
