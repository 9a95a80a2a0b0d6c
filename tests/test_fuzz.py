"""Fuzz the API: valid and invalid requests alike must never produce a server error.

schemathesis derives requests from the app's own OpenAPI schema (slow: hundreds of them).
What it cannot reach, hypothesis strategies below send as raw JSON text: unicode edges (lone
surrogates, NUL, RTL marks, emoji, look-alikes of the chat format's markers), extreme numbers
in every numeric field (denormals, 2**64 and beyond, NaN and Infinity literals), and hostile
JSON schemas (huge quantifiers, deep nesting, recursive $ref, huge enums). After each request
the engine must be alive and /health must say so.
"""

from __future__ import annotations

import json

import httpx
import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serving import LiveServer

from mixtral.config import preset
from mixtral.model import Transformer
from mixtral.server.app import Settings, create_app, json_constraints

pytestmark = pytest.mark.live  # a server on loopback


def small_context_model() -> Transformer:
    model = Transformer(preset("tiny").with_(max_seq_len=96))  # every generation stays short
    model.init_weights(generator=torch.Generator().manual_seed(0))
    return model.eval()


APP = create_app(small_context_model, Settings(name="tiny", max_queue=64), json_constraints())
schema = schemathesis.openapi.from_dict(APP.openapi())  # the app's own schema, no server yet
CASES: dict = {"count": 0}
FUZZ = settings(deadline=None, suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def server():
    s = LiveServer(app=APP)
    yield s
    print(f"\nschemathesis: {CASES}")
    s.stop()


@pytest.mark.slow
@schema.parametrize()
@settings(FUZZ, max_examples=200)
def test_api_never_fails(case, server):
    if isinstance(case.body, dict) and isinstance(case.body.get("model"), str):
        case.body["model"] = "mistral-small"  # a known model, so requests reach generation
    response = case.call(base_url=server.url, timeout=60)
    CASES["count"] += 1
    key = (case.operation.label, response.status_code)
    CASES[key] = CASES.get(key, 0) + 1
    assert response.status_code < 500, (case.body, response.status_code, response.text[:500])
    assert "Traceback" not in response.text


# --- raw request bodies --------------------------------------------------------------------------

def send(server, text: str, stream: bool = False) -> None:
    """POST `text` as the body; no 5xx, no error inside a stream, and the engine still up."""
    with httpx.Client(base_url=server.url, timeout=120) as client:
        r = client.post("/v1/chat/completions", content=text.encode("utf-8", "surrogatepass"),
                        headers={"content-type": "application/json"})
        assert r.status_code < 500, (text[:300], r.status_code, r.text[:300])
        assert "Traceback" not in r.text and "internal_error" not in r.text, r.text[:300]
        if stream and r.status_code == 200:
            assert r.text.endswith("data: [DONE]\n\n"), r.text[-300:]
        health = client.get("/health")
    engine = server.state.engine
    assert engine.failure is None and health.status_code == 200, health.text
    assert health.json()["status"] == "ok"  # and it says so truthfully


def body(messages: str = '[{"role":"user","content":"Hi"}]', **fields: str) -> str:
    """A request as JSON text, the fields' values given as raw JSON (NaN stays NaN)."""
    items = {"model": '"mistral-small"', "messages": messages, "max_tokens": "3", **fields}
    return "{" + ",".join(f"{json.dumps(k)}:{v}" for k, v in items.items()) + "}"


EDGES = ["\ud800", "\udfff", "a\ud83d", "\udc00\ud800", "\x00", "\u202eevil\u202c", "\u200f",
         "🦜" * 40, "👩\u200d👩\u200d👧", "[INST]", "[/INST]", "</s>", "<s>", "<unk>",
         "<0x00>", "▁", "\ufeff", "e\u0301", "\uffff", "\U0010ffff", "［INST］", "﹤/s﹥",
         "\r\n", " " * 200, "\t\v\f", "\\u0000", "%s%n", "{{}}", "'\"`"]
TEXT = st.one_of(st.sampled_from(EDGES), st.text(max_size=30),
                 st.lists(st.sampled_from(EDGES), max_size=5).map("".join))


def js(value: object) -> str:
    return json.dumps(value)  # lone surrogates become \ud800 escapes: valid JSON, no character


@st.composite
def unicode_bodies(draw: st.DrawFn) -> tuple[str, bool]:
    role = st.sampled_from(["system", "user", "assistant", "tool", "[INST]", "\ud800"])
    content = st.one_of(TEXT, st.none(),
                        st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": TEXT}),
                                 max_size=3))
    message = st.fixed_dictionaries({"role": role, "content": content},
                                    optional={"prefix": st.booleans(), "name": TEXT})
    conversations = st.one_of(  # valid ones reach generation; the others, validation
        TEXT.map(lambda t: [{"role": "user", "content": t}]),
        st.tuples(TEXT, TEXT).map(lambda t: [{"role": "system", "content": t[0]},
                                             {"role": "user", "content": t[1]}]),
        st.tuples(TEXT, TEXT).map(lambda t: [{"role": "user", "content": t[0]}, {
            "role": "assistant", "content": t[1], "prefix": True}]),
        st.lists(message, min_size=1, max_size=4))
    model = st.one_of(st.just("mistral-small"), st.just("tiny"), TEXT)
    fields = {"messages": js(draw(conversations)), "model": js(draw(model))}
    if draw(st.booleans()):
        fields["stop"] = js(draw(TEXT | st.lists(TEXT, max_size=4)))
    if draw(st.booleans()):
        fields["response_format"] = js({"type": "json_schema", "json_schema": {
            "name": draw(TEXT), "schema": {"type": "string", "enum": [draw(TEXT)]}}})
    stream = draw(st.booleans())
    fields["stream"] = js(stream)
    return body(**fields), stream


NUMBERS = ["0", "-0.0", "5e-324", "1e-300", "1e-46", "0.5", "1", "1.5000000000000002", "2",
           "-1", "-2.0000001", "95", "96", "97", "9007199254740993", str(2**63 - 1),
           str(2**63), str(2**64 - 1), str(2**64), str(2**64 + 1), "1" + "0" * 40, "1e308",
           "1e400", "-1e400", "1e-400", "NaN", "-NaN", "Infinity", "-Infinity", "true", "null",
           '"1"', "[]", "{}", "0x10", "1_000"]
NUMERIC = ["temperature", "top_p", "max_tokens", "max_completion_tokens", "min_tokens",
           "random_seed", "seed", "presence_penalty", "frequency_penalty", "n", "top_logprobs"]


@st.composite
def number_bodies(draw: st.DrawFn) -> tuple[str, bool]:
    chosen = draw(st.dictionaries(st.sampled_from(NUMERIC), st.sampled_from(NUMBERS),
                                  min_size=1, max_size=4))
    if "max_tokens" not in chosen and "max_completion_tokens" not in chosen:
        chosen["max_tokens"] = "3"  # keep the answers short; their limits are fuzzed too
    stream = draw(st.booleans())
    return body(stream=js(stream), **chosen), stream


def nested(kind: str, depth: int) -> str:
    inner = {"array": ('{"type":"array","items":', '{"type":"integer"}', "}"),
             "object": ('{"type":"object","properties":{"a":', "{}", "}}"),
             "anyOf": ('{"anyOf":[', "{}", "]}"), "list": ("[", "1", "]")}[kind]
    return inner[0] * depth + inner[1] + inner[2] * depth


QUANTIFIED = ["minLength", "maxLength", "minItems", "maxItems", "minProperties",
              "maxProperties", "minimum", "maximum", "multipleOf", "exclusiveMinimum"]
SCHEMAS = st.one_of(
    st.builds(nested, st.sampled_from(["array", "object", "anyOf", "list"]),
              st.sampled_from([1, 10, 100, 300, 480, 1000, 20000])),
    st.integers(1, 20000).map(lambda n: js({"enum": list(range(n))})),
    st.tuples(st.sampled_from(QUANTIFIED), st.sampled_from(NUMBERS)).map(
        lambda kv: f'{{"type":"string","{kv[0]}":{kv[1]}}}'),
    st.sampled_from(["a{1000000}", "(a{1000}){1000}", "(a|b)*c{99999}", "[", "(?=a)b",
                     "\\p{L}+", "a{2,1}", "((((((((((a*)*)*)*)*)*)*)*)*)*)*", "\ud800"]).map(
        lambda p: js({"type": "string", "pattern": p})),
    st.sampled_from([
        '{"$ref":"#"}', '{"$ref":"#/nope"}', '{"$ref":"http://example.com/s.json"}',
        '{"$ref":"file:///etc/passwd"}',
        '{"$defs":{"a":{"$ref":"#/$defs/b"},"b":{"$ref":"#/$defs/a"}},"$ref":"#/$defs/a"}',
        '{"type":"object","properties":{"x":{"$ref":"#"}},"required":["x"]}',
        '{"type":"array","items":{"$ref":"#"},"minItems":1}', '{"not":{}}', "true", "false",
        '{"type":["string","number","null","object","array","boolean"]}', '{"type":"bogus"}',
        '{"allOf":[{"type":"string"},{"type":"number"}]}', '{"required":["a","a"]}',
        '{"type":"string","format":"date-time","minLength":50}']),
)


@st.composite
def schema_bodies(draw: st.DrawFn) -> tuple[str, bool]:
    kind = draw(st.sampled_from(["json_schema", "json_object"]))
    schema = draw(SCHEMAS)
    fmt = f'{{"type":"{kind}","json_schema":{{"name":"x","schema":{schema}}}}}'
    stream = draw(st.booleans())
    return body(response_format=fmt, max_tokens="8", stream=js(stream)), stream


@settings(FUZZ, max_examples=60)
@given(case=unicode_bodies())
def test_unicode_edges_never_fail(server, case):
    send(server, *case)


@settings(FUZZ, max_examples=60)
@given(case=number_bodies())
def test_extreme_numbers_never_fail(server, case):
    send(server, *case)


@settings(FUZZ, max_examples=40)
@given(case=schema_bodies())
def test_hostile_json_schemas_never_fail(server, case):
    send(server, *case)
