"""A request as the engine sees it: the `Job` a caller submits (token ids in, callbacks out),
the `Running` state of one admitted in a cache row, and the engine's two refusals.

Kept apart from the loop (engine.py) so that what a caller holds reads on its own.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from mixtral.generate import GenerationParams, Sampler, TokenConstraint
from mixtral.prefill import PromptLogprobs
from mixtral.sampling import TokenLogprob


class QueueFull(RuntimeError):
    pass


class EngineDown(RuntimeError):
    """The engine's loop has ended (stopped, or crashed): nothing submitted would ever run."""


@dataclass(eq=False)
class Job:
    prompt: list[int]
    params: GenerationParams
    on_token: Callable[[int], object]  # called from the worker thread, once per generated id
    on_done: Callable[[BaseException | None], object]  # exactly once: None, or the error
    constraint: TokenConstraint | None = None
    id: int = 0
    cancelled: threading.Event = field(default_factory=threading.Event)
    cached_tokens: int = 0  # prompt tokens whose KV was copied, not computed (set at its start)
    # with params.logprobs: each token's logprobs, just before its on_token (worker thread)
    on_logprob: Callable[[TokenLogprob], object] | None = None
    # the prompt's own logprobs with this many alternatives (None: not wanted): the prompt is
    # then prefilled whole (no KV reused) and, once it is in, on_prompt_logprobs gets the
    # entries of positions 1.. (worker thread, before any on_token; max_tokens 0 still runs)
    prompt_logprobs: int | None = None
    on_prompt_logprobs: Callable[[list[TokenLogprob]], object] | None = None

    def cancel(self) -> None:
        self.cancelled.set()


@dataclass(eq=False)
class Running:
    job: Job
    slot: int
    sample: Sampler
    prefilled: int = 0  # prompt tokens already in the cache
    pending: int | None = None  # the last sampled token, not yet fed to the model
    started: bool = False  # its prefill has begun (and looked for KV to reuse)
    logits: torch.Tensor | None = None  # after the whole prompt, for a twin prompt to sample
    copied: int = 0  # prompt positions copied from the prefix cache
    scores: PromptLogprobs | None = None  # with job.prompt_logprobs, gathered by its prefill
    out: list[int] = field(default_factory=list)  # the generated ids
    fed: int = 0  # of which are in the cache

    def cached(self) -> list[int]:
        """The ids whose KV this sequence's cache row holds, at positions 0, 1, ..."""
        return self.job.prompt[:self.prefilled] + self.out[:self.fed]


def done(job: Job, error: BaseException | None) -> None:
    """Call `job.on_done` once; a broken callback must not take the engine down."""
    try:
        job.on_done(error)
    except Exception:
        pass
