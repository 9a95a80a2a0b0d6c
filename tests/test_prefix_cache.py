"""Prefix reuse (prompt caching) and the n choices of one prompt sharing its prefill: every
request still gets exactly the tokens of a cold run alone (the reference loop), greedy and
seeded, while the engine computes only what no earlier or running sequence had computed."""

from __future__ import annotations

import argparse

import pytest
import torch

from mixtral.default_model import random_tiny
from mixtral.engine import Engine
from mixtral.generate import GenerationParams, generate
from mixtral.model import Transformer
from mixtral.prefix_cache import PrefixCache, common_prefix

GREEDY = GenerationParams(max_tokens=12)
SEEDED = GenerationParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=7)


@pytest.fixture(scope="module")
def model():
    return random_tiny()


class Counting(Transformer):
    """The model, recording each forward call's [B, T], and running `hook` after the call."""

    def __init__(self, base: Transformer) -> None:
        super().__init__(base.args)
        self.load_state_dict(base.state_dict())
        self.eval()
        self.calls: list[tuple[int, int]] = []
        self.hook = lambda: None

    def forward(self, tokens, *args, **kwargs):
        out = super().forward(tokens, *args, **kwargs)
        self.calls.append(tuple(tokens.shape))
        self.hook()
        return out

    def prompt_tokens(self) -> int:  # tokens that went through prefill calls (T > 1 or B = 1)
        return sum(t for b, t in self.calls if t > 1)


class Answer:
    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.error: BaseException | None = None
        self.done = False

    def token(self, t: int) -> None:
        self.tokens.append(t)

    def finish(self, error: BaseException | None) -> None:
        self.error, self.done = error, True


def ask(engine: Engine, prompts: list[list[int]], params: list[GenerationParams]):
    """Run the prompts as one group on this thread (`thread=False` engines) -> answers, jobs."""
    answers = [Answer() for _ in prompts]
    jobs = [engine.job(p, q, a.token, a.finish) for p, q, a in zip(prompts, params, answers,
                                                                     strict=True)]
    engine.enqueue(jobs)
    engine.run(until_idle=True)
    assert all(a.done and a.error is None for a in answers)
    return answers, jobs


def cold(model, prompt, params) -> list[int]:
    return list(generate(model, prompt, params))


def ids(n: int, seed: int) -> list[int]:
    return [1] + torch.randint(3, 32000, (n - 1,), generator=torch.Generator().manual_seed(seed)
                               ).tolist()


# --- the store ----------------------------------------------------------------------------------

def kv(n: int, fill: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of a cache [layers=2, K=1, S=n, A=2] whose position p holds p + fill."""
    k = (torch.arange(n, dtype=torch.float32) + fill)[None, None, :, None].expand(2, 1, n, 2)
    return k.clone(), -k.clone()


def test_lookup_is_token_exact_across_blocks():
    store = PrefixCache(budget=10**6, block=4)
    a = list(range(10, 20))  # blocks [10..13] [14..17] and the tail [18, 19]
    store.store(a, *kv(16))
    for query, limit, want in [(a, 10, 10), (a, 9, 9), (a[:6] + [0, 0], 8, 6),
                               ([10, 11, 99], 3, 2), ([99], 1, 0), (a + [5, 6], 11, 10)]:
        hit = store.lookup(query, limit)
        assert hit.tokens == want
        k, v = torch.zeros(2, 1, 16, 2), torch.zeros(2, 1, 16, 2)
        store.copy(hit, k, v)
        torch.testing.assert_close(k[:, :, :want], kv(want)[0])
        torch.testing.assert_close(v[:, :, :want], kv(want)[1])
        assert k[:, :, want:].abs().sum() == 0  # nothing past the match is written


def test_a_longer_sequence_replaces_the_tail_it_covers_and_shares_the_rest():
    store = PrefixCache(budget=10**6, block=4)
    store.store([1, 2, 3, 4, 5, 6], *kv(6))  # a full block and the tail [5, 6]
    per_block = 2 * kv(4)[0].nbytes
    assert len(store) == 2 and store.used == per_block + per_block // 2
    store.store([1, 2, 3, 4, 5, 6, 7, 8, 9], *kv(9))  # the tail becomes [5..8], then [9]
    assert len(store) == 3 and store.used == 2 * per_block + per_block // 4
    store.store([1, 2, 3, 4, 5], *kv(5, fill=100))  # covered already: nothing new is kept
    assert len(store) == 3
    k = torch.zeros(2, 1, 9, 2)
    store.copy(store.lookup([1, 2, 3, 4, 5, 6, 7, 8, 9], 9), k, k.clone())
    torch.testing.assert_close(k, kv(9)[0])


def test_eviction_is_least_recently_used_and_leaves_first():
    per_block = 2 * kv(4)[0].nbytes
    store = PrefixCache(budget=3 * per_block, block=4)
    a, b = [1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 9, 9, 9, 9]  # share their first block
    store.store(a, *kv(8))
    store.store(b, *kv(8))
    assert len(store) == 3 and store.used == 3 * per_block
    store.lookup(a, 8)  # a lookup alone does not count as use: only a copy does
    store.copy(store.lookup(a, 8), *kv(8))  # a's tail is now more recent than b's
    store.store([7, 7, 7, 7], *kv(4))  # over budget: b's leaf goes, never the shared block
    assert store.lookup(b, 8).tokens == 4 and store.lookup(a, 8).tokens == 8
    assert store.used <= store.budget


def test_a_sequence_over_the_budget_keeps_what_fits_and_zero_keeps_nothing():
    store = PrefixCache(budget=2 * kv(4)[0].nbytes, block=4)  # 4 positions
    store.store(list(range(1, 11)), *kv(10))
    assert store.lookup(list(range(1, 11)), 10).tokens == 4 and store.used <= store.budget
    off = PrefixCache(budget=0)
    off.store([1, 2, 3], *kv(3))
    assert len(off) == 0 and off.lookup([1, 2, 3], 3).tokens == 0


def test_prompt_logits_are_kept_only_with_the_kv_they_came_from():
    cache, logits = PrefixCache(10**6, block=4), torch.arange(5.0)
    cache.store(list(range(10)), *kv(10), (6, logits, 0))  # a prompt of 6, then its answer
    hit = cache.lookup(list(range(6)), 6)
    assert hit.tokens == 6 and torch.equal(hit.logits, logits)
    assert cache.lookup(list(range(5)), 5).logits is None  # no prompt ended there
    cache.store(list(range(10)), *kv(10), (8, logits, 8))  # a prompt of 8 that copied its KV
    used = cache.used
    cache.store(list(range(10)), *kv(10), (8, logits, 8))  # and again: nothing new to hold
    assert cache.used == used and torch.equal(cache.lookup(list(range(8)), 8).logits, logits)
    # a prompt sharing a held block it did not copy: that block's KV is another computation's
    other = [0, 1, 2, 3, 9, 9]
    cache.store(other, *kv(6, 0.5), (6, logits, 0))
    assert cache.lookup(other, 6).tokens == 6 and cache.lookup(other, 6).logits is None
    cache.store(other + [5], *kv(7), (7, logits, 4))  # the same, having copied that block
    assert torch.equal(cache.lookup(other + [5], 7).logits, logits)
    # never at the cost of KV: 10 positions fill this budget
    full = PrefixCache(10 * 32, block=4)
    full.store(list(range(10)), *kv(10), (6, logits, 0))
    assert full.lookup(list(range(6)), 6).logits is None and full.used <= full.budget


def test_common_prefix():
    assert common_prefix([1, 2, 3], [1, 2, 4], 5) == 2
    assert common_prefix([1, 2, 3], [1, 2, 3, 4], 5) == 3
    assert common_prefix([1, 2, 3], [1, 2, 3], 2) == 2
    assert common_prefix([], [1], 3) == 0 and common_prefix([5], [6], 1) == 0


# --- the engine ---------------------------------------------------------------------------------

@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_a_chat_turn_reuses_the_turn_before_and_answers_as_cold(model, params):
    engine = Engine(model, max_batch=2, thread=False, prefill_chunk=16, prefix_cache=10**7)
    turn = ids(70, 1)  # more than a block (64), ending mid-block
    reused, expected = [], [0]
    for _ in range(3):  # each turn: the whole conversation so far, and a new message
        (answer,), (job,) = ask(engine, [turn], [params])
        assert answer.tokens == cold(model, turn, params)
        reused.append(job.cached_tokens)
        # the next turn reuses this prompt and all of the answer but its last token (never fed)
        expected.append(len(turn) + len(answer.tokens) - 1)
        turn = turn + answer.tokens + ids(9, len(turn))[1:]
    assert reused == expected[:3] and reused[1] > 70
    engine.stop()


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_shared_preambles_and_retries_reuse_token_exactly(model, params):
    engine = Engine(model, max_batch=1, thread=False, prefix_cache=10**7)
    preamble = ids(100, 2)  # a system prompt: diverging at 100 is mid-block
    prompts = [preamble + ids(20, 3)[1:], preamble + ids(30, 4)[1:], preamble + ids(20, 3)[1:]]
    reused = []
    for p in prompts:
        (answer,), (job,) = ask(engine, [p], [params])
        assert answer.tokens == cold(model, p, params)
        reused.append(job.cached_tokens)
    # a retry runs no forward pass: its first run's KV and prompt logits are kept
    assert reused == [0, 100, len(prompts[2])]
    engine.stop()


class OneRowSkew(Counting):
    """The model, but a forward pass of one position a row (a decoding step's shape) moves the
    logits, as a CPU's one-row kernels do in their last bits (in bf16 with native bf16
    arithmetic, avx512_bf16: by up to ~0.1, which changes seeded samples): a prompt's last token
    run alone would not give the logits its prompt's cold prefill gives."""

    def forward(self, tokens, *args, **kwargs):
        out = super().forward(tokens, *args, **kwargs)
        if tokens.shape[1] == 1:
            out = out.clone()
            out[..., 7] += 50.0
        return out


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_a_retry_answers_as_cold_where_one_row_computes_otherwise(model, params):
    skewed = OneRowSkew(model)
    engine = Engine(skewed, max_batch=2, thread=False, prefix_cache=10**7)
    prompt = ids(40, 8)
    expected = cold(skewed, prompt, params)
    assert expected[0] != 7 and expected[1:] == [7] * 11  # the skew decides every decoding step
    for _ in range(3):
        (answer,), (job,) = ask(engine, [prompt], [params])
        assert answer.tokens == expected
    assert job.cached_tokens == len(prompt)  # the kept KV and prompt logits, no forward pass
    engine.stop()


def test_eviction_under_a_tiny_budget_still_answers_as_cold(model):
    per_token = 2 * model.args.n_layers * model.args.n_kv_heads * model.args.head_dim * 4
    engine = Engine(model, max_batch=1, thread=False, prefix_cache=80 * per_token)
    a, b = ids(70, 5), ids(70, 6)
    reused = []
    for p in (a, b, a, a):  # b pushes most of a out; a's first pass back keeps it again
        (answer,), (job,) = ask(engine, [p], [GREEDY])
        assert answer.tokens == cold(model, p, GREEDY)
        reused.append(job.cached_tokens)
        assert engine.prefixes.used <= engine.prefixes.budget
    assert reused == [0, 1, 1, 69]  # both begin with BOS: the one token they share
    engine.stop()


@pytest.mark.parametrize("chunk", [8, 512])
def test_n_choices_share_one_prefill_and_decode_as_one_batch(model, chunk):
    counting = Counting(model)
    engine = Engine(counting, max_batch=4, thread=False, prefill_chunk=chunk)  # no prefix cache
    prompt = ids(40, 8)
    params = [GenerationParams(max_tokens=10, min_tokens=10, temperature=1.0, seed=3 + i)
              for i in range(4)]  # as the server's choices: seed + i
    answers, jobs = ask(engine, [prompt] * 4, params)
    assert [a.tokens for a in answers] == [cold(model, prompt, q) for q in params]
    assert len({tuple(a.tokens) for a in answers}) == 4
    assert counting.prompt_tokens() == len(prompt)  # one prefill between them
    assert [j.cached_tokens for j in jobs] == [0, 40, 40, 40]
    decode = [b for b, t in counting.calls if t == 1]
    assert decode == [4] * 9  # every step one batch of all four, none behind the others
    engine.stop()


def test_concurrent_requests_with_one_prompt_share_the_running_row(model):
    counting = Counting(model)
    engine = Engine(counting, max_batch=2, thread=False, prefill_chunk=8, prefix_cache=0)
    prompt = ids(30, 9)
    other = prompt[:25] + ids(25, 10)[1:]
    params = [GREEDY, SEEDED]
    answers, jobs = ask(engine, [prompt, other], params)
    assert [a.tokens for a in answers] == [cold(model, prompt, GREEDY),
                                           cold(model, other, SEEDED)]
    assert jobs[1].cached_tokens == 25
    assert counting.prompt_tokens() == len(prompt) + len(other) - 25
    engine.stop()


def test_a_job_cancelled_mid_prefill_leaves_only_what_it_computed(model):
    counting = Counting(model)
    engine = Engine(counting, max_batch=2, thread=False, prefill_chunk=8, prefix_cache=10**7)
    prompt = ids(60, 11)
    answer = Answer()
    job = engine.submit(prompt, GREEDY, answer.token, answer.finish)

    def cancel_after_two_chunks() -> None:
        if len(counting.calls) == 2:
            job.cancel()

    counting.hook = cancel_after_two_chunks
    engine.run(until_idle=True)
    assert answer.done and answer.tokens == [] and answer.error is None
    counting.hook = lambda: None
    # a prompt sharing 20 tokens with it reuses the 16 positions it computed, no more (its row
    # held older KV past them); then the same prompt reuses those 20 that one stored
    for p, reused in ((prompt[:20] + ids(40, 12)[1:], 16), (prompt, 20)):
        (again,), (job,) = ask(engine, [p], [SEEDED])
        assert job.cached_tokens == reused
        assert again.tokens == cold(model, p, SEEDED)
    engine.stop()


def test_no_reuse_when_the_cache_cannot_be_copied(model):
    counting = Counting(model)  # as under parallel.Leader: the followers' caches are out of reach
    engine = Engine(counting, max_batch=2, thread=False, prefix_cache=10**7, kv_copies=False)
    prompt = ids(30, 13)
    answers, jobs = ask(engine, [prompt, prompt], [GREEDY, SEEDED])
    (again,), (job,) = ask(engine, [prompt], [GREEDY])
    assert [a.tokens for a in answers] == [cold(model, prompt, GREEDY),
                                           cold(model, prompt, SEEDED)]
    assert again.tokens == answers[0].tokens
    assert [j.cached_tokens for j in [*jobs, job]] == [0, 0, 0]
    assert counting.prompt_tokens() == 3 * len(prompt) and len(engine.prefixes) == 0
    engine.stop()


# --- the server ---------------------------------------------------------------------------------

def test_serve_takes_a_size_for_the_prefix_cache():
    from mixtral.server import launch

    parser = argparse.ArgumentParser()
    launch.arguments(parser)
    assert parser.parse_args(["--prefix-cache", "1.5GiB"]).prefix_cache == 3 * 2**29
    assert parser.parse_args(["--prefix-cache", "0"]).prefix_cache == 0
    assert parser.parse_args([]).prefix_cache is None  # the default: sized at start
    with pytest.raises(SystemExit):
        parser.parse_args(["--prefix-cache", "lots"])


def test_the_server_reuses_earlier_requests_and_answers_as_without():
    import httpx
    from serving import LiveServer, post

    from mixtral.server.state import DEFAULT_PREFIX_CACHE

    servers = [LiveServer(prefix_cache=10**7), LiveServer(prefix_cache=0), LiveServer()]
    try:
        answers = []
        for s in servers:
            with httpx.Client(base_url=s.url, timeout=60) as api:
                messages = [{"role": "system", "content": "Answer in French."},
                            {"role": "user", "content": "Hello there"}]
                first = post(api, messages=messages, max_tokens=6, temperature=0.8, seed=3).json()
                messages += [first["choices"][0]["message"],
                             {"role": "user", "content": "And again?"}]
                second = post(api, messages=messages, max_tokens=6, n=2, seed=4).json()
                metrics = api.get("/metrics").text
            answers.append([c["message"]["content"] for c in first["choices"] + second["choices"]])
            kept = s.state.engine.prefixes.used
            assert f"mixtral_prefix_cache_bytes {float(kept)}" in metrics
        assert answers[0] == answers[1] == answers[2]
        assert [s.state.engine.prefixes.used > 0 for s in servers] == [True, False, True]
        assert 0 < servers[2].state.engine.prefixes.budget <= DEFAULT_PREFIX_CACHE
    finally:
        for s in servers:
            s.stop()


def test_usage_says_how_many_prompt_tokens_were_cached():
    """OpenAI's usage.prompt_tokens_details.cached_tokens, through the openai client, in a
    JSON body, a stream's last chunk and its include_usage chunk."""
    from openai import OpenAI
    from serving import LiveServer

    server = LiveServer(prefix_cache=10**7)
    client = OpenAI(api_key="unused", base_url=server.url + "/v1", max_retries=0)
    messages = [{"role": "system", "content": "You answer briefly."},
                {"role": "user", "content": "Name a colour."}]
    try:
        first = client.chat.completions.create(model="mistral-small", messages=messages,
                                               max_tokens=5)
        prompt = first.usage.prompt_tokens
        assert first.usage.prompt_tokens_details.cached_tokens == 0  # nothing before it
        retry = client.chat.completions.create(model="mistral-small", messages=messages,
                                               max_tokens=5, n=2)
        # all of it: the first request's KV and prompt logits were kept
        assert retry.usage.prompt_tokens_details.cached_tokens == prompt
        messages += [{"role": "assistant", "content": first.choices[0].message.content},
                     {"role": "user", "content": "Another?"}]
        chunks = list(client.chat.completions.create(
            model="mistral-small", messages=messages, max_tokens=5, stream=True,
            stream_options={"include_usage": True}))
        last, totals = chunks[-2], chunks[-1]
        assert last.choices[0].finish_reason is not None and totals.choices == []
        # the second turn: the first turn's prompt came back, and of its answer what the text
        # re-encodes to the same ids (a random model's answer, often little)
        reused = last.usage.prompt_tokens_details.cached_tokens
        assert prompt <= reused < totals.usage.prompt_tokens
        assert totals.usage.prompt_tokens_details.cached_tokens == reused
    finally:
        server.stop()
