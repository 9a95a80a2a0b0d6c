"""Requests at the edges of the contract, each one that once killed the engine, answered 500
or hung: seeds beyond 64 bits, a dead engine loop, lone surrogates, denormals, max_tokens 0,
schemas the grammar cannot follow, megabyte error echoes, HEAD, all-or-none rate limiting."""

from __future__ import annotations

import json
import threading

import httpx
import pytest
from serving import HELLO, LiveServer, Slow, post, sse

from mixtral.server.app import json_constraints

pytestmark = pytest.mark.live  # a server on loopback



def raw_post(api, **body):
    """json.dumps escapes lone surrogates as \\udXXX, which httpx's own encoder refuses."""
    body.setdefault("model", "mistral-small")
    body.setdefault("messages", HELLO)
    return api.post("/v1/chat/completions", content=json.dumps(body),
                    headers={"content-type": "application/json"})


@pytest.mark.parametrize("body,text", [
    ({"random_seed": 2**64}, "less than or equal to 18446744073709551615"),
    ({"seed": 2**70, "n": 2}, "less than or equal to 18446744073709551615"),
    ({"random_seed": 2**64 - 1, "n": 2}, "random_seed + n - 1 must be at most 2**64 - 1"),
    ({"seed": 2**64 - 2, "n": 3}, "seed + n - 1 must be at most 2**64 - 1"),
    ({"random_seed": -1}, "greater than or equal to 0"),  # as Mistral's API: seeds are >= 0
])
def test_seeds_beyond_64_bits_are_422_and_the_engine_lives(api, server, body, text):
    # random_seed 2**64 once overflowed the generator inside the engine's loop: the loop
    # died, /health still said ok, and every later request hung
    r = raw_post(api, max_tokens=1, **body)
    assert r.status_code == 422 and text in json.dumps(r.json())
    assert api.get("/health").json()["status"] == "ok"
    assert post(api, max_tokens=1).status_code == 200
    assert server.state.engine.failure is None


def test_largest_seeds_work(api):
    top = post(api, max_tokens=3, temperature=1.0, random_seed=2**64 - 2, n=2).json()
    assert [c["finish_reason"] for c in top["choices"]] == ["length", "length"]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_health_is_503_when_the_engine_is_gone(monkeypatch):
    server = LiveServer()
    try:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            engine = server.state.engine

            def broken() -> None:
                raise RuntimeError("a bug in the loop")

            monkeypatch.setattr(engine, "_step", broken)
            r = c.post("/v1/chat/completions", json={"model": "mistral-small",
                                                     "messages": HELLO, "max_tokens": 2})
            assert r.status_code == 500  # the request in the loop failed, not hung
            engine._thread.join(10)
            health = c.get("/health")
            assert health.status_code == 503 and health.json()["status"] == "error"
            assert "crashed: RuntimeError: a bug in the loop" in health.json()["error"]
            r = c.post("/v1/chat/completions", json={"model": "mistral-small",
                                                     "messages": HELLO, "max_tokens": 2})
            assert r.status_code == 503 and "the engine is not running" in r.json()["message"]
    finally:
        server.stop()


@pytest.mark.parametrize("body,where", [
    ({"messages": [{"role": "user", "content": "\ud800"}]}, "messages.0.content"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "a\udfffb"}]}]},
     "messages.0.content.0.text"),
    ({"model": "\udfff"}, "model"),
    ({"messages": [*HELLO, {"role": "assistant", "content": "\ud800", "prefix": True}]},
     "messages.1.content"),
    ({"stop": ["\ud800"]}, "stop.0"),
])
def test_lone_surrogates_are_400(api, caplog, body, where):
    r = raw_post(api, max_tokens=1, **body)
    assert r.status_code == 400, r.text
    assert r.json()["message"].startswith(f"{where}: not valid Unicode text")
    assert not [x for x in caplog.records if x.levelname == "ERROR"]  # no tracebacks logged


@pytest.mark.parametrize("raw", ['{"model": "m", "messages": [], "\\ud800": 1}',
                                 '{"model": "m", "messages": [{"role": "\\ud800"}]}'])
def test_surrogates_in_keys_and_enums_are_422(api, raw):
    r = api.post("/v1/chat/completions", headers={"content-type": "application/json"},
                 content=raw)
    assert r.status_code == 422 and r.json()["type"] == "invalid_request_error"


def test_denormal_top_p_is_greedy(api):
    greedy = post(api, max_tokens=6, temperature=0).json()["choices"][0]["message"]["content"]
    r = post(api, max_tokens=6, temperature=1.0, top_p=1e-46)  # 0 in fp32: once a 500
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == greedy


def test_max_tokens_zero_is_an_empty_answer(api):
    # the contract allows max_tokens >= 0; 0 once still generated a token
    body = post(api, max_tokens=0).json()
    assert body["choices"][0]["message"]["content"] == ""
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 0
    with api.stream("POST", "/v1/chat/completions",
                    json={"model": "mistral-small", "messages": HELLO, "max_tokens": 0,
                          "stream": True}) as r:
        events = sse(r)
    assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "length"
    assert "".join(e["choices"][0]["delta"]["content"] for e in events[:-1]) == ""


@pytest.fixture(scope="module")
def json_api():
    s = LiveServer(json_constraint=json_constraints())
    with httpx.Client(base_url=s.url, timeout=60) as client:
        yield client
    s.stop()


@pytest.mark.parametrize("schema,text", [
    ({"type": "string", "pattern": "^a{1000000}$"}, "repeats more than 10000 times"),
    ({"type": "object", "patternProperties": {"^(ab){6000}$": {}}}, "repeats more than"),
    ({"$ref": "#"}, "the schema admits no JSON value"),
])
def test_json_schemas_the_grammar_cannot_follow_are_400(json_api, schema, text):
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    for stream in (False, True):
        r = post(json_api, max_tokens=40, response_format=fmt, stream=stream)
        assert r.status_code == 400 and text in r.json()["message"]
        assert r.json()["message"].startswith("response_format: ")


@pytest.mark.parametrize("value", ["\u2581", "a\u2581b", "\ufb01", "\uff21"])
def test_values_sentencepiece_would_normalize_are_spelt_exactly(json_api, value):
    """An enum whose only value the grammar forces: a literal "\u2581" (SentencePiece's space
    mark, which its encoder reads as a space) or a character NFKC folds ("\ufb01" -> "fi") was
    forced as the tokens of the normalized text, which the grammar then rejected: a 500 (found
    by test_fuzz). Forced text is now spelt in pieces whose bytes are the text's."""
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "string", "enum": [value]}}}
    for max_tokens in (3, 40):
        r = post(json_api, max_tokens=max_tokens, response_format=fmt)
        assert r.status_code == 200, r.text[:300]
        if max_tokens == 40:
            assert json.loads(r.json()["choices"][0]["message"]["content"]) == value


def test_reasonable_patterns_still_work(json_api):
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "string", "pattern": "^[a-z]{1,5000}$"}}}
    r = post(json_api, max_tokens=40, response_format=fmt)
    assert r.status_code == 200
    assert isinstance(json.loads(r.json()["choices"][0]["message"]["content"]), str)


def test_error_messages_do_not_echo_megabytes(api):
    r = post(api, model="m" * 2**20)
    assert r.status_code == 404 and len(r.text) < 5000
    left_out = len("Invalid model: ") + 2**20 - 1000  # the first 1000 characters are kept
    assert r.json()["message"].endswith(f"... ({left_out} more characters)")


@pytest.mark.parametrize("path", ["/", "/health", "/metrics", "/v1/models",
                                  "/v1/models/mistral-small"])
def test_head_works_on_get_routes(api, path):
    get, head = api.get(path), api.head(path)
    assert head.status_code == get.status_code == 200 and head.content == b""
    assert head.headers["content-type"] == get.headers["content-type"]


def test_rate_limited_streams_are_429_before_any_200():
    # streams were answered 200 and refused inside the stream: no Retry-After, no [DONE]
    server = LiveServer(load=lambda: Slow(delay=0.01, prefill_delay=0.3), max_queue=2,
                        max_batch=2)
    results: list = []

    def call() -> None:
        body = {"model": "mistral-small", "messages": HELLO, "max_tokens": 2, "n": 2,
                "stream": True}
        with httpx.Client(base_url=server.url, timeout=60) as c, c.stream(
                "POST", "/v1/chat/completions", json=body) as r:
            r.read()
            results.append((r.status_code, r.headers.get("retry-after"), r.text))

    try:
        threads = [threading.Thread(target=call) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        server.stop()
    statuses = [status for status, _, _ in results]
    assert len(results) == 8 and 429 in statuses and 200 in statuses
    for status, retry_after, text in results:
        if status == 429:
            assert retry_after == "2" and json.loads(text)["type"] == "rate_limited"
        else:  # both choices ran to the end: all of the request or none of it
            assert status == 200 and text.endswith("data: [DONE]\n\n")
            # no error event (the fake model's text may well hold the word "error" itself)
            events = [json.loads(line[6:]) for line in text.splitlines()
                      if line.startswith("data: {")]
            assert not any("error" in e or e.get("object") == "error" for e in events), text
            assert text.count('"finish_reason":"length"') == 2
