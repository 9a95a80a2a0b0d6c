"""Passkey retrieval: the landmark-attention protocol the Mixtral paper uses (its Figure 4).

A pass key is hidden in filler text ("The grass is green. The sky is blue. ...") at a chosen
depth of a prompt of a chosen length, measured in tokens of the model's own tokenizer; the
model must say it. As in Mohtashami & Jaggi's `run_test.py`: the task line, the filler before
the key, the key line, the filler after it (both slices from the start of the same repeated
text) and the question are joined with newlines; keys are randint(1, 50000); greedy decoding of
at most 10 tokens. We build the filler from whole sentences (no words cut in half), which sets
the length to within one sentence (~6 tokens). Trial t uses the same key at every cell, so
models see identical prompts. `chat=True` wraps the prompt as one user turn of the instruct
format.

Two scores, each the share of trials that pass, per cell and overall:

- `accuracy` (overall: `overall`): the first integer in the answer is the key; the landmark
  protocol's score, the one the paper plots and our heatmap shows.
- `starts_with_key_tokens` (overall: `overall_starts_with_key_tokens`): the answer's first
  tokens are exactly the key's tokens; LongLoRA's score. It is not a stricter `accuracy`: an
  answer "12345" for the key 1234 passes it and fails `accuracy`, and "it is 1234" passes
  `accuracy` and fails it, so either overall may be the higher.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mixtral import chat as chat_format
from mixtral.eval.forward import check_length, greedy
from mixtral.model import Transformer
from mixtral.tokenizer import Tokenizer

TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and "
        "memorize them. I will quiz you about the important information there.")
FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
          "There and back again.")
INFO = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
ANSWER_TOKENS = 10
METRICS = {  # written into every result, so that a reader of the JSON knows what each means
    "accuracy": "share of trials whose answer's first integer is the key (landmark protocol; "
                "'overall' over all cells)",
    "starts_with_key_tokens": "share of trials whose answer's first tokens are exactly the "
                              "key's tokens (LongLoRA); not a subset of 'accuracy': either "
                              "may be higher"}


@dataclass
class Prompt:
    ids: list[int]
    key: int
    key_position: int  # index in ids of the key line's first token
    filler_start: int  # index of the first filler token (after the task line)
    filler_tokens: int  # tokens of filler in all (before and after the key line)


def filler(n: int) -> str:
    """n filler sentences, from the start of the repeated text."""
    return " ".join(FILLER[i % len(FILLER)] for i in range(n))


def build_prompt(tokenizer: Tokenizer, length: int, depth: float, key: int,
                 chat: bool = False) -> Prompt:
    """The longest prompt of at most `length` tokens (BOS included) with the key line after
    `depth` (0..1) of the filler."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be within 0..1, got {depth}")

    def encode(text: str) -> list[int]:
        if chat:
            return chat_format.encode([{"role": "user", "content": text}], tokenizer=tokenizer)
        return tokenizer.encode(text)

    def text(sentences: int) -> tuple[str, str]:
        before = round(depth * sentences)
        head = f"{TASK}\n{filler(before)}\n"
        return head, head + f"{INFO.format(key=key)}\n{filler(sentences - before)}\n{QUESTION}"

    bare = len(encode(text(0)[1]))
    if bare > length:
        raise ValueError(f"a passkey prompt needs at least {bare} tokens; length {length} is "
                         "too short")
    lo, hi = 0, length  # a sentence is several tokens: `length` sentences are always too many
    while lo < hi:  # the most sentences that fit
        mid = (lo + hi + 1) // 2
        if len(encode(text(mid)[1])) <= length:
            lo = mid
        else:
            hi = mid - 1
    head, full = text(lo)
    ids = encode(full)
    suffix = _inst_suffix(tokenizer) if chat else 0  # [/INST] closes every encoded user turn

    def start_of(prefix: str) -> int:  # where `prefix` (ending at a newline) ends in ids
        return len(encode(prefix)) - suffix

    return Prompt(ids, key, start_of(head), start_of(f"{TASK}\n"), len(ids) - bare)


def _inst_suffix(tokenizer: Tokenizer) -> int:
    """How many tokens the instruct format puts after a user message's text."""
    ids = chat_format.encode([{"role": "user", "content": "x"}], tokenizer=tokenizer)
    x = tokenizer.encode("x", bos=False)
    for end in range(len(ids), len(x) - 1, -1):
        if ids[end - len(x):end] == x:
            return len(ids) - end
    raise AssertionError("the chat encoding does not contain the message text")


def parse_lengths(text: str) -> list[int]:
    """"1k,2k,4k" or "1024,2048" -> [1024, 2048, 4096] (k = 1024, as context sizes are)."""
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        m = re.fullmatch(r"(\d+(?:\.\d+)?)(k?)", part)
        if not m:
            raise ValueError(f"bad length {part!r} in {text!r}: use e.g. 512, 1k, 2k")
        out.append(int(float(m[1]) * (1024 if m[2] else 1)))
    return out


def depths(n: int) -> list[float]:
    """n evenly spaced depths from 0 (key first) to 1 (key last)."""
    if n < 1:
        raise ValueError(f"depths must be >= 1, got {n}")
    return [0.5] if n == 1 else [i / (n - 1) for i in range(n)]


def score(tokenizer: Tokenizer, answer: list[int], key: int) -> tuple[bool, bool]:
    """(first integer of the answer == key, answer's first tokens == the key's tokens): the
    `accuracy` and `starts_with_key_tokens` of one trial."""
    m = re.search(r"\d+", tokenizer.decode(answer))
    key_ids = tokenizer.encode(str(key), bos=False)
    return (m is not None and int(m[0]) == key), answer[:len(key_ids)] == key_ids


def run(model: Transformer, tokenizer: Tokenizer, lengths: list[int], depth_count: int,
        trials: int, seed: int = 0, chat: bool = False, chunk: int = 1024,
        progress: Callable[[int], Any] | None = None) -> dict[str, Any]:
    """Accuracy for each (length, depth) over `trials` prompts; see the module docstring."""
    for length in lengths:  # all errors before any work
        check_length(model, length + ANSWER_TOKENS,
                     f"passkey length {length} with {ANSWER_TOKENS} answer tokens")
    grid = depths(depth_count)
    keys = [random.Random(seed * 1_000_003 + t).randint(1, 50000) for t in range(trials)]
    cells = []
    for length in lengths:
        for depth in grid:
            hits = starts = 0
            prompt_tokens = key_depth = 0.0
            for key in keys:
                p = build_prompt(tokenizer, length, depth, key, chat)
                answer = greedy(model, p.ids, ANSWER_TOKENS, (tokenizer.eos_id,), chunk)
                hit, start = score(tokenizer, answer, key)
                hits, starts = hits + hit, starts + start
                prompt_tokens += len(p.ids) / trials
                key_depth += (p.key_position - p.filler_start) / max(p.filler_tokens, 1) / trials
                if progress:
                    progress(1)
            cells.append({"length": length, "depth": round(depth, 4), "trials": trials,
                          "accuracy": hits / trials, "starts_with_key_tokens": starts / trials,
                          "mean_prompt_tokens": round(prompt_tokens, 1),
                          "mean_key_depth": round(key_depth, 4)})
    def grid_of(metric: str) -> list[list[float]]:  # [length][depth]
        return [[c[metric] for c in cells if c["length"] == n] for n in lengths]

    def overall(metric: str) -> float:
        return sum(c[metric] for c in cells) / len(cells)

    return {"protocol": "landmark-attention passkey (Mohtashami & Jaggi 2023), whole-sentence "
                        "filler, greedy",
            "metrics": METRICS, "chat": chat, "lengths": lengths,
            "depths": [round(d, 4) for d in grid], "trials": trials, "seed": seed,
            "accuracy": grid_of("accuracy"), "overall": overall("accuracy"),
            "starts_with_key_tokens": grid_of("starts_with_key_tokens"),
            "overall_starts_with_key_tokens": overall("starts_with_key_tokens"), "cells": cells}
