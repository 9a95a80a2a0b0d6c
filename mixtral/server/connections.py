"""uvicorn as this server runs it: bounded connections, deadlines for reading a request, quiet
logs under a flood, and a shutdown that ends every answer by its grace deadline.

Connections cost a file descriptor each, and uvicorn on its own keeps one that never sends a
byte forever: ~20,000 idle sockets once exhausted the process's descriptors. So a connection
has `header_timeout_s` to send a whole request head — from connecting, or from its previous
answer; bytes trickling in do not extend it — and at most `max_connections` stay open: the one
idle the longest makes room for a new one, and while all are busy new requests get uvicorn's
503. The body then has `body_timeout_s` (middleware.LimitBody).

On shutdown uvicorn stops accepting and waits; at `grace` seconds every answer still running is
cut (State.cut: a 503, or an error event and `data: [DONE]` in a stream), a little before
uvicorn would cancel the tasks, which would end streams mid-event and log tracebacks.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from typing import Any

import h11
import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

from mixtral.server.state import Settings, State

CUT_MARGIN_S = 2.0  # uvicorn's own deadline comes this long after the cut: time to send it


class GuardedH11(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request head and room kept for new
    connections."""

    head_timeout: float = 10.0  # set per server by `uvicorn_server`

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.head_timer: asyncio.TimerHandle | None = None
        self.idle_since = 0.0  # when it began waiting for a request head

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._await_head()
        self._make_room()

    def connection_lost(self, exc: Exception | None) -> None:
        self._head_arrived()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state is not h11.IDLE:  # a head arrived (or the connection broke)
            self._head_arrived()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._await_head()  # the next request's head is due like the first one's

    def _await_head(self) -> None:
        self._head_arrived()
        self.idle_since = time.monotonic()
        self.head_timer = self.loop.call_later(self.head_timeout, self._too_slow)

    def _head_arrived(self) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None

    def _too_slow(self) -> None:
        self.head_timer = None
        if not self.transport.is_closing():
            self.transport.close()  # h11 cannot answer a request it has not read: just close

    def _make_room(self) -> None:
        """At the limit, close the connections idle the longest (waiting for a head, nothing
        running), so that this one can be served rather than answered 503."""
        limit = self.config.limit_concurrency
        if limit is None or len(self.connections) < limit:
            return
        idle = sorted((c for c in self.connections if c is not self
                       and isinstance(c, GuardedH11) and c.head_timer is not None
                       and (c.cycle is None or c.cycle.response_complete)),
                      key=lambda c: c.idle_since)
        for c in idle[:len(self.connections) - limit + 1]:
            c._head_arrived()
            self.connections.discard(c)  # counted out now: the close completes later
            c.transport.close()


class RepeatFilter(logging.Filter):
    """One line per `interval` seconds for each distinct message; the next one says how many
    were left out (a flood of bad connections must not flood the log, or the disk)."""

    def __init__(self, interval: float = 10.0, remember: int = 256,
                 clock: Any = time.monotonic) -> None:
        super().__init__()
        self.interval, self.remember, self.clock = interval, remember, clock
        self.seen: dict[str, tuple[float, int]] = {}  # message -> (last shown, left out since)

    def filter(self, record: logging.LogRecord) -> bool:
        text, now = record.getMessage(), self.clock()
        shown, left_out = self.seen.get(text, (None, 0))
        if shown is not None and now - shown < self.interval:
            self.seen[text] = (shown, left_out + 1)
            return False
        self.seen.pop(text, None)
        if len(self.seen) >= self.remember:  # forget the oldest: memory stays bounded
            self.seen.pop(next(iter(self.seen)))
        self.seen[text] = (now, 0)
        if left_out:
            record.msg, record.args = f"{text} ({left_out} more like it left out)", None
        return True


LOGGERS = ("uvicorn.error", "mixtral.server", "mixtral.engine")  # not the access log: no repeats


def quiet_repeats() -> None:
    for name in LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RepeatFilter) for f in logger.filters):
            logger.addFilter(RepeatFilter())


class Server(uvicorn.Server):
    """uvicorn's server, whose shutdown cuts the answers still running at `grace` seconds."""

    def __init__(self, config: uvicorn.Config, state: State, grace: float) -> None:
        super().__init__(config)
        self.state, self.grace = state, grace

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.state.draining = True
        deadline = asyncio.get_running_loop().call_later(self.grace, self.state.cut)
        try:
            await super().shutdown(sockets)
        finally:
            deadline.cancel()


def uvicorn_server(app: FastAPI, host: str, port: int, grace: float,
                   log_level: str = "info") -> Server:
    """The uvicorn server for `app` (made by create_app) with the limits of its Settings."""
    state: State = app.state.mixtral
    s: Settings = state.settings
    protocol = type("GuardedH11", (GuardedH11,), {"head_timeout": s.header_timeout_s})
    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, http=protocol,
        limit_concurrency=s.max_connections, timeout_keep_alive=s.keep_alive_s,  # type: ignore[arg-type]
        h11_max_incomplete_event_size=s.max_header_bytes,
        timeout_graceful_shutdown=grace + CUT_MARGIN_S)  # type: ignore[arg-type]
    quiet_repeats()  # after uvicorn.Config, which sets its loggers up
    return Server(config, state, grace)
