"""Generation: sampling laws, the cached loop against full re-scoring, streaming text deltas,
stop strings, finish reasons and context limits."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mixtral.completion import TextStream, complete, stream
from mixtral.config import ModelArgs
from mixtral.default_model import random_tiny
from mixtral.generate import GenerationParams, generate
from mixtral.model import Transformer
from mixtral.sampling import make_generator, sample, top_p_filter
from mixtral.tokenizer import StreamDecoder, default_tokenizer

TOK = default_tokenizer()


@pytest.fixture(scope="module")
def model() -> Transformer:
    return random_tiny()


# --- sampling ------------------------------------------------------------------------------------

def test_greedy_ignores_the_generator():
    logits = torch.randn(3, 50)
    for seed in range(3):
        assert torch.equal(sample(logits, 0.0, 1.0, make_generator(seed)), logits.argmax(-1))


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    for top_p, kept in [(0.5, 1), (0.79, 2), (0.81, 3), (0.99, 4), (0.01, 1)]:  # never empty
        filtered = top_p_filter(probs, top_p)
        assert (filtered > 0).sum() == kept
        torch.testing.assert_close(filtered[0, :kept], probs[0, :kept])
    logits = torch.log(probs)
    drawn = {int(sample(logits, 1.0, 0.79, make_generator(s))) for s in range(200)}
    assert drawn == {0, 1}


def test_tiny_temperature_is_greedy_not_nan():
    # found by the API fuzzer: temperature 5e-324 overflowed logits / T into inf - inf = nan
    logits = torch.randn(2, 50)
    for t in (1e-300, 5e-324):
        assert torch.equal(sample(logits, t, 1.0, make_generator(0)), logits.argmax(-1))
        assert torch.equal(sample(logits, t, 0.5, make_generator(0)), logits.argmax(-1))


def test_denormal_top_p_keeps_the_likeliest_token():
    # top_p = 1e-46 is 0 in fp32: every token was dropped and multinomial raised (an API 500)
    logits = torch.randn(2, 50)
    for top_p in (1e-46, 5e-324):
        assert torch.equal(sample(logits, 1.0, top_p, make_generator(0)), logits.argmax(-1))


def test_seeds_outside_64_bits_are_a_value_error():
    # 2**64 raised "Overflow when unpacking long long" inside the engine's loop, killing it
    assert make_generator(2**64 - 1).initial_seed() == 2**64 - 1
    for seed in (2**64, -1, -2**70):
        with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*64 - 1\]"):
            make_generator(seed)


def test_sampling_rejects_bad_settings():
    with pytest.raises(ValueError, match="temperature >= 0 and 0 < top_p <= 1"):
        sample(torch.zeros(1, 4), -1.0)
    with pytest.raises(ValueError):
        sample(torch.zeros(1, 4), 1.0, 0.0)


# --- the decode loop -----------------------------------------------------------------------------

def test_cached_greedy_equals_full_rescoring(model):
    prompt = TOK.encode("The grass is green. The sky is", bos=True)
    out = list(generate(model, prompt, GenerationParams(max_tokens=12)))
    ids = list(prompt)
    with torch.no_grad():
        for token in out:  # re-score the whole sequence without a cache at every step
            assert token == int(model(torch.tensor([ids]))[0, -1].argmax())
            ids.append(token)


def test_seed_reproducibility(model):
    prompt = TOK.encode("Once upon a time", bos=True)
    def run(seed):
        return list(generate(model, prompt, GenerationParams(16, temperature=1.0, seed=seed)))

    a, b, c = run(7), run(7), run(8)
    assert a == b and a != c


def test_context_limit_is_a_clear_error(model):
    n = model.args.max_seq_len
    with pytest.raises(ValueError, match=rf"prompt of 10 tokens \+ max_tokens {n} = {n + 10} "
                       rf"exceeds the model's context of {n} tokens"):
        list(generate(model, [1] * 10, GenerationParams(max_tokens=n)))
    with pytest.raises(ValueError, match="prompt is empty"):
        list(generate(model, [], GenerationParams(3)))
    with pytest.raises(ValueError, match="token id 32000 is outside the vocabulary"):
        list(generate(model, [1, 32000], GenerationParams(3)))
    with pytest.raises(ValueError, match=f"prompt of {n} tokens fills the model's context"):
        list(generate(model, [1] * n, GenerationParams()))


# --- text: a model that says exactly what we script ---------------------------------------------

class Scripted(Transformer):
    """Greedy decoding of this model emits `script`, one token per step."""

    def __init__(self, script: list[int], max_seq_len: int = 256) -> None:
        super().__init__(ModelArgs(dim=8, n_layers=1, n_heads=1, n_kv_heads=1, head_dim=8,
                                   hidden_dim=8, num_experts=1, num_experts_per_tok=1,
                                   max_seq_len=max_seq_len))
        self.script = script
        self.prompt_len = 0

    def forward(self, tokens, positions=None, cache=None, *, last_only=False,
                return_router_logits=False):
        if tokens.shape[1] > 1:
            self.prompt_len = tokens.shape[1]
        step = int(positions[0, -1]) + 1 - self.prompt_len
        logits = torch.zeros(1, 1, self.args.vocab_size)
        logits[0, 0, self.script[min(step, len(self.script) - 1)]] = 1.0
        return logits


def run(script, stop=(), max_tokens=None, prompt=(1, 415)):
    deltas = list(stream(Scripted(script), TOK, list(prompt),
                         GenerationParams(max_tokens=max_tokens), stop))
    return [d.text for d in deltas], deltas[-1]


PARROT = TOK.encode("Look: 🦜 Café!", bos=False)  # the parrot is four byte-fallback pieces


def test_deltas_are_whole_characters_and_join_to_the_text():
    texts, last = run(PARROT + [2])
    assert "".join(texts) == "Look: 🦜 Café!" == TOK.decode(PARROT)
    assert not any("\ufffd" in t for t in texts)
    assert not texts[0].startswith(" ")
    assert (last.finish_reason, last.prompt_tokens, last.completion_tokens) == \
        ("stop", 2, len(PARROT) + 1)


def test_min_tokens_penalties_and_constraints():
    def run_ids(script, **kw):
        return list(generate(Scripted(script), [1, 415], GenerationParams(max_tokens=6, **kw)))

    assert run_ids([2]) == [2]  # says EOS at once
    held = run_ids([2], min_tokens=3)
    assert 2 not in held[:3] and held[3] == 2
    assert run_ids([7]) == [7] * 6
    penalised = run_ids([7], presence_penalty=2.0)  # 1 - 2 < 0: once said, 7 loses
    assert penalised[0] == 7 and 7 not in penalised[1:]

    class OnlyOdd:
        def __init__(self):
            self.seen = []

        def allowed(self, remaining=None):
            mask = torch.zeros(32000, dtype=torch.bool)
            mask[1::2] = True
            return mask

        def advance(self, token):
            self.seen.append(token)

    constraint = OnlyOdd()
    out = list(generate(Scripted([8]), [1, 415], GenerationParams(max_tokens=4), constraint))
    assert all(t % 2 for t in out) and constraint.seen == out


def test_text_stream_continues_a_prefix():
    prefix = TOK.encode("Hello", bos=False)
    rest = TOK.encode("Hello world", bos=False)[len(prefix):]
    text = TextStream(TOK, context=prefix)
    assert "".join(text.push(t) for t in rest) + text.finish() == " world"


def test_max_tokens_finishes_with_length():
    texts, last = run(PARROT + [2], max_tokens=3)
    assert last.finish_reason == "length" and last.completion_tokens == 3
    assert "".join(texts) == TOK.decode(PARROT[:3])


@pytest.mark.parametrize("stop,expected", [
    (("Café",), "Look: 🦜 "), ((":",), "Look"), (("🦜",), "Look: "), (("!", "Look"), ""),
    (("absent",), "Look: 🦜 Café!"), (("Caf", "k:"), "Loo"),
])
def test_stop_strings_end_the_text_and_never_leak(stop, expected):
    texts, last = run(PARROT + [2], stop=stop)
    assert "".join(texts) == expected
    assert last.finish_reason == "stop"
    for s in stop:  # not even a prefix of it was streamed and then taken back
        assert s not in "".join(texts)


def test_complete_and_usage(model):
    prompt = TOK.encode("Hello", bos=True)
    result = complete(model, TOK, prompt, GenerationParams(max_tokens=5))
    assert result.prompt_tokens == len(prompt)
    assert result.completion_tokens <= 5
    again = complete(model, TOK, prompt, GenerationParams(max_tokens=5))
    assert again.text == result.text
    empty = complete(model, TOK, prompt, GenerationParams(max_tokens=0))
    assert (empty.text, empty.finish_reason, empty.completion_tokens) == ("", "length", 0)


# --- the streaming decoder on its own ------------------------------------------------------------

ids = st.lists(st.one_of(st.integers(3, 258), st.integers(259, 31999),
                         st.sampled_from([0, 1, 2, 13, 28705])), max_size=24)


@settings(max_examples=400, deadline=None)
@given(ids)
def test_stream_decoder_joins_to_decode(token_ids):
    decoder = StreamDecoder(TOK)
    parts = [decoder.push(t) for t in token_ids] + [decoder.flush()]
    assert "".join(parts) == TOK.decode(token_ids)
    assert not any(p.endswith("\ufffd") for p in parts[:-1])  # no half characters mid-stream


def test_stream_decoder_holds_partial_characters():
    decoder = StreamDecoder(TOK)
    parts = [decoder.push(t) for t in [28705, 243, 162, 169, 159]]  # "▁" + 🦜's four bytes
    assert parts == ["", "", "", "", "🦜"]
