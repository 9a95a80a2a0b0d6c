"""Foresight for offloaded experts (mixtral.offload): read the experts a token will need while
the ones it needs now compute, and say where an offloaded token's time goes. Read-ahead runs
with --prefetch only (mixtral.offload.DEFAULT_PREFETCH says why); the profile, always.

  Foresight  when layer l routes (a hook on its ffn_norm, whose output is what the router and
             the experts receive; put back at each forward if the norm was swapped), asks the
             cache to read ahead, in this order: layer l's own chosen experts (known exactly:
             the second is read while the first computes; these may evict, as their use
             would), then layer l+1's experts as layer l+1's router predicts them from layer
             l's input (the trick `mixtral-offloading` describes; 65.9 % precise on the
             trained default model, benchmarks/prefetch_precision.py). Guesses may evict
             only while the cache misses more than it hits (ExpertCache.prefetch): at 8 GiB
             the full-size model's cache hits 97 %, and the 3 % of 64 guesses a token that
             are wrong are mostly experts it does not hold: reading them evicted experts
             soon needed, 2.5x the reads a token and half the speed; at 4 GiB nothing it
             holds is reused and evicting guesses pays (benchmarks/offload.py --prefetch on
             evict off, RESULTS.md). Guesses are read at all only while at least
             MIN_PRECISION of the last ~RECENT were right: with a real Mixtral's routing
             replayed at 0.66 precision (benchmarks/routing.py), wrong guesses' reads made
             the model wait, 0.26 tok/s at 8 GiB against 0.38 gated or off; at 0.95 they
             neither helped nor hurt. It counts how precise the prediction was, the
             `precision` bench --json reports (the same measure as that script's).
  Reader     the background thread that does the reading. One thread: a disk reads one expert
             at a time fastest, and os.preadv releases the GIL for the read. It only reads:
             the caller packs an expert for the kernels at its first use.
  Profile    seconds and counts per (thread, stage): read (the syscall), drop (the page-cache
             drop), pack (file layout -> the kernels'), wait (the caller blocked on a read in
             flight), compute (the experts); benchmarks/offload.py --profile adds "the rest".

Which experts a read-ahead may evict, and how they rank: mixtral.offload.ExpertCache.prefetch.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Protocol, cast

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

if TYPE_CHECKING:
    from mixtral.model import Transformer, TransformerBlock

Key = tuple[int, int]  # (layer, expert)
READER_NAME = "mixtral-expert-reader"
STAGES = ("read", "drop", "pack", "wait", "compute")
RECENT = 256  # guesses in Foresight's moving average of its precision
MIN_PRECISION = 0.9  # guesses less precise than this are not read (module docstring)


class Profile:
    """Where offloaded experts' time goes: seconds and counts by thread ("caller": the one
    running the model; "reader": the background reader) and stage (STAGES)."""

    def __init__(self) -> None:
        self.seconds: dict[tuple[str, str], float] = defaultdict(float)
        self.counts: dict[tuple[str, str], int] = defaultdict(int)
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            spent = time.perf_counter() - start
            who = "reader" if threading.current_thread().name.startswith(READER_NAME) \
                else "caller"
            with self._lock:
                self.seconds[who, name] += spent
                self.counts[who, name] += 1

    def snapshot(self) -> dict[str, dict[str, tuple[float, int]]]:
        """{thread: {stage: (seconds, count)}} as of now."""
        with self._lock:
            return {who: {s: (self.seconds[who, s], self.counts[who, s]) for s in STAGES}
                    for who in ("caller", "reader")}


class Reader:
    """One background thread running the cache's reads; `submit(fn, *args)` queues one."""

    def __init__(self) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=READER_NAME)

    def submit(self, fn: Callable[..., object], *args: object) -> None:
        self._pool.submit(_quiet_no_grad, fn, *args)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def _quiet_no_grad(fn: Callable[..., object], *args: object) -> None:
    # the read's outcome (a module or the error) reaches the cache's own future; this
    # thread's gradient mode is its own, and an expert's tensors never need gradients
    with torch.no_grad():
        fn(*args)


class Foresight:
    """Read-ahead driven by the routers (module docstring); `cache` is mixtral.offload's
    ExpertCache (its `pin` and `prefetch`)."""

    def __init__(self, model: Transformer, cache: Prefetching) -> None:
        self.cache, self.k = cache, model.args.num_experts_per_tok
        # the routers' weights as fp32 copies (8 x dim each): the model's own router modules
        # are swapped for faster ones by mixtral.fast, and a prediction needs no more
        self.blocks = cast("list[TransformerBlock]", list(model.layers))
        self.gates = [cast(nn.Linear, b.feed_forward.gate).weight.detach().float()
                      for b in self.blocks]
        self.guess: tuple[int, Tensor] | None = None  # (layer, its predicted experts [N, k])
        self.predicted = self.correct = 0
        # precision over about the last RECENT guesses (a moving average), and the least at
        # which guesses are read (module docstring)
        self.recent_precision = 1.0
        self.min_precision = MIN_PRECISION
        self.hooked: list[tuple[nn.Module, RemovableHandle] | None] = [None] * len(self.blocks)
        # each forward first checks the hooks sit on the norms the blocks hold now: the fast
        # paths (mixtral.fast.optimize) swap the norms after the load
        self.handle = model.register_forward_pre_hook(self._attach)
        self._attach()

    def _attach(self, *_: object) -> None:
        for i, block in enumerate(self.blocks):
            norm, hooked = block.ffn_norm, self.hooked[i]
            if hooked is None or hooked[0] is not norm:
                if hooked is not None:
                    hooked[1].remove()
                self.hooked[i] = (norm, norm.register_forward_hook(
                    functools.partial(self._routed, i)))

    def precision(self) -> float | None:
        """Predicted experts the next layer then chose, over all predictions (None: none)."""
        return self.correct / self.predicted if self.predicted else None

    def logits(self, layer: int, x: Tensor, ahead: bool) -> Tensor:
        """Router `layer`'s logits [N, E] for x [N, D] in fp32, `ahead`: a guess made one layer
        early (benchmarks/routing.py replaces this to replay a routing schedule)."""
        return x @ self.gates[layer].T

    def _routed(self, layer: int, _module: nn.Module, _inputs: object, out: Tensor) -> None:
        x = out.detach().reshape(-1, out.shape[-1]).float()  # [N, D]: what the router sees
        now = torch.topk(self.logits(layer, x, False), self.k).indices  # [N, k]
        if self.guess is not None and self.guess[0] == layer and \
                self.guess[1].shape == now.shape:
            guess = self.guess[1]
            right = int((guess[:, :, None] == now[:, None, :]).any(-1).sum())
            self.predicted += guess.numel()
            self.correct += right
            self.recent_precision += (right / guess.numel() - self.recent_precision) \
                * min(1.0, guess.numel() / RECENT)
        keys = [(layer, e) for e in sorted(set(now.flatten().tolist()))]
        self.guess, guessed = None, []
        if layer + 1 < len(self.gates):
            guess = torch.topk(self.logits(layer + 1, x, True), self.k).indices
            self.guess = (layer + 1, guess)
            guessed = [(layer + 1, e) for e in sorted(set(guess.flatten().tolist()))]
        self.cache.pin(keys + guessed)
        self.cache.prefetch(keys)
        if self.recent_precision >= self.min_precision:
            self.cache.prefetch(guessed, guesses=True)

    def remove(self) -> None:
        self.handle.remove()
        for hooked in self.hooked:
            if hooked is not None:
                hooked[1].remove()


class Prefetching(Protocol):
    """What Foresight asks of a cache (mixtral.offload.ExpertCache)."""

    def pin(self, keys: list[Key]) -> None: ...

    def prefetch(self, keys: list[Key], guesses: bool = False) -> None: ...
