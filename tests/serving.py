"""A live server on a free loopback port, in a thread of the test process, for the clients;
and the helpers the server tests share."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable

from mixtral.default_model import random_tiny
from mixtral.model import Transformer
from mixtral.server.app import Settings, create_app
from mixtral.server.connections import uvicorn_server

HELLO = [{"role": "user", "content": "Hello"}]


def post(api, **body):
    """POST a chat completion through the httpx client `api` (default model and messages)."""
    body.setdefault("model", "mistral-small")
    body.setdefault("messages", HELLO)
    return api.post("/v1/chat/completions", json=body)


def sse(response) -> list:
    """The data events of a streamed response: parsed JSON, and the final "[DONE]"."""
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def wait_healthy(url: str, proc, timeout: float, poll: float = 0.2) -> None:
    """Until `mixtral serve` (the process `proc`) answers /health with 200; fails the test when
    it exits first or `timeout` seconds pass."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url + "/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline and proc.poll() is None, "the server never got ready"
        time.sleep(poll)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    def __init__(self, load: Callable[[], Transformer] = random_tiny,
                 json_constraint=None, wait_ready: bool = True, app=None, grace: float = 2.0,
                 **settings) -> None:
        settings.setdefault("name", "mixtral-tiny-random")
        self.app = app or create_app(load, Settings(**settings), json_constraint)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # the server as `mixtral serve` runs it: its connection limits, timeouts and drain
        self.server = uvicorn_server(self.app, "127.0.0.1", self.port, grace, "warning")
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        while wait_ready and self.state.engine is None:
            assert self.state.load_error is None, self.state.load_error
            assert time.monotonic() < deadline, "model did not load"
            time.sleep(0.02)

    @property
    def state(self):
        return self.app.state.mixtral

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


class Failing(Transformer):
    """The default model, but its `fail_at`-th decode step raises (an engine fault)."""

    def __init__(self, fail_at: int) -> None:
        base = random_tiny()
        super().__init__(base.args)
        self.load_state_dict(base.state_dict())
        self.eval()
        self.fail_at, self.steps = fail_at, 0

    def forward(self, tokens, *args, **kwargs):
        if tokens.shape[1] == 1:
            self.steps += 1
            if self.steps % self.fail_at == 0:
                raise RuntimeError("simulated accelerator fault")
        return super().forward(tokens, *args, **kwargs)


class Slow(Transformer):
    """The default model, `delay` seconds slower per forward call (for queue/disconnect tests)."""

    def __init__(self, delay: float, prefill_delay: float = 0.0) -> None:
        base = random_tiny()
        super().__init__(base.args)
        self.load_state_dict(base.state_dict())
        self.eval()
        self.delay, self.prefill_delay = delay, prefill_delay

    def forward(self, tokens, *args, **kwargs):
        time.sleep(self.prefill_delay if tokens.shape[1] > 1 else self.delay)
        return super().forward(tokens, *args, **kwargs)
