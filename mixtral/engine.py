"""The engine: continuous batching of many requests over one model and one KV cache.

Token ids are its currency: `submit(prompt_ids, params, on_token, on_done)` returns a `Job`
whose callbacks receive generated ids from the engine's worker thread; the server (or anything
else) turns them into text. The cache has one slot per running sequence. Each iteration of the
worker admits waiting jobs into free slots, runs one prefill chunk of at most `prefill_chunk`
prompt tokens (so a long prompt never stalls the others for long), then one decode step for every
sequence that has a token to feed, as a single batch with per-row positions. A job can be
cancelled at any time — waiting or running — and its slot is free before the next step.
Each sequence samples with its own `Sampler` (settings and seed), so batching shares no
sampling state. (The arithmetic of a row can still move in its last bits with the batch, as
kernels differ by shape: a decoding row beside 1-3 others measured bit for bit the same on an
avx512_bf16 CPU, and within ~5e-6 of its logits in fp32 on the avx2 tier.)

A prompt's prefill starts at its first token whose KV is not to be had already, in a running
sequence's cache row or in the `PrefixCache` of finished ones (`prefix_cache` bytes, 0: none); a
twin of a running prompt, or a retry of a finished one, runs no forward pass (reuse.py).
`Job.cached_tokens` says how many prompt tokens were reused.
A job that asks for its prompt's own logprobs (`Job.prompt_logprobs`) reuses nothing: copied KV
brings no logits, and it needs every position's (prefill.PromptLogprobs); so a scoring request
runs its prefill whole, even with `max_tokens` 0, and its twins can still share it.

A fault belongs to the request that caused it: a job that cannot be admitted, a prefill that
raises, a row whose decode raises when run alone (a failed batch is retried row by row) — each
fails only its own job, with the error delivered to `on_done`, and the loop goes on. Should the
loop itself ever end, `failure` says why, every job still in it is failed, and `submit` raises
`EngineDown`, so that no caller waits for an engine that is gone.

The loop runs on the engine's own thread, or — `Engine(..., thread=False)` then `run()` — on the
caller's. PyTorch's CPU kernels are fastest on the thread whose OpenMP team is already warm (with
2 cores, libgomp stops spinning as soon as a second team exists), so `mixtral serve` and
`mixtral bench` compute on the main thread and put the web server beside it. Between steps, on
that thread, `threads.policy()` may change torch's thread count (MIXTRAL_THREADS=adaptive).
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
from collections.abc import Callable

import torch

from mixtral import threads
from mixtral.cache import KVCache
from mixtral.generate import GenerationParams, Sampler, TokenConstraint, max_new_tokens
from mixtral.jobs import EngineDown, Job, QueueFull, Running, done
from mixtral.model import Runner
from mixtral.prefill import PromptLogprobs, prefill
from mixtral.prefix_cache import PrefixCache
from mixtral.reuse import reuse
from mixtral.sampling import check_seed

log = logging.getLogger("mixtral.engine")


class Engine:
    def __init__(self, model: Runner, max_queue: int = 16, max_batch: int = 8,
                 max_seq_len: int | None = None, prefill_chunk: int = 512,
                 thread: bool = True, prefix_cache: int = 0, kv_copies: bool = True) -> None:
        """`prefix_cache`: bytes of finished sequences' KV kept for reuse (0: none).
        `kv_copies=False`: the cache has twins this process cannot copy into (parallel.Leader's
        followers see only model calls), so no KV is ever reused."""
        self.model = model
        self.max_queue, self.max_batch, self.prefill_chunk = max_queue, max_batch, prefill_chunk
        self.context = min(max_seq_len or model.args.max_seq_len, model.args.max_seq_len)
        self.device = model.device
        self.cache = KVCache(model.args, max_batch, self.context, model.dtype, model.device)
        self.kv_copies = kv_copies
        self.prefixes = PrefixCache(prefix_cache if kv_copies else 0)
        self._slots: list[Running | None] = [None] * max_batch
        self._waiting: collections.deque[Job] = collections.deque()
        self._lock = threading.Condition()
        self._ids = itertools.count(1)
        self._stopping = False
        self._ended: str | None = None  # why the loop is no longer running, once it is not
        self._thread = None
        self.threads = threads.policy()  # torch's thread count, set between steps
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

    @property
    def failure(self) -> str | None:
        """Why the loop is not running (it stopped or crashed); None while it runs or has yet
        to be started by its caller (`thread=False`)."""
        if self._ended is None and self._thread is not None and not self._thread.is_alive():
            return "the engine thread is not running"
        return self._ended

    def check(self, prompt: list[int], params: GenerationParams) -> int:
        """How many tokens the request may generate; ValueError if it cannot run here."""
        check_seed(params.seed)
        return max_new_tokens(self.model, prompt, params, self.context)

    def job(self, prompt: list[int], params: GenerationParams,
            on_token: Callable[[int], object], on_done: Callable[[BaseException | None], object],
            constraint: TokenConstraint | None = None) -> Job:
        """A checked job, not yet queued (see `enqueue`); ValueError if it cannot run here."""
        self.check(prompt, params)
        return Job(prompt, params, on_token, on_done, constraint, next(self._ids))

    def submit(self, prompt: list[int], params: GenerationParams,
               on_token: Callable[[int], object], on_done: Callable[[BaseException | None], object],
               constraint: TokenConstraint | None = None) -> Job:
        job = self.job(prompt, params, on_token, on_done, constraint)
        self.enqueue([job])
        return job

    def enqueue(self, jobs: list[Job]) -> None:
        """Queue all of `jobs` or none (QueueFull): the n answers of one request share a fate.
        A group larger than the queue still goes in when nothing waits, so it cannot starve."""
        with self._lock:
            if why := self.failure:
                raise EngineDown(why)
            if self._stopping:
                raise QueueFull("the engine is shutting down")
            if self._waiting and len(self._waiting) + len(jobs) > self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting")
            self._waiting.extend(jobs)
            self._lock.notify()

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
        do with `until_idle`. Faults of single requests fail those requests only; should the
        loop itself raise, every job in it fails and `failure` reports the crash."""
        try:
            while self._admit(block=not until_idle):
                self.threads.between_steps()
                self._step()
        except BaseException as e:
            self._ended = f"the engine loop crashed: {type(e).__name__}: {e}"
            log.error("engine loop crashed", exc_info=e)
            self._fail_all(EngineDown(self._ended))
            raise
        if self._stopping:
            self._ended = "the engine has stopped"

    def _fail_all(self, error: BaseException) -> None:
        with self._lock:
            waiting = list(self._waiting)
            self._waiting.clear()
        for job in waiting:
            done(job, error)
        for r in self._active():
            self._finish(r, error)

    def _step(self) -> None:
        self._prefill()
        self._decode()

    def _active(self) -> list[Running]:
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
                    done(self._waiting.popleft(), None)
                free = [i for i, r in enumerate(self._slots) if r is None]
                while self._waiting and free:
                    job = self._waiting.popleft()
                    if self._place(job, free[0]):
                        free.pop(0)
                if self._stopping and not self._active():
                    return False
                if self._active():
                    return True
                if not block:
                    return False
                self._lock.wait()

    def _place(self, job: Job, slot: int) -> bool:
        """Give `job` the slot; False when it ended instead: it fails (any error admitting it,
        e.g. a seed its generator cannot hold, is its own), or it asked for no tokens at all."""
        try:
            n = self.check(job.prompt, job.params)
            sampler = Sampler(job.params, n, self.model.args.vocab_size, self.device,
                              job.constraint, job.prompt)
            scores = None if job.prompt_logprobs is None else PromptLogprobs(
                job.prompt, job.prompt_logprobs)
        except Exception as e:
            done(job, e)
            return False
        if n == 0 and scores is None:  # max_tokens 0: done before any forward pass
            done(job, None)
            return False
        self._slots[slot] = Running(job, slot, sampler, scores=scores)
        return True

    def _finish(self, r: Running, error: BaseException | None = None) -> None:
        if error is None and self.prefixes.budget:  # a cancelled job's prefix is as good
            # its prompt logits, where its prefill computed them (not a twin's or kept ones)
            own = r.logits if r.job.cached_tokens < len(r.job.prompt) else None
            self.prefixes.store(r.cached(), self.cache.k[:, r.slot], self.cache.v[:, r.slot],
                                None if own is None else (len(r.job.prompt), own, r.copied))
        with self._lock:
            self._slots[r.slot] = None
        done(r.job, error)

    def _emit(self, r: Running, token: int) -> None:
        r.out.append(token)
        try:
            if r.job.on_logprob is not None and r.sample.logprob is not None:
                r.job.on_logprob(r.sample.logprob)
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
        """One chunk of the oldest unfinished prompt. Prompts start in order, each once every
        older one is in the cache (so it finds all there is to reuse); one that then needs no
        forward pass at all (a twin's) is done at once."""
        todo = sorted((r for r in self._active() if r.prefilled < len(r.job.prompt)),
                      key=lambda x: x.job.id)
        ran = False
        for r in todo:
            if not r.started:
                self._start(r)
            if self._slots[r.slot] is not r or r.prefilled == len(r.job.prompt):
                continue
            # one chunk per iteration, not the whole prompt: the decode step that follows keeps
            # the other requests' tokens coming while a long prompt goes in
            if ran:
                return
            ran = True
            self._chunk(r)
            if self._slots[r.slot] is not r or r.prefilled < len(r.job.prompt):
                return

    def _start(self, r: Running) -> None:
        """Copy into r's row the longest prefix of its prompt with KV at hand (reuse.py); with
        a whole prompt's logits, sample its first token at once."""
        r.started = True
        if not self.kv_copies or r.scores is not None:  # scored: every position's logits
            return
        got = reuse(r.job.prompt, r.slot, (d for d in self._active() if d is not r),
                    self.prefixes, self.cache.k, self.cache.v)
        r.prefilled = r.job.cached_tokens = got.tokens
        r.copied = got.copied
        if got.logits is not None:
            r.logits = got.logits.clone()  # for a twin of this one
            self._choose(r, got.logits.clone())

    def _chunk(self, r: Running) -> None:
        start = r.prefilled
        chunk = r.job.prompt[start:start + self.prefill_chunk]
        try:
            logits = prefill(self.model, chunk, self.cache.rows([r.slot]), start=start,
                             scores=r.scores)
        except Exception as e:  # only this request was in the forward pass
            self._finish(r, e)
            return
        r.prefilled += len(chunk)
        if r.prefilled == len(r.job.prompt):
            if self.kv_copies:  # for a twin prompt, should one come while this one runs
                r.logits = logits.clone()
            if r.scores is not None and not self._scored(r):
                return
            self._choose(r, logits)

    def _scored(self, r: Running) -> bool:
        """Hand r's prompt logprobs over; False when r ended instead: its consumer broke, or
        scoring the prompt was all it asked (max_tokens 0)."""
        assert r.scores is not None and r.scores.complete
        try:
            if r.job.on_prompt_logprobs is not None:
                r.job.on_prompt_logprobs(r.scores.entries)
        except Exception as e:
            self._finish(r, e)
            return False
        if r.sample.max_new == 0:
            self._finish(r)
            return False
        return True

    @torch.inference_mode()
    def _decode(self) -> None:
        """One token for every sequence that has one to feed, as one batch."""
        rows = sorted((r for r in self._active() if r.pending is not None), key=lambda x: x.slot)
        if not rows:
            return
        try:
            logits = self._decode_forward(rows)
        except Exception as e:
            if len(rows) == 1:
                self._finish(rows[0], e)
                return
            self._decode_alone(rows)  # find the row to blame; the others go on
            return
        for i, r in enumerate(rows):
            r.fed += 1
            self._next(r, logits[i:i + 1, -1])

    def _decode_alone(self, rows: list[Running]) -> None:
        """After a failed batch: each row on its own, failing only those that fail alone.
        Rewriting a row's cache entries for the same position is harmless."""
        for r in rows:
            try:
                logits = self._decode_forward([r])
            except Exception as e:
                self._finish(r, e)
                continue
            r.fed += 1
            self._next(r, logits[:, -1])

    def _decode_forward(self, rows: list[Running]) -> torch.Tensor:
        tokens = torch.tensor([[r.pending] for r in rows], device=self.device)
        positions = torch.tensor([[len(r.job.prompt) + r.sample.generated - 1] for r in rows],
                                 device=self.device)
        return self.model(tokens, positions, self.cache.rows([r.slot for r in rows]))

    def _next(self, r: Running, logits: torch.Tensor) -> None:
        r.pending = None
        if r.job.cancelled.is_set():
            self._finish(r)
            return
        self._choose(r, logits)

    def _choose(self, r: Running, logits: torch.Tensor) -> None:
        try:
            token = r.sample(logits)
        except Exception as e:  # e.g. a constraint failing: only this request fails
            self._finish(r, e)
            return
        self._emit(r, token)

