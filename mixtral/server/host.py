"""`serve`: the app under uvicorn, in one process with the model — the web server on a thread,
the engine on the main thread — until a signal, then a graceful drain."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from dataclasses import replace

from mixtral.model import Runner
from mixtral.server.connections import uvicorn_server
from mixtral.server.routes import create_app
from mixtral.server.state import ConstraintFactory, Settings, State


def serve(load: Callable[[], Runner], settings: Settings, host: str, port: int,
          grace: float, json_constraint: ConstraintFactory | None = None) -> int:
    """Serve until SIGTERM/Ctrl-C: the web server on a thread (503 while the model loads), the
    model loaded and the engine run on this (the main) thread, where PyTorch's CPU kernels are
    fastest. On a signal the web server stops accepting, gives in-flight requests `grace`
    seconds, cuts the rest (connections.py) and the engine stops; returns 0. A model that
    fails to load stops the web server and re-raises."""
    # the address it is bound to is a name its clients may use (exposure.py)
    settings = replace(settings, allow_hosts=(*settings.allow_hosts, host))
    app = create_app(None, settings, json_constraint)
    state: State = app.state.mixtral
    server = uvicorn_server(app, host, port, grace)  # off the main thread: no signal handlers
    web = threading.Thread(target=server.run, name="mixtral-http")
    web.start()

    def on_signal(sig: int, frame: object) -> None:
        if server.should_exit and sig == signal.SIGINT:
            server.force_exit = True  # a second Ctrl-C: do not wait for the grace period
        server.should_exit = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    try:
        model = load()
    except Exception as e:  # nothing to serve: say why, stop the web server, fail
        state.load_error = f"{type(e).__name__}: {e}"
        server.should_exit = True
        web.join()
        raise
    engine = settings.engine(model, thread=False)
    state.engine = engine
    try:
        if web.is_alive() and not server.should_exit:
            engine.run()  # returns when the app's shutdown stops the engine
    except BaseException:  # the engine crashed: stop serving (and exit non-zero), not hang
        server.should_exit = True
        raise
    finally:
        engine.stop()
        web.join()
    return 0
