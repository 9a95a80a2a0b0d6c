"""completion.TextJob driven by the engine's callbacks gives the answer `completion.stream` gives
from `generate`: the same deltas, finish reasons and usage, and a stop string frees the slot."""

from __future__ import annotations

import pytest
from test_generate import PARROT, TOK, Scripted

from mixtral.completion import Delta, TextJob, stream
from mixtral.engine import Engine
from mixtral.generate import GenerationParams

PROMPT = [1, 415]


def by_engine(script: list[int], stop: tuple[str, ...], max_tokens: int | None
              ) -> tuple[list[Delta], TextJob]:
    deltas: list[Delta] = []
    errors: list[BaseException] = []
    engine = Engine(Scripted(script), max_batch=1, max_seq_len=64, thread=False)
    params = GenerationParams(max_tokens=max_tokens, stop_ids=(TOK.eos_id,))
    answer = TextJob(TOK, len(PROMPT), params.stop_ids, stop, emit=deltas.append,
                     fail=errors.append)
    answer.job = engine.submit(PROMPT, params, answer.on_token, answer.on_done)
    engine.run(until_idle=True)
    assert not errors
    return deltas, answer


def by_stream(script: list[int], stop: tuple[str, ...], max_tokens: int | None) -> list[Delta]:
    params = GenerationParams(max_tokens=max_tokens, stop_ids=(TOK.eos_id,))
    return list(stream(Scripted(script), TOK, PROMPT, params, stop))


@pytest.mark.parametrize("script,stop,max_tokens", [
    (PARROT + [2], (), None),  # ends at the stop id
    (PARROT + [2], ("Café",), None),  # at a stop string
    (PARROT + [2], ("Café?",), None),  # "Café" held back as a possible stop, then EOS: shown
    (PARROT + [2], (), 3),  # max_tokens
    (PARROT + [2], ("🦜",), 2),  # max_tokens before the stop string
])
def test_engine_driven_answers_equal_the_stream(script, stop, max_tokens):
    want = by_stream(script, stop, max_tokens)
    got, answer = by_engine(script, stop, max_tokens)
    assert "".join(d.text for d in got) == "".join(d.text for d in want)
    assert [d.finish_reason for d in got if d.finish_reason] == [want[-1].finish_reason]
    assert (got[-1].prompt_tokens, got[-1].completion_tokens) == \
        (want[-1].prompt_tokens, want[-1].completion_tokens)
    assert answer.finish_reason == want[-1].finish_reason


def test_a_held_back_stop_prefix_is_shown_when_the_answer_ends():
    deltas, _ = by_engine(PARROT + [2], ("Café?",), None)
    assert "".join(d.text for d in deltas) == "Look: 🦜 Café!"


def test_a_stop_string_cancels_the_job_at_once():
    forever = PARROT + [7]  # never says EOS: only the stop string can end it early
    deltas, answer = by_engine(forever, ("Café",), 40)
    assert answer.job is not None and answer.job.cancelled.is_set()
    assert deltas[-1].finish_reason == "stop"
    until_stop = len(TOK.encode("Look: 🦜 Café", bos=False))
    assert deltas[-1].completion_tokens <= until_stop + 1  # not 40: the slot was freed
    assert "".join(d.text for d in deltas) == "Look: 🦜 "


def test_an_engine_fault_is_reported_once_and_ends_nothing_else():
    failed: list[BaseException] = []
    shown: list[Delta] = []
    answer = TextJob(TOK, 2, (TOK.eos_id,), emit=shown.append, fail=failed.append)
    answer.on_token(PARROT[0])
    answer.on_done(RuntimeError("fault"))
    assert [str(e) for e in failed] == ["fault"] and all(not d.finish_reason for d in shown)
