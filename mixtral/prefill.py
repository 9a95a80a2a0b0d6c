"""Prefill: a prompt fed through the model into a KV cache, written once for every caller
(the engine, the reference decode loop, the evaluations, the benchmark).

The ids go in `chunk` tokens per forward call at positions start, start+1, ...; a chunk attends
to the cached positions before it, so the logits are those of one call over the whole prompt,
while a long prompt never builds a [T, T] mask or [T, V] logits bigger than the chunk's.

`PromptLogprobs` is what a prefill can also keep: the prompt's own logprobs (each token's given
the ones before it, as OpenAI's `echo` with `logprobs` reports them), reduced chunk by chunk to
the token's value and the top few, so no more than one chunk's [t, V] exists at a time.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from mixtral.cache import CacheRows, KVCache
from mixtral.model import Runner
from mixtral.sampling import LOGPROB_FLOOR, TokenLogprob


@torch.inference_mode()
def chunks(model: Runner, ids: Sequence[int], cache: KVCache | CacheRows,
           chunk: int | None = None, *, start: int = 0, **forward: Any) -> Iterator[Any]:
    """Feed `ids` (one sequence) into `cache` at positions start..start+len(ids)-1, `chunk`
    tokens per call (default: all in one); yield what each call returns, in order. `forward`
    goes to every call (last_only, return_router_logits)."""
    if not ids:
        raise ValueError("nothing to prefill: the prompt has no tokens")
    step = len(ids) if chunk is None else chunk
    if step < 1:
        raise ValueError(f"prefill chunk must be at least 1 token, got {chunk}")
    device = model.device
    for at in range(0, len(ids), step):
        piece = ids[at:at + step]
        tokens = torch.tensor([list(piece)], device=device)  # [1, t]
        positions = torch.arange(start + at, start + at + len(piece), device=device)[None]
        yield model(tokens, positions, cache, **forward)


class PromptLogprobs:
    """A prompt's own logprobs, gathered while it is prefilled: for each position p >= 1, the
    model's log_softmax (temperature 1, no filters: the model's own view, as OpenAI and vLLM
    report a prompt's) of prompt[p] given prompt[:p], and the `top` likeliest ids there.
    Position 0 has none (nothing predicts the first token). Every position's logits are needed,
    so a prompt scored this way must be prefilled from position 0: KV copied from elsewhere
    brings no logits with it."""

    def __init__(self, prompt: Sequence[int], top: int) -> None:
        if top < 0:
            raise ValueError(f"prompt logprobs need top >= 0 alternatives, got {top}")
        self.prompt, self.top = list(prompt), top
        self.entries: list[TokenLogprob] = []  # for positions 1, 2, ... in order

    @property
    def complete(self) -> bool:
        return len(self.entries) == len(self.prompt) - 1

    def add(self, start: int, logits: Tensor) -> None:
        """fp32 `logits` [t, V] at positions start..start+t-1, each predicting the next
        token: the entries of positions start+1.. (those within the prompt)."""
        if start != len(self.entries):
            raise ValueError(f"prompt logprobs need every position in order: got position "
                             f"{start} after {len(self.entries)}")
        targets = self.prompt[start + 1:start + 1 + logits.shape[0]]
        if not targets:
            return
        scores = logits[:len(targets)].float().log_softmax(-1).clamp(min=LOGPROB_FLOOR)
        chosen = scores.gather(-1, torch.tensor(targets, device=scores.device)[:, None])
        values, ids = scores.topk(min(self.top, scores.shape[-1]), dim=-1)
        for token, value, top_v, top_i in zip(targets, chosen[:, 0].tolist(), values.tolist(),
                                              ids.tolist(), strict=True):
            self.entries.append(TokenLogprob(token, value, tuple(zip(top_i, top_v,
                                                                     strict=True))))


def prefill(model: Runner, ids: Sequence[int], cache: KVCache | CacheRows,
            chunk: int | None = None, *, start: int = 0,
            scores: PromptLogprobs | None = None) -> Tensor:
    """Feed `ids` into `cache` as `chunks` does -> the fp32 logits [1, V] after the last one.
    With `scores`, every position's logits go to it, one call's at a time."""
    at = start
    for out in chunks(model, ids, cache, chunk, start=start, last_only=scores is None):
        if scores is not None:
            scores.add(at, out[0])
            at += out.shape[1]
        logits = out  # each chunk's logits replace the last one's: only the final ones are kept
    return logits[:, -1]
