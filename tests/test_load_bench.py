"""benchmarks/load.py: its stream checker catches each kind of broken stream (so its "0 broken"
means something), bad flags fail in one line, and a short real run against `mixtral serve`
gives the JSON keys the benchmark promises with every answer well formed (no figures checked).
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"
# by its path, not through sys.path: benchmarks/ holds scripts whose names could shadow others'
_spec = importlib.util.spec_from_file_location("load_clients", BENCHMARKS / "load_clients.py")
assert _spec is not None and _spec.loader is not None
load_clients = sys.modules["load_clients"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(load_clients)

KEYS = {"model", "quant", "clients", "seconds", "stream_share", "max_tokens", "neighbour",
        "neighbour_kind", "server_env", "wall_s", "requests", "status", "latency_s", "ttft_s",
        "completion_tokens", "tok_s", "broken_streams", "broken_reasons", "bad_responses",
        "rss_mib", "replays", "replays_identical", "server_alive", "threads_policy",
        "server_cores"}


def chunk(content: str, usage: dict | None = None) -> bytes:
    body = {"object": "chat.completion.chunk", "usage": usage,
            "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}]}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


GOOD = chunk("") + b": ping\n\n" + chunk("Hel") + chunk("lo", {"completion_tokens": 2}) + \
    b"data: [DONE]\n\n"
BROKEN = {  # kind: (the stream, what the checker must say)
    "no [DONE]": (chunk("Hel") + chunk("lo"), "ended without [DONE]"),
    "malformed JSON": (chunk("Hel") + b'data: {"choices": [\n\n' + b"data: [DONE]\n\n",
                       "malformed JSON"),
    "invalid UTF-8": (chunk("Hel") + b'data: {"choices": [{"delta": {"content": "\xff"}}]}\n\n'
                      + b"data: [DONE]\n\n", "not valid UTF-8"),
    "lone surrogate": (chunk("Hel") + b'data: {"choices": [{"delta": {"content": "\\ud800"}}]}'
                       b"\n\n" + b"data: [DONE]\n\n", "not valid UTF-8"),
    "error event": (chunk("Hel") + b'data: {"error": {"message": "engine died"}}\n\n',
                    "error event: engine died"),
    "data after [DONE]": (GOOD + chunk("again"), "data after [DONE]"),
    "cut mid-event": (chunk("Hel") + b'data: {"choi', "ended without [DONE]"),
}


def outcome(raw: bytes, stream: bool = True) -> load_clients.Outcome:
    kind = "text/event-stream" if stream else "application/json"
    transport = httpx.MockTransport(lambda request: httpx.Response(
        200, content=raw, headers={"content-type": kind}))

    async def go() -> load_clients.Outcome:
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            return await load_clients.request(http, load_clients.body("hi", 32, stream))
    return asyncio.run(go())


def test_a_good_stream_is_read_whole():
    out = outcome(GOOD)
    assert (out.status, out.problem, out.text, out.tokens) == (200, None, "Hello", 2)
    assert out.ttft is not None and out.ttft <= out.latency


@pytest.mark.parametrize("kind", sorted(BROKEN))
def test_a_broken_stream_is_caught(kind):
    raw, problem = BROKEN[kind]
    assert outcome(raw).problem == problem


def test_a_json_answer_is_checked_too():
    good = {"choices": [{"message": {"content": "Hello"}}], "usage": {"completion_tokens": 2}}
    out = outcome(json.dumps(good).encode(), stream=False)
    assert (out.problem, out.text, out.tokens) == (None, "Hello", 2)
    assert outcome(b'{"choices": []}', stream=False).problem == "bad body: IndexError"
    assert outcome(b'{"choices": [', stream=False).problem == "bad body: JSONDecodeError"


@pytest.mark.parametrize("flags,message", [
    (["--model", "/nonexistent/model"], "--model /nonexistent/model: no such file or folder"),
    (["--server-env", "OMP_WAIT_POLICY"], "expected KEY=VALUE"),
    (["--stream-share", "1.5"], "--stream-share must be between 0 and 1"),
    (["--threads-policy", "lots"], "argument --threads-policy: invalid choice: 'lots'"),
])
def test_bad_flags_fail_in_one_line(flags, message):
    run = subprocess.run([sys.executable, str(BENCHMARKS / "load.py"), *flags],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert message in run.stderr.strip().splitlines()[-1]
    assert "Traceback" not in run.stderr


@pytest.mark.slow
@pytest.mark.live
def test_a_short_load_on_the_default_model():
    run = subprocess.run([sys.executable, str(BENCHMARKS / "load.py"), "--seconds", "5",
                          "--clients", "2", "--replays", "2", "--server-env",
                          "GOMP_SPINCOUNT=10000", "--threads-policy", "adaptive"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout)
    assert set(result) == KEYS
    assert result["status"].get("200", 0) >= 1
    assert (result["broken_streams"], result["bad_responses"]) == (0, 0)
    assert result["replays_identical"] and len(result["replays"]) == 2
    assert result["server_env"] == {"GOMP_SPINCOUNT": "10000"}
    assert result["threads_policy"] == "adaptive" and result["server_cores"] > 0
    assert result["rss_mib"][0]["requests"] == 0 and result["rss_mib"][0]["rss_mib"] > 0
    assert result["server_alive"]
