"""The server under hostile traffic (issue 18): planning off the event loop, connection limits
and read deadlines, Host/Origin and key checks, request framing, and the shutdown's cut."""

from __future__ import annotations

import json
import logging
import select
import socket
import threading
import time

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from serving import LiveServer, Slow

from mixtral import chat
from mixtral.server.connections import RepeatFilter
from mixtral.server.launch import COMMANDS
from mixtral.server.planning import at_least_tokens, longest_piece
from mixtral.server.state import Settings
from mixtral.tokenizer import default_tokenizer

pytestmark = pytest.mark.live  # a server on loopback

HELLO = [{"role": "user", "content": "Hello"}]
KEY = "k3y"


@pytest.fixture(scope="module")
def plain():
    s = LiveServer()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def guarded():
    s = LiveServer(max_connections=20, header_timeout_s=1.0, body_timeout_s=1.0,
                   allow_hosts=("api.example.com",), api_key=KEY)
    yield s
    s.stop()


def client(server, **headers) -> httpx.Client:
    return httpx.Client(base_url=server.url, timeout=60,
                        headers={"Authorization": f"Bearer {KEY}", **headers})


def chat_body(**extra) -> dict:
    return {"model": "mistral-small", "messages": HELLO, "max_tokens": 1, **extra}


def closed_by_server(sock: socket.socket) -> bool:
    try:
        return sock.recv(1 << 16) == b""
    except (ConnectionResetError, BlockingIOError):
        return True


def raw(server, request: bytes) -> bytes:
    """Send `request` as is; everything the server answers until it closes the connection."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.sendall(request)
        out = b""
        while chunk := s.recv(1 << 16):
            out += chunk
        return out


# --- 5: planning never blocks the event loop ----------------------------------------------------

def test_health_answers_while_a_request_is_being_planned():
    entered, release, order = threading.Event(), threading.Event(), []

    def slow_schema(schema):  # a schema that takes long to compile, as huge ones did
        entered.set()
        release.wait(20)
        order.append("planned")
        return None

    server = LiveServer(json_constraint=slow_schema)
    answers = []
    big = threading.Thread(target=lambda: answers.append(httpx.post(
        server.url + "/v1/chat/completions", timeout=60,
        json=chat_body(response_format={"type": "json_object"}))))
    try:
        big.start()
        assert entered.wait(20)
        assert httpx.get(server.url + "/health", timeout=60).json()["status"] == "ok"
        order.append("health")
    finally:
        release.set()
        big.join()
        server.stop()
    assert order == ["health", "planned"]  # /health did not wait for the planning
    assert answers[0].status_code == 200


def test_a_prompt_too_long_by_its_length_alone_is_never_tokenized(plain, monkeypatch):
    def tokenize(*args, **kwargs):
        raise AssertionError("tokenized a prompt that could not fit")

    monkeypatch.setattr(chat, "encode", tokenize)
    text = "word " * (7_900_000 // 5)  # 7.9 MB: once ~11 s of tokenizing, every request frozen
    with client(plain) as c:
        r = c.post("/v1/chat/completions", json=chat_body(
            messages=[{"role": "user", "content": text}], max_tokens=None))
    assert r.status_code == 400, r.text
    message = r.json()["message"]
    assert "the messages hold 7899999 characters: at least" in message
    assert "more than fit the model's context of 2048 tokens" in message


CONTENT = st.one_of(
    st.text(st.characters(exclude_categories=("Cs",)), max_size=60),
    st.text(" \t\n▁a.é", max_size=200),  # runs of spaces and the longest pieces' stuff
    st.lists(st.sampled_from(["................", "▁representations", "addEventListener",
                              " " * 16, "🦜", "\u0301"]), max_size=20).map("".join))


@settings(max_examples=60, deadline=None)
@given(system=st.none() | CONTENT, turns=st.lists(CONTENT, min_size=1, max_size=5),
       prefix=st.booleans())
def test_the_length_bound_never_exceeds_the_real_token_count(system, turns, prefix):
    messages = [{"role": ("user", "assistant")[i % 2], "content": t}
                for i, t in enumerate(turns)]
    if messages[-1]["role"] == "assistant":
        messages[-1]["prefix"] = prefix
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    try:
        ids = chat.encode(messages)
    except chat.ChatError:
        return  # e.g. an empty message: refused before any bound matters
    per_token = longest_piece(default_tokenizer())
    assert per_token == 16  # the v1 vocabulary's longest pieces; the normalizer is identity
    assert at_least_tokens([m["content"] for m in messages], per_token) <= len(ids)


# --- 7: connections are bounded, and so is the time to send a request ---------------------------

def test_idle_connections_are_closed_and_health_keeps_answering(guarded):
    idle = [socket.create_connection(("127.0.0.1", guarded.port)) for _ in range(300)]
    try:
        for s in idle:
            s.setblocking(False)
        open_ = set(idle)
        deadline = time.monotonic() + 30
        while len(open_) >= 20:  # the longest idle make room for the new ones at once
            assert time.monotonic() < deadline, f"{len(open_)} idle connections kept"
            readable, _, _ = select.select(list(open_), [], [], 1)
            open_ -= {s for s in readable if closed_by_server(s)}
        with client(guarded) as c:
            assert c.get("/health").status_code == 200
        while open_:  # and the rest when their head does not come in time
            assert time.monotonic() < deadline, f"{len(open_)} idle connections kept"
            readable, _, _ = select.select(list(open_), [], [], 1)
            open_ -= {s for s in readable if closed_by_server(s)}
    finally:
        for s in idle:
            s.close()
    with client(guarded) as c:
        assert c.get("/health").status_code == 200


def test_a_head_sent_byte_by_byte_does_not_hold_the_connection(guarded):
    with socket.create_connection(("127.0.0.1", guarded.port)) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        deadline = time.monotonic() + 30
        while True:  # a header line every 0.2 s: data keeps coming, the head never ends
            assert time.monotonic() < deadline, "the server waited for the head forever"
            try:
                s.sendall(b"X-Slow: 1\r\n")
            except (BrokenPipeError, ConnectionResetError):
                break
            if select.select([s], [], [], 0.2)[0] and closed_by_server(s):
                break


def test_a_body_that_does_not_arrive_is_408(guarded):
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer "
            + KEY.encode() + b"\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n")
    answer = raw(guarded, head + b'{"model":')  # and then nothing
    assert answer.startswith(b"HTTP/1.1 408") and b"did not arrive within 1 s" in answer


def test_repeated_log_lines_are_counted_not_repeated():
    now = [0.0]
    seen: list[str] = []
    log = logging.getLogger("test.repeats")
    log.propagate = False
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    log.addHandler(handler)
    log.addFilter(RepeatFilter(interval=10, clock=lambda: now[0]))
    for _ in range(1000):
        log.warning("Exceeded concurrency limit.")
    log.warning("another line")
    now[0] = 11
    log.warning("Exceeded concurrency limit.")
    assert seen == ["Exceeded concurrency limit.", "another line",
                    "Exceeded concurrency limit. (999 more like it left out)"]


# --- 10: who may reach the server ---------------------------------------------------------------

@pytest.mark.parametrize("host,status", [
    ("127.0.0.1", 200), ("127.0.0.1:8000", 200), ("localhost:8000", 200), ("[::1]:8000", 200),
    ("app.localhost", 200), ("api.example.com", 200), ("API.Example.COM.:443", 200),
    ("attacker.example", 403), ("127.0.0.1.attacker.example", 403), ("10.0.0.7", 403),
    ("localhost.attacker.example", 403), ("127.0.0.1:x", 403),
])
def test_the_host_must_be_allowed(guarded, host, status):
    with client(guarded, Host=host) as c:
        r = c.get("/v1/models")
    assert r.status_code == status
    if status == 403:
        assert r.json()["message"].startswith(f"Host {host!r} is not allowed")
        assert "--allow-host" in r.json()["message"]


@pytest.mark.parametrize("origin,status", [
    ("http://127.0.0.1:8000", 200), ("http://localhost:3000", 200),
    ("https://api.example.com", 200), ("https://attacker.example", 403), ("null", 403),
])
def test_a_cross_site_page_may_not_use_the_api(guarded, origin, status):
    with client(guarded, Origin=origin) as c:
        r = c.post("/v1/chat/completions", json=chat_body())
    assert r.status_code == status
    if status == 403:
        assert r.json()["message"].startswith(f"Origin {origin!r} is not allowed")


def test_any_host_with_a_star():
    server = LiveServer(allow_hosts=("*",))
    try:
        with httpx.Client(base_url=server.url, headers={"Host": "x.example",
                                                        "Origin": "null"}) as c:
            assert c.get("/v1/models").status_code == 200
    finally:
        server.stop()


@pytest.mark.parametrize("key,why", [("", "the API key is empty"),
                                     ("clé", "printable ASCII"), ("a key", "printable ASCII")])
def test_keys_that_cannot_work_are_refused_at_start(key, why, capsys):
    from mixtral.command import standalone

    assert standalone("mixtral serve", COMMANDS, ["--api-key", key]) == 2
    assert why in capsys.readouterr().err
    with pytest.raises(ValueError, match=why):
        Settings(name="m", api_key=key)


def test_the_api_description_needs_the_key_and_one_authorization(guarded):
    with httpx.Client(base_url=guarded.url) as c:
        assert c.get("/openapi.json").status_code == 401
        assert c.get("/docs").status_code == 401
        assert c.get("/health").status_code == 200 and c.get("/").status_code == 200
        r = c.get("/openapi.json", headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code == 200 and "/v1/chat/completions" in r.json()["paths"]
        twice = c.get("/v1/models", headers=[("Authorization", f"Bearer {KEY}"),
                                             ("Authorization", "Bearer other")])
        assert twice.status_code == 400 and "2 Authorization headers" in twice.json()["message"]


# --- 11: framing, and the end of a shutdown -----------------------------------------------------

def test_content_length_with_transfer_encoding_is_400_and_closed(guarded):
    body = json.dumps(chat_body()).encode()
    answer = raw(guarded, b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                 b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Type: application/json"
                 b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\n" + b"%x\r\n" % len(body) + body +
                 b"\r\n0\r\n\r\n")  # raw() returns once the server has closed it
    assert answer.startswith(b"HTTP/1.1 400") and b"not both" in answer
    assert answer.count(b"HTTP/1.1") == 1


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_answers_still_running_at_the_grace_deadline_are_cut_cleanly():
    server = LiveServer(load=lambda: Slow(delay=0.05), grace=0.5)
    records = Records()
    for name in ("uvicorn.error", "mixtral.server", "mixtral.engine"):
        logging.getLogger(name).addHandler(records)
    body = chat_body(max_tokens=1500, min_tokens=1500)  # ~75 s: far beyond the grace
    results: dict = {}
    started = threading.Event()

    def stream() -> None:
        with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=60,
                          json={**body, "stream": True}) as r:
            lines = []
            for line in r.iter_lines():
                lines.append(line)
                if '"content":"' in line and '"role"' not in line:
                    started.set()
            results["stream"] = [x for x in lines if x.startswith("data: ")]

    def whole() -> None:
        results["whole"] = httpx.post(server.url + "/v1/chat/completions", json=body,
                                      timeout=60)

    threads = [threading.Thread(target=stream), threading.Thread(target=whole)]
    try:
        for t in threads:
            t.start()
        assert started.wait(30)
        engine, deadline = server.state.engine, time.monotonic() + 30
        while engine.running + engine.queue_depth < 2:  # both requests are in
            assert time.monotonic() < deadline
            time.sleep(0.02)
        server.stop()  # uvicorn's shutdown, as on SIGTERM
        for t in threads:
            t.join(30)
    finally:
        for name in ("uvicorn.error", "mixtral.server", "mixtral.engine"):
            logging.getLogger(name).removeHandler(records)
    events = results["stream"]
    assert events[-1] == "data: [DONE]"
    error = json.loads(events[-2][len("data: "):])["error"]
    assert error["type"] == "service_unavailable" and "shutting down" in error["message"]
    assert results["whole"].status_code == 503
    assert "shutting down" in results["whole"].json()["message"]
    tracebacks = [r for r in records.records if r.exc_info or "Cancel" in r.getMessage()]
    assert not tracebacks, [r.getMessage() for r in tracebacks]
