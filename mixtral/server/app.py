"""`mixtral serve`'s front door: the names callers import, each from the room that holds it.

    protocol.py    the API on the wire: request schema, response and stream shapes, errors
    state.py       Settings, State (the engine once loaded), Metrics, APIError
    planning.py    a request -> a Plan: prompt ids, sampling settings, JSON constraints
    choices.py     a plan's n engine jobs -> one JSON body or an SSE stream
    middleware.py  the bearer key, the body limit, the request counter
    routes.py      create_app: the routes and error handlers over one State
    host.py        serve: uvicorn and the engine in one process, signals, the drain
    launch.py      `mixtral serve`'s flags
"""

from __future__ import annotations

from mixtral.server.host import serve
from mixtral.server.planning import json_constraints
from mixtral.server.routes import create_app
from mixtral.server.state import Settings

__all__ = ["Settings", "create_app", "json_constraints", "serve"]
