"""The routes and fields beyond Mistral's chat API, against a live server: /v1/completions
(raw prompts, echo, stop, n, streaming) with the openai client, logprobs on both routes in
OpenAI's shapes, /v1/tokenize and /v1/detokenize, vLLM's sampling fields, the developer role,
temperature's two ranges, and the offline /docs page."""

from __future__ import annotations

import math

import pytest
from serving import HELLO, post, sse

from mixtral import chat
from mixtral.tokenizer import default_tokenizer

pytestmark = pytest.mark.live  # a server on loopback

TOK = default_tokenizer()


@pytest.fixture(scope="module")
def openai_client(server):
    from openai import OpenAI
    return OpenAI(api_key="none", base_url=server.url + "/v1", max_retries=0)


def complete(api, **body):
    body.setdefault("model", "mistral-small")
    body.setdefault("prompt", "The capital of France is")
    return api.post("/v1/completions", json=body)


# --- /v1/completions -----------------------------------------------------------------------------

def test_openai_completions_create_and_stream(openai_client, server):
    r = openai_client.completions.create(model="mistral-small", prompt="Once upon a time",
                                         max_tokens=6, seed=3)
    assert r.object == "text_completion" and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(TOK.encode("Once upon a time"))
    assert r.usage.completion_tokens == 6
    chunks = list(openai_client.completions.create(
        model="mistral-small", prompt="Once upon a time", max_tokens=6, seed=3, stream=True,
        stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6


def test_a_repeated_prompt_reports_its_cached_tokens(openai_client, server):
    prompt = "A prompt sent twice to the completions route, and only by this test."
    n = len(TOK.encode(prompt))
    first = openai_client.completions.create(model="mistral-small", prompt=prompt,
                                             max_tokens=2, seed=1)
    assert first.usage.prompt_tokens_details.cached_tokens <= 1  # BOS, as every prompt has
    again = openai_client.completions.create(model="mistral-small", prompt=prompt,
                                             max_tokens=2, seed=1)
    # all but the last prompt token (its logits pick the first token) came from the cache
    assert again.usage.prompt_tokens_details.cached_tokens == n - 1
    assert again.choices[0].text == first.choices[0].text
    chunks = list(openai_client.completions.create(
        model="mistral-small", prompt=[prompt, prompt], max_tokens=2, seed=1, stream=True,
        stream_options={"include_usage": True}))
    # the first as before; the second, the same prompt running beside it, takes all n (and the
    # first's last logits: one prefill for both)
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == (n - 1) + n


def test_the_prompt_is_raw_text_with_bos(api, server):
    # the same ids through /v1/completions and through generation from token ids
    text = "Hi"  # no template around it
    a = complete(api, prompt=text, max_tokens=5, temperature=0).json()
    b = complete(api, prompt=TOK.encode(text, bos=True), max_tokens=5, temperature=0).json()
    assert a["choices"][0]["text"] == b["choices"][0]["text"]
    assert a["usage"]["prompt_tokens"] == len(TOK.encode(text, bos=True))
    assert TOK.encode(text, bos=True) != chat.encode([{"role": "user", "content": "Hi"}])


def test_several_prompts_and_n_number_their_choices(api):
    r = complete(api, prompt=["One", "Two two"], n=2, max_tokens=3, seed=5).json()
    assert [c["index"] for c in r["choices"]] == [0, 1, 2, 3]
    assert r["usage"]["prompt_tokens"] == len(TOK.encode("One")) + len(TOK.encode("Two two"))
    assert r["usage"]["completion_tokens"] == 12
    alone = complete(api, prompt="Two two", n=2, max_tokens=3, seed=5).json()
    assert [c["text"] for c in r["choices"][2:]] == [c["text"] for c in alone["choices"]]


def test_echo_stop_and_token_prompts(api):
    plain = complete(api, max_tokens=8, temperature=0).json()["choices"][0]["text"]
    echoed = complete(api, max_tokens=8, temperature=0, echo=True).json()["choices"][0]
    assert echoed["text"] == "The capital of France is" + plain
    cut = plain.strip()[:2]
    stopped = complete(api, max_tokens=8, temperature=0, stop=[cut]).json()["choices"][0]
    assert stopped["finish_reason"] == "stop" and cut not in stopped["text"]
    assert plain.startswith(stopped["text"])
    events = sse(complete(api, max_tokens=4, temperature=0, echo=True, stream=True))
    assert events[-1] == "[DONE]" and events[0]["choices"][0]["text"] == \
        "The capital of France is"


@pytest.mark.parametrize("body,status,words", [
    ({"suffix": "x"}, 400, "fill-in-the-middle"),
    ({"echo": True, "logprobs": 1}, 400, "echo with logprobs"),
    ({"best_of": 3}, 400, "best_of"),
    ({"prompt": []}, 422, "empty"),
    ({"prompt": [[1, 99999]]}, 400, "outside the vocabulary"),
    ({"logprobs": 21}, 422, "logprobs"),
    ({"bogus": 1}, 422, "bogus"),
    ({"model": "gpt-9"}, 404, "Invalid model"),
])
def test_completions_refusals_say_what(api, body, status, words):
    r = complete(api, max_tokens=2, **body)
    assert r.status_code == status, r.text
    assert words in r.text


# --- logprobs ------------------------------------------------------------------------------------

def test_openai_chat_logprobs(openai_client):
    r = openai_client.chat.completions.create(model="mistral-small", messages=HELLO,
                                              max_tokens=6, temperature=0, logprobs=True,
                                              top_logprobs=5)
    content = r.choices[0].logprobs.content
    assert len(content) == 6
    for entry in content:
        assert len(entry.top_logprobs) == 5
        assert entry.logprob == entry.top_logprobs[0].logprob  # greedy: the top one
        assert entry.token == entry.top_logprobs[0].token
        assert sum(math.exp(t.logprob) for t in entry.top_logprobs) <= 1 + 1e-6
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token
    assert "".join(e.token for e in content).strip() == r.choices[0].message.content.strip()


def test_streamed_chat_chunks_carry_their_logprobs(api):
    whole = post(api, max_tokens=6, random_seed=1, logprobs=True, top_logprobs=2).json()
    events = sse(post(api, max_tokens=6, random_seed=1, logprobs=True, top_logprobs=2,
                      stream=True))
    streamed = [e for ev in events[:-1] for e in ev["choices"][0]["logprobs"]["content"]]
    assert streamed == whole["choices"][0]["logprobs"]["content"]
    assert "logprobs" not in post(api, max_tokens=2).json()["choices"][0]  # Mistral's shape


def test_completion_logprobs_legacy_shape(openai_client):
    r = openai_client.completions.create(model="mistral-small", prompt="Hello", max_tokens=5,
                                         temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert top[token] == value == max(top.values())
    assert lp.text_offset[0] == 0
    assert all(b >= a for a, b in zip(lp.text_offset, lp.text_offset[1:], strict=False))


def test_top_logprobs_bounds(api):
    assert post(api, logprobs=True, top_logprobs=21).status_code == 422
    assert post(api, top_logprobs=2).status_code == 422  # without logprobs: true


# --- tokenize / detokenize -----------------------------------------------------------------------

def test_tokenize_and_detokenize(api):
    r = api.post("/v1/tokenize", json={"model": "mistral-small", "prompt": "Hello world"})
    assert r.json()["tokens"] == TOK.encode("Hello world") and r.json()["count"] == 3
    r = api.post("/tokenize", json={"content": "Hello", "add_special": False,
                                    "with_pieces": True})  # llama.cpp's shape
    assert r.json()["tokens"] == [{"id": 22557, "piece": " Hello"}]  # the piece's own space
    r = api.post("/v1/tokenize", json={"messages": HELLO})
    assert r.json()["tokens"] == chat.encode(HELLO)
    r = api.post("/v1/detokenize", json={"tokens": TOK.encode("Hello world")})
    assert r.json()["prompt"] == "Hello world"
    assert api.post("/v1/detokenize", json={"tokens": [32000]}).status_code == 400
    assert api.post("/v1/tokenize", json={"prompt": "x", "messages": HELLO}).status_code == 422


# --- fields --------------------------------------------------------------------------------------

def test_developer_role_is_system(api, server):
    dev = [{"role": "developer", "content": "Be brief."}, *HELLO]
    sys_ = [{"role": "system", "content": "Be brief."}, *HELLO]
    a = api.post("/v1/tokenize", json={"messages": dev}).json()["tokens"]
    assert a == chat.encode(sys_)
    assert post(api, messages=dev, max_tokens=1).status_code == 200


def test_vllm_fields_reach_the_sampler(api, server):
    engine = server.state.engine
    seen = []
    job = engine.job
    engine.job = lambda prompt, params, *a, **k: seen.append(params) or job(prompt, params,
                                                                            *a, **k)
    try:
        r = post(api, max_tokens=3, top_k=5, min_p=0.1, repetition_penalty=1.2,
                 logit_bias={"28705": 5})
    finally:
        engine.job = job
    assert r.status_code == 200, r.text
    p = seen[-1]
    assert (p.top_k, p.min_p, p.repetition_penalty, p.logit_bias) == (5, 0.1, 1.2,
                                                                      ((28705, 5.0),))
    # a bias of +100 makes the token certain
    r = post(api, max_tokens=3, temperature=1, logit_bias={"1014": 100}).json()
    assert r["choices"][0]["message"]["content"] == TOK.decode([1014] * 3)
    for bad in ({"logit_bias": {"x": 1}}, {"logit_bias": {"5": 101}}, {"top_k": -2},
                {"min_p": 2}, {"repetition_penalty": 0}):
        assert post(api, **bad).status_code == 422, bad
    assert post(api, logit_bias={"40000": 1}).status_code == 400


def test_temperature_ranges(api):
    assert post(api, temperature=2.0, max_tokens=1).status_code == 200  # OpenAI's range
    r = post(api, temperature=1.8, random_seed=1, max_tokens=1)  # Mistral's shape
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "temperature"]
    r = api.post("/v1/chat/completions", json={"model": "mistral-small", "messages": HELLO,
                                               "temperature": 1.8},
                 headers={"user-agent": "mistral-client-python/3.7.0"})
    assert r.status_code == 422
    assert post(api, temperature=1.5, random_seed=1, max_tokens=1).status_code == 200
    assert post(api, temperature=2.1).status_code == 422


def test_docs_page_works_offline(api):
    r = api.get("/docs")
    assert r.status_code == 200 and "/v1/completions" in r.text and "<script" not in r.text
    assert "repetition_penalty" in r.text and "http" not in r.text.replace("/openapi.json", "")
