"""The engine: one model, a bounded first-come-first-served queue, a worker thread.

Token ids are its currency: `submit(prompt_ids, params)` returns a `Job` whose callbacks receive
generated ids from the worker thread. The server (or anything else) turns them into text. A job
can be cancelled at any time — waiting or running — and its slot is freed before the next token.
Requests run one at a time for now; batching them in one forward pass slots in behind `submit`.
"""

from __future__ import annotations

import collections
import itertools
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from mixtral.generate import GenerationParams, TokenConstraint, generate
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


class Engine:
    def __init__(self, model: Transformer, max_queue: int = 16) -> None:
        self.model = model
        self.max_queue = max_queue
        self._waiting: collections.deque[Job] = collections.deque()
        self._running: Job | None = None
        self._lock = threading.Condition()
        self._ids = itertools.count(1)
        self._stopping = False
        self._thread = threading.Thread(target=self._work, name="mixtral-engine", daemon=True)
        self._thread.start()

    @property
    def queue_depth(self) -> int:
        """Jobs waiting, not counting the one running."""
        with self._lock:
            return len(self._waiting)

    @property
    def busy(self) -> bool:
        with self._lock:
            return self._running is not None

    def submit(self, prompt: list[int], params: GenerationParams,
               on_token: Callable[[int], object], on_done: Callable[[BaseException | None], object],
               constraint: TokenConstraint | None = None) -> Job:
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
        """Cancel everything and end the worker thread."""
        with self._lock:
            self._stopping = True
            for job in [*self._waiting, *([self._running] if self._running else [])]:
                job.cancel()
            self._lock.notify()
        self._thread.join(timeout)

    def _next(self) -> Job | None:
        with self._lock:
            while True:
                while self._waiting and self._waiting[0].cancelled.is_set():
                    self._finish(self._waiting.popleft())  # cancelled while waiting
                if self._waiting:
                    self._running = self._waiting.popleft()
                    return self._running
                if self._stopping:
                    return None
                self._lock.wait()

    def _work(self) -> None:
        while (job := self._next()) is not None:
            error: BaseException | None = None
            tokens = generate(self.model, job.prompt, job.params, job.constraint)
            try:
                for token in tokens:
                    if job.cancelled.is_set():
                        break
                    job.on_token(token)
            except Exception as e:  # reported to the job's owner, the engine goes on
                error = e
            finally:
                tokens.close()  # frees this job's KV cache now
                with self._lock:
                    self._running = None
            self._finish(job, error)

    @staticmethod
    def _finish(job: Job, error: BaseException | None = None) -> None:
        try:
            job.on_done(error)
        except Exception:  # a broken callback must not take the engine down
            pass
