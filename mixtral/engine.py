"""The engine: continuous batching of many requests over one model and one KV cache.

Token ids are its currency: `submit(prompt_ids, params, on_token, on_done)` returns a `Job`
whose callbacks receive generated ids from the engine's worker thread; the server (or anything
else) turns them into text. The cache has one slot per running sequence. Each iteration of the
worker admits waiting jobs into free slots, runs one prefill chunk of at most `prefill_chunk`
prompt tokens (so a long prompt never stalls the others for long), then one decode step for every
sequence that has a token to feed, as a single batch with per-row positions. A job can be
cancelled at any time — waiting or running — and its slot is free before the next step.
Each sequence samples with its own `Sampler` (settings and seed), so batching changes no
request's tokens.

The loop runs on the engine's own thread, or — `Engine(..., thread=False)` then `run()` — on the
caller's. PyTorch's CPU kernels are fastest on the thread whose OpenMP team is already warm (with
2 cores, libgomp stops spinning as soon as a second team exists), so `mixtral serve` and
`mixtral bench` compute on the main thread and put the web server beside it.
"""

from __future__ import annotations

import collections
import itertools
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from mixtral.cache import KVCache
from mixtral.generate import GenerationParams, Sampler, TokenConstraint, max_new_tokens
from mixtral.model import Transformer


class QueueFull(RuntimeError):
    pass


@dataclass(eq=False)
class Job:
    prompt: list[int]
    params: GenerationParams
    on_token: Callable[[int], object]  # called from the worker thread, once per generated id
    on_done: Callable[[BaseException | None], object]  # exactly once: None, or the error
    constraint: TokenConstraint | None = None
    id: int = 0
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled.set()


@dataclass(eq=False)
class _Running:
    job: Job
    slot: int
    sample: Sampler
    prefilled: int = 0  # prompt tokens already in the cache
    pending: int | None = None  # the last sampled token, not yet fed to the model


class Engine:
    def __init__(self, model: Transformer, max_queue: int = 16, max_batch: int = 8,
                 max_seq_len: int | None = None, prefill_chunk: int = 512,
                 thread: bool = True) -> None:
        self.model = model
        self.max_queue, self.max_batch, self.prefill_chunk = max_queue, max_batch, prefill_chunk
        self.context = min(max_seq_len or model.args.max_seq_len, model.args.max_seq_len)
        embed = model.tok_embeddings.weight  # never quantized: the dtype and device to use
        self.device = embed.device
        self.cache = KVCache(model.args, max_batch, self.context, embed.dtype, embed.device)
        self._slots: list[_Running | None] = [None] * max_batch
        self._waiting: collections.deque[Job] = collections.deque()
        self._lock = threading.Condition()
        self._ids = itertools.count(1)
        self._stopping = False
        self._thread = None
        if thread:
            self._thread = threading.Thread(target=self.run, name="mixtral-engine", daemon=True)
            self._thread.start()

    # --- the caller's side (any thread) ----------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        """Jobs waiting for a slot."""
        with self._lock:
            return len(self._waiting)

    @property
    def running(self) -> int:
        with self._lock:
            return sum(r is not None for r in self._slots)

    @property
    def busy(self) -> bool:
        return self.running > 0

    def check(self, prompt: list[int], params: GenerationParams) -> int:
        """How many tokens the request may generate; ValueError if it cannot run here."""
        return max_new_tokens(self.model, prompt, params, self.context)

    def submit(self, prompt: list[int], params: GenerationParams,
               on_token: Callable[[int], object], on_done: Callable[[BaseException | None], object],
               constraint: TokenConstraint | None = None) -> Job:
        self.check(prompt, params)
        job = Job(prompt, params, on_token, on_done, constraint, next(self._ids))
        with self._lock:
            if self._stopping:
                raise QueueFull("the engine is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting")
            self._waiting.append(job)
            self._lock.notify()
        return job

    def stop(self, timeout: float | None = None) -> None:
        """Cancel everything and end the loop (and its thread)."""
        with self._lock:
            self._stopping = True
            for job in [*self._waiting, *(r.job for r in self._slots if r is not None)]:
                job.cancel()
            self._lock.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    # --- the loop --------------------------------------------------------------------------------

    def run(self, until_idle: bool = False) -> None:
        """The engine loop, on the calling thread: until `stop()`, or until nothing is left to
        do with `until_idle`."""
        while self._admit(block=not until_idle):
            self._step()

    def _step(self) -> None:
        try:
            self._prefill()
            self._decode()
        except Exception as e:  # a failed forward fails the jobs in it; the engine goes on
            for r in list(self._active()):
                self._finish(r, e)

    def _active(self) -> list[_Running]:
        return [r for r in self._slots if r is not None]

    def _admit(self, block: bool = True) -> bool:
        """Drop cancelled jobs, move waiting jobs into free slots; block while idle.
        False when the engine stops (or is idle, without `block`)."""
        for r in self._active():
            if r.job.cancelled.is_set():
                self._finish(r)
        with self._lock:
            while True:
                while self._waiting and self._waiting[0].cancelled.is_set():
                    _done(self._waiting.popleft(), None)
                free = [i for i, r in enumerate(self._slots) if r is None]
                while self._waiting and free:
                    job = self._waiting.popleft()
                    slot = free.pop(0)
                    try:
                        n = self.check(job.prompt, job.params)
                    except ValueError as e:
                        _done(job, e)
                        continue
                    sampler = Sampler(job.params, n, self.model.args.vocab_size, self.device,
                                      job.constraint)
                    self._slots[slot] = _Running(job, slot, sampler)
                if self._stopping and not self._active():
                    return False
                if self._active():
                    return True
                if not block:
                    return False
                self._lock.wait()

    def _finish(self, r: _Running, error: BaseException | None = None) -> None:
        with self._lock:
            self._slots[r.slot] = None
        _done(r.job, error)

    def _emit(self, r: _Running, token: int) -> None:
        try:
            r.job.on_token(token)
        except Exception as e:  # the consumer is gone or broken: end this job only
            self._finish(r, e)
            return
        if r.sample.finished(token):
            self._finish(r)
        else:
            r.pending = token

    @torch.inference_mode()
    def _prefill(self) -> None:
        """One chunk of the oldest unfinished prompt."""
        todo = [r for r in self._active() if r.prefilled < len(r.job.prompt)]
        if not todo:
            return
        r = min(todo, key=lambda x: x.job.id)
        start = r.prefilled
        chunk = r.job.prompt[start:start + self.prefill_chunk]
        tokens = torch.tensor([chunk], device=self.device)
        positions = torch.arange(start, start + len(chunk), device=self.device)[None]
        logits = self.model(tokens, positions, self.cache.rows([r.slot]), last_only=True)
        r.prefilled += len(chunk)
        if r.prefilled == len(r.job.prompt):
            self._choose(r, logits[:, -1])

    @torch.inference_mode()
    def _decode(self) -> None:
        """One token for every sequence that has one to feed, as one batch."""
        rows = sorted((r for r in self._active() if r.pending is not None), key=lambda x: x.slot)
        if not rows:
            return
        tokens = torch.tensor([[r.pending] for r in rows], device=self.device)
        positions = torch.tensor([[len(r.job.prompt) + r.sample.generated - 1] for r in rows],
                                 device=self.device)
        logits = self.model(tokens, positions, self.cache.rows([r.slot for r in rows]))
        for i, r in enumerate(rows):
            r.pending = None
            if r.job.cancelled.is_set():
                self._finish(r)
                continue
            self._choose(r, logits[i:i + 1, -1])

    def _choose(self, r: _Running, logits: torch.Tensor) -> None:
        try:
            token = r.sample(logits)
        except Exception as e:  # e.g. a constraint failing: only this request fails
            self._finish(r, e)
            return
        self._emit(r, token)


def _done(job: Job, error: BaseException | None) -> None:
    try:
        job.on_done(error)
    except Exception:  # a broken callback must not take the engine down
        pass
