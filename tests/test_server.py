"""The HTTP API over a live server: shapes, usage, seeds, errors, limits, disconnects, shutdown."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
from serving import HELLO, Failing, LiveServer, Slow, free_port, post, sse, wait_healthy

from mixtral import chat
from mixtral.chat import SAFE_PROMPT
from mixtral.tokenizer import default_tokenizer

pytestmark = pytest.mark.live  # a server on loopback



# --- shapes --------------------------------------------------------------------------------------

def test_completion_shape_and_usage(api):
    r = post(api, max_tokens=6, random_seed=3)
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"id", "object", "created", "model", "choices", "usage"}
    assert len(body["id"]) == 32 and body["object"] == "chat.completion"
    assert body["model"] == "mistral-small" and isinstance(body["created"], int)
    choice = body["choices"][0]
    assert choice["index"] == 0 and choice["finish_reason"] == "length"
    assert choice["message"] == {"role": "assistant", "content": choice["message"]["content"],
                                 "tool_calls": None, "prefix": False}
    assert isinstance(choice["message"]["content"], str)
    cached = body["usage"].pop("prompt_tokens_details")["cached_tokens"]  # test_prefix_cache.py
    assert body["usage"] == {"prompt_tokens": len(chat.encode(HELLO)), "completion_tokens": 6,
                             "total_tokens": len(chat.encode(HELLO)) + 6}
    assert 0 <= cached <= len(chat.encode(HELLO))  # all of it after an earlier HELLO


def test_stream_shape(api):
    with api.stream("POST", "/v1/chat/completions",
                    json={"model": "open-mixtral-8x7b", "messages": HELLO, "max_tokens": 5,
                          "stream": True, "random_seed": 3}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len({c["id"] for c in chunks}) == 1 and len({c["created"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    for c in chunks:
        assert c["object"] == "chat.completion.chunk" and c["model"] == "open-mixtral-8x7b"
        assert set(c["choices"][0]) == {"index", "delta", "finish_reason"}
    assert all(c["choices"][0]["finish_reason"] is None and c["usage"] is None
               for c in chunks[:-1])
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    prompt = len(chat.encode(HELLO))
    cached = chunks[-1]["usage"].pop("prompt_tokens_details")["cached_tokens"]
    assert chunks[-1]["usage"] == {"prompt_tokens": prompt, "completion_tokens": 5,
                                   "total_tokens": prompt + 5} and 0 <= cached <= prompt
    streamed = "".join(c["choices"][0]["delta"]["content"] for c in chunks)
    whole = post(api, max_tokens=5, random_seed=3).json()["choices"][0]["message"]["content"]
    assert streamed == whole  # same seed, same answer, streamed or not


def test_include_usage_chunk_and_n(api):
    with api.stream("POST", "/v1/chat/completions",
                    json={"model": "mistral-small", "messages": HELLO, "max_tokens": 3, "n": 2,
                          "stream": True, "seed": 1,
                          "stream_options": {"include_usage": True}}) as r:
        events = sse(r)
    assert events[-1] == "[DONE]" and events[-2]["choices"] == []
    assert events[-2]["usage"]["completion_tokens"] == 6
    assert {c["choices"][0]["index"] for c in events[:-2]} == {0, 1}
    body = post(api, max_tokens=3, n=2, seed=1).json()
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert body["usage"]["completion_tokens"] == 6


def test_seed_determinism_and_temperature(api):
    def text(**kw):
        return post(api, max_tokens=12, temperature=1.0, **kw).json()["choices"][0]["message"][
            "content"]
    assert text(random_seed=11) == text(random_seed=11) == text(seed=11)
    assert text(random_seed=11) != text(random_seed=12)
    greedy = [post(api, max_tokens=8, temperature=0).json()["choices"][0]["message"]["content"]
              for _ in range(2)]
    assert greedy[0] == greedy[1]


def test_stop_strings_never_leak(api):
    full = post(api, max_tokens=20, temperature=0).json()["choices"][0]["message"]["content"]
    stop = full[5:8]
    body = post(api, max_tokens=20, temperature=0, stop=[stop]).json()
    assert body["choices"][0]["message"]["content"] == full[:full.index(stop)]
    assert body["choices"][0]["finish_reason"] == "stop"
    with api.stream("POST", "/v1/chat/completions",
                    json={"model": "mistral-small", "messages": HELLO, "max_tokens": 20,
                          "temperature": 0, "stop": stop, "stream": True}) as r:
        chunks = sse(r)[:-1]
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks) == full[:full.index(stop)]


def test_safe_prompt_reaches_the_model(api, server, monkeypatch):
    seen = []
    engine = server.state.engine
    job = engine.job
    monkeypatch.setattr(engine, "job", lambda prompt, *a, **k: seen.append(prompt) or
                        job(prompt, *a, **k))
    assert post(api, max_tokens=1, safe_prompt=True).status_code == 200
    assert seen[-1] == chat.encode(HELLO, safe_prompt=True)
    assert SAFE_PROMPT in default_tokenizer().decode(seen[-1])
    assert post(api, max_tokens=1, safe_mode=True).status_code == 200  # the Dec-2023 name
    assert seen[-1] == chat.encode(HELLO, safe_prompt=True)
    assert post(api, max_tokens=1).status_code == 200
    assert SAFE_PROMPT not in default_tokenizer().decode(seen[-1])


def test_assistant_prefix_is_continued(api):
    messages = [*HELLO, {"role": "assistant", "content": "Sure, here", "prefix": True}]
    content = post(api, messages=messages, max_tokens=4, temperature=0).json()[
        "choices"][0]["message"]["content"]
    assert content.startswith("Sure, here") and len(content) > len("Sure, here")


def test_models(api):
    listed = api.get("/v1/models", headers={"content-type": "application/json"},
                     params={}).json()  # mistralai 0.4.2 even sends a body on this GET
    ids = [m["id"] for m in listed["data"]]
    assert listed["object"] == "list"
    assert ids == ["mixtral-tiny-random", "open-mixtral-8x7b", "mistral-small",
                   "mistral-small-2312"]
    card = api.get("/v1/models/mistral-small").json()
    for key in ("id", "object", "created", "owned_by", "capabilities", "type"):
        assert key in card
    assert card["type"] == "base" and card["capabilities"]["completion_chat"] is True
    assert card["max_context_length"] == 2048
    r = api.get("/v1/models/gpt-4")
    assert r.status_code == 404 and r.json()["type"] == "invalid_model"


# --- errors --------------------------------------------------------------------------------------

@pytest.mark.parametrize("body,status,kind,text", [
    ({"messages": HELLO, "bogus": 1}, 422, "invalid_request_error", "extra_forbidden"),
    ({"messages": HELLO, "temperature": "hot"}, 422, "invalid_request_error", "temperature"),
    ({"messages": HELLO, "temperature": 3}, 422, "invalid_request_error", "less_than_equal"),
    ({"messages": "hi"}, 422, "invalid_request_error", "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, 422, "invalid_request_error", "role"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
     400, "invalid_request_message_order", "Expected last role User"),
    ({"messages": []}, 400, "invalid_request_message_order", "at least one message"),
    ({"messages": [], "safe_prompt": True}, 400, "invalid_request_message_order",
     "at least one message"),  # found by the fuzzer: once a 500
    ({"messages": HELLO, "max_tokens": 5000}, 400, "invalid_request_error",
     "prompt of 9 tokens + max_tokens 5000 = 5009 exceeds the model's context of 2048 tokens"),
    ({"messages": HELLO, "tools": [{"type": "function", "function": {"name": "f",
                                                                     "parameters": {}}}]},
     400, "invalid_request_error", "tools are not supported"),
    ({"model": "gpt-4", "messages": HELLO}, 404, "invalid_model", "Invalid model: gpt-4"),
])
def test_error_bodies(api, body, status, kind, text):
    r = post(api, **body)
    assert r.status_code == status
    err = r.json()
    assert err["object"] == "error" and err["type"] == kind
    assert text in json.dumps(err)
    assert err["error"]["type"] == kind and isinstance(err["error"]["message"], str)
    if status == 422:
        assert err["detail"][0]["loc"][0] == "body"


@pytest.mark.parametrize("raw", [b"{not json", b"\xff\xfe\x00garbage", b"[1, 2]", b"",
                                 b'{"model": "mistral-small", "messages": [{"role": "user", '
                                 b'"content": "\xc3\x28"}]}'])
def test_malformed_bodies_are_4xx(api, raw):
    r = api.post("/v1/chat/completions", content=raw,
                 headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500, r.text
    assert "Traceback" not in r.text


def test_huge_body_is_413(api):
    r = post(api, messages=[{"role": "user", "content": "x" * (9 * 2**20)}])
    assert r.status_code == 413 and "larger than" in r.json()["message"]


def test_api_key():
    server = LiveServer(api_key="s3cret")
    try:
        with httpx.Client(base_url=server.url) as c:
            assert c.get("/v1/models").status_code == 401
            bad = c.get("/v1/models", headers={"Authorization": "Bearer nope"})
            assert bad.status_code == 401 and bad.json()["message"] == "Unauthorized"
            good = c.get("/v1/models", headers={"Authorization": "bearer s3cret"})
            assert good.status_code == 200
            assert c.get("/health").status_code == 200  # open, as are /metrics and the page
            assert c.get("/metrics").status_code == 200 and c.get("/").status_code == 200
    finally:
        server.stop()


def test_503_while_loading():
    release = threading.Event()

    def load():
        release.wait(30)
        from mixtral.default_model import random_tiny
        return random_tiny()

    server = LiveServer(load=load, wait_ready=False)
    try:
        with httpx.Client(base_url=server.url) as c:
            assert c.get("/health").json() == {"status": "loading"}
            r = c.post("/v1/chat/completions", json={"model": "mistral-small", "messages": HELLO})
            assert r.status_code == 503 and r.headers["retry-after"] == "5"
            release.set()
            deadline = time.monotonic() + 20
            while c.get("/health").status_code != 200:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            assert c.post("/v1/chat/completions", json={"model": "mistral-small",
                                                        "messages": HELLO,
                                                        "max_tokens": 1}).status_code == 200
    finally:
        release.set()
        server.stop()


# --- concurrency and faults ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def slow():
    s = LiveServer(load=lambda: Slow(delay=0.02, prefill_delay=0.6), max_queue=1,
                   keepalive_s=0.2)
    yield s
    s.stop()


def wait_idle(state, timeout: float = 5.0) -> float:
    start = time.monotonic()
    while state.engine.busy or state.engine.queue_depth:
        assert time.monotonic() - start < timeout, "the engine kept working"
        time.sleep(0.01)
    return time.monotonic() - start


def test_queue_full_is_429(slow):
    body = {"model": "mistral-small", "messages": HELLO, "max_tokens": 100}
    results = []

    def call():
        with httpx.Client(base_url=slow.url, timeout=30) as c:
            results.append(c.post("/v1/chat/completions", json=body))

    threads = [threading.Thread(target=call) for _ in range(2)]  # one runs, one waits
    for t in threads:
        t.start()
        time.sleep(0.15)
    with httpx.Client(base_url=slow.url) as c:
        r = c.post("/v1/chat/completions", json=body)
    assert r.status_code == 429 and r.headers["retry-after"] == "2"
    assert r.json()["type"] == "rate_limited" and r.json()["code"] == "1300"
    for t in threads:
        t.join()
    assert [x.status_code for x in results] == [200, 200]  # served in order, none lost


def test_keepalive_during_prefill(slow):
    with httpx.Client(base_url=slow.url, timeout=30) as c, c.stream(
            "POST", "/v1/chat/completions",
            json={"model": "mistral-small", "max_tokens": 2, "stream": True,
                  # a prompt no earlier test sent: the prefix cache holds none of it
                  "messages": [{"role": "user", "content": "Keep me alive, please."}]}) as r:
        lines = list(r.iter_lines())
    assert ": ping" in lines  # sent while the 0.6 s prefill ran
    assert [x for x in lines if x][-1] == "data: [DONE]"


def test_streaming_disconnect_frees_the_slot(slow):
    wait_idle(slow.state)
    with httpx.Client(base_url=slow.url, timeout=30) as c, c.stream(
            "POST", "/v1/chat/completions",
            json={"model": "mistral-small", "messages": HELLO, "max_tokens": 1500,
                  "stream": True}) as r:
        for line in r.iter_lines():
            if '"content":"' in line and '"role"' not in line:
                break  # got a real token: now hang up mid-generation
    # 1500 tokens would take 30 s; cancelled, the engine is idle at once
    assert wait_idle(slow.state, timeout=3) < 3


def test_non_streaming_disconnect_frees_the_slot(slow):
    wait_idle(slow.state)
    body = json.dumps({"model": "mistral-small", "messages": HELLO, "max_tokens": 1500}).encode()
    with socket.create_connection(("127.0.0.1", slow.port)) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                  b"application/json\r\nContent-Length: " + str(len(body)).encode() +
                  b"\r\n\r\n" + body)
        deadline = time.monotonic() + 5
        while not slow.state.engine.busy:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    assert wait_idle(slow.state, timeout=3) < 3


def test_failure_after_streaming_began_is_an_error_event():
    server = LiveServer(load=lambda: Failing(fail_at=3))
    try:
        body = {"model": "mistral-small", "messages": HELLO, "max_tokens": 50, "stream": True}
        with httpx.Client(base_url=server.url, timeout=30) as c:
            with c.stream("POST", "/v1/chat/completions", json=body) as r:
                assert r.status_code == 200
                events = sse(r)
            assert events[0]["choices"][0]["delta"]["role"] == "assistant"
            assert events[-2] == {"error": {"message": "internal error during generation",
                                            "type": "internal_error", "param": None,
                                            "code": "500"}}
            assert events[-1] == "[DONE]"  # every stream ends so, an error event or not
            r = c.post("/v1/chat/completions", json={**body, "stream": False})
            assert r.status_code == 500 and r.json()["type"] == "internal_error"
            assert "simulated" not in r.text and "Traceback" not in r.text
            assert c.get("/health").status_code == 200  # the engine survived the fault
        import openai
        client = openai.OpenAI(api_key="k", base_url=server.url + "/v1", max_retries=0)
        with pytest.raises(openai.APIError, match="internal error during generation"):
            for _ in client.chat.completions.create(model="mistral-small", messages=HELLO,
                                                    max_tokens=50, stream=True):
                pass
    finally:
        server.stop()


def test_metrics(api):
    post(api, max_tokens=2)
    text = api.get("/metrics").text
    for name in ("mixtral_requests_total", "mixtral_prompt_tokens_total",
                 "mixtral_completion_tokens_total", "mixtral_queue_depth",
                 "mixtral_time_to_first_token_seconds_bucket",
                 "mixtral_decode_tokens_per_second_bucket", "mixtral_requests_running"):
        assert name in text
    assert 'mixtral_requests_total{route="/v1/chat/completions",status="200"}' in text


def test_sigterm_drains_and_exits_zero(tmp_path):
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "mixtral", "serve", "--port", str(port),
                             "--grace", "30"], stderr=subprocess.PIPE, text=True, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, proc, 60, poll=0.1)
        # Stream so that the signal provably arrives mid-request: after the first token and
        # with min_tokens=max_tokens, at least 199 tokens are still to come.
        body = {"model": "mistral-small", "messages": HELLO, "max_tokens": 200,
                "min_tokens": 200, "stream": True}
        events = []
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                events.append(line[6:])
                if len(events) == 2:  # the role chunk, then the first token
                    proc.send_signal(signal.SIGTERM)
        assert events[-1] == "[DONE]"  # the request in flight was finished, not cut
        finishes = [json.loads(e)["choices"][0]["finish_reason"] for e in events[:-1]]
        assert finishes[-1] == "length"
        assert proc.wait(timeout=40) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
