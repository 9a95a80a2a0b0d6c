"""The routes and fields beyond Mistral's chat API, against a live server: /v1/completions
(raw prompts, echo, stop, n, streaming) with the openai client, logprobs on both routes in
OpenAI's shapes, an echoed prompt's own logprobs against a full forward pass, /v1/tokenize and
/v1/detokenize, vLLM's sampling fields, the developer role, temperature's two ranges, and the
offline /docs page."""

from __future__ import annotations

import math

import pytest
import torch
from serving import HELLO, post, sse

from mixtral import chat
from mixtral.server import logprobs
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
    # all of it: the first run's KV and its prompt logits (which pick the first token)
    assert again.usage.prompt_tokens_details.cached_tokens == n
    assert again.choices[0].text == first.choices[0].text
    chunks = list(openai_client.completions.create(
        model="mistral-small", prompt=[prompt, prompt], max_tokens=2, seed=1, stream=True,
        stream_options={"include_usage": True}))
    # the first as before; the second, the same prompt running beside it, takes all n (and the
    # first's last logits: one prefill for both)
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == n + n


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


# --- echo with logprobs: the prompt's own logprobs ----------------------------------------------

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def oracle(server):
    """log_softmax [T, V] of one forward pass of the served model over `ids`, no cache: row p is
    the distribution of token p + 1."""
    model = server.state.engine.model

    def rows(ids):
        with torch.inference_mode():
            return model(torch.tensor([ids]))[0].float().log_softmax(-1)
    return rows


def expected_prompt_logprobs(oracle, ids, top):
    """What the echoed prompt's token_logprobs and top_logprobs must be (the first: None)."""
    rows = oracle(ids)
    values = [None] + [float(rows[p, t]) for p, t in enumerate(ids[1:])]
    tops = [None]
    for p in range(len(ids) - 1):
        v, i = rows[p].topk(top)
        by_text: dict[str, float] = {}
        for token, value in zip(i.tolist(), v.tolist(), strict=True):
            by_text.setdefault(logprobs.token_text(TOK, token), value)
        tops.append(by_text)
    return values, tops


def assert_same_logprobs(a, b):
    """Two legacy logprobs alike but for rounding (prefills chunked differently)."""
    assert a["tokens"] == b["tokens"] and a["text_offset"] == b["text_offset"]
    assert [x is None for x in a["token_logprobs"]] == [x is None for x in b["token_logprobs"]]
    assert [x for x in a["token_logprobs"] if x is not None] == pytest.approx(
        [x for x in b["token_logprobs"] if x is not None], abs=1e-5)
    for x, y in zip(a["top_logprobs"], b["top_logprobs"], strict=True):
        assert (x is None) == (y is None)
        if x is not None:
            assert x.keys() == y.keys()
            assert list(x.values()) == pytest.approx(list(y.values()), abs=1e-5)


def assert_prompt_part(lp, oracle, ids, top):
    values, tops = expected_prompt_logprobs(oracle, ids, top)
    n = len(ids)
    assert lp["tokens"][:n] == [logprobs.token_text(TOK, t) for t in ids]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["token_logprobs"][1:n] == pytest.approx(values[1:], abs=1e-5)
    for got, want in zip(lp["top_logprobs"][1:n], tops[1:], strict=True):
        assert got.keys() == want.keys() and list(got.values()) == pytest.approx(
            list(want.values()), abs=1e-5)


def test_echo_logprobs_score_the_prompt_with_max_tokens_zero(openai_client, server, oracle):
    openai_client.completions.create(model="mistral-small", prompt=PROMPT, max_tokens=2)  # warm
    r = openai_client.completions.create(model="mistral-small", prompt=PROMPT, max_tokens=0,
                                         echo=True, logprobs=5)
    ids = TOK.encode(PROMPT, bos=True)
    choice = r.choices[0]
    assert choice.text == PROMPT and choice.finish_reason == "length"
    lp = choice.logprobs.model_dump()
    assert len(lp["tokens"]) == len(ids)  # nothing generated
    assert_prompt_part(lp, oracle, ids, 5)
    # each token's text where it stands in the echoed prompt: BOS is none, "The" loses its space
    ends = [*lp["text_offset"][1:], len(PROMPT)]
    assert [PROMPT[a:b] for a, b in zip(lp["text_offset"], ends, strict=True)] == \
        ["", "The", " capital", " of", " France", " is"]
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 0
    assert r.usage.prompt_tokens_details.cached_tokens == 0  # the warm prefix was not taken


def test_echo_logprobs_then_the_answer(api, oracle):
    ids = TOK.encode(PROMPT, bos=True)
    plain = complete(api, max_tokens=4, temperature=0, logprobs=2).json()["choices"][0]
    both = complete(api, max_tokens=4, temperature=0, logprobs=2, echo=True).json()
    lp = both["choices"][0]["logprobs"]
    assert both["choices"][0]["text"] == PROMPT + plain["text"]
    assert_prompt_part(lp, oracle, ids, 2)
    n = len(ids)
    answer = {k: v[n:] for k, v in lp.items()}  # the generated tokens, as without echo
    answer["text_offset"] = [o - len(PROMPT) for o in answer["text_offset"]]
    assert_same_logprobs(answer, plain["logprobs"])
    # token ids in: the same scores, the decoded ids echoed
    by_ids = complete(api, prompt=ids, max_tokens=4, temperature=0, logprobs=2,
                      echo=True).json()["choices"][0]
    assert by_ids["text"] == both["choices"][0]["text"]
    assert_same_logprobs(by_ids["logprobs"], lp)


def test_echo_logprobs_streamed_come_first(api):
    whole = complete(api, max_tokens=5, seed=4, logprobs=3, echo=True).json()["choices"][0]
    events = sse(complete(api, max_tokens=5, seed=4, logprobs=3, echo=True, stream=True))
    assert events[-1] == "[DONE]"
    first = events[0]["choices"][0]
    n = len(TOK.encode(PROMPT, bos=True))
    assert first["text"] == PROMPT
    assert_same_logprobs(first["logprobs"], {k: v[:n] for k, v in whole["logprobs"].items()})
    # the rest as the answer's chunks carry it (offsets by the deltas' text, as without echo)
    streamed = {k: [x for e in events[:-1] for x in e["choices"][0]["logprobs"][k]]
                for k in whole["logprobs"] if k != "text_offset"}
    assert streamed["tokens"] == whole["logprobs"]["tokens"]
    assert streamed["token_logprobs"][1:] == pytest.approx(whole["logprobs"]["token_logprobs"][1:],
                                                           abs=1e-5)
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == whole["text"]
    zero = sse(complete(api, max_tokens=0, logprobs=1, echo=True, stream=True))
    assert_same_logprobs(zero[0]["choices"][0]["logprobs"], complete(
        api, max_tokens=0, logprobs=1, echo=True).json()["choices"][0]["logprobs"])
    assert zero[-2]["choices"][0]["finish_reason"] == "length" and zero[-1] == "[DONE]"


def test_echo_logprobs_for_every_choice_and_prompt(api, oracle):
    prompts = ["One two", "Three four five"]
    r = complete(api, prompt=prompts, n=3, max_tokens=3, seed=2, logprobs=1, echo=True).json()
    assert [c["index"] for c in r["choices"]] == list(range(6))
    for i, text in enumerate(prompts):
        ids = TOK.encode(text, bos=True)
        mine = r["choices"][3 * i:3 * i + 3]
        for c in mine:
            assert c["text"].startswith(text)
            assert_prompt_part(c["logprobs"], oracle, ids, 1)
            assert {k: v[:len(ids)] for k, v in c["logprobs"].items()} == \
                {k: v[:len(ids)] for k, v in mine[0]["logprobs"].items()}
            assert len(c["logprobs"]["tokens"]) == len(ids) + 3
    # the first choice of each prompt scored it whole; the other two shared its prefill
    assert r["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


def test_a_loglikelihood_request_as_lm_eval_sends_it(api, oracle):
    """lm-eval's local-completions: token ids, echo, max_tokens 1, logprobs 1, temperature 0;
    it sums token_logprobs[len(context):-1] and calls it greedy when each equals its top."""
    ids = TOK.encode(PROMPT, bos=True)
    context = 4  # BOS "The capital of"; the continuation: " France is"
    r = complete(api, prompt=[ids], max_tokens=1, logprobs=1, echo=True, temperature=0).json()
    lp = r["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(ids) + 1
    rows = oracle(ids)
    want = sum(float(rows[p - 1, ids[p]]) for p in range(context, len(ids)))
    assert sum(lp["token_logprobs"][context:-1]) == pytest.approx(want, abs=1e-4)
    for p, top in enumerate(lp["top_logprobs"][context:-1], start=context):
        assert list(top.values()) == pytest.approx([float(rows[p - 1].max())], abs=1e-5)


def test_echo_logprobs_bounds_and_the_neighbours_kept(api, server):
    ok = complete(api, max_tokens=0, logprobs=20, echo=True).json()["choices"][0]["logprobs"]
    assert all(len(t) <= 20 for t in ok["top_logprobs"][1:]) and len(ok["top_logprobs"][1]) > 1
    assert complete(api, logprobs=21, echo=True).status_code == 422
    # a prompt longer than the context: the same 400 as without echo and logprobs
    too_long = [1] + [300] * server.state.engine.context
    plain = complete(api, prompt=too_long, max_tokens=0)
    scored = complete(api, prompt=too_long, max_tokens=0, echo=True, logprobs=1)
    assert plain.status_code == scored.status_code == 400
    assert scored.json()["message"] == plain.json()["message"]
    assert "exceeds the model's context" in plain.json()["message"]
    # max_tokens 0 without the prompt's logprobs: nothing to run, as before
    bare = complete(api, max_tokens=0, logprobs=1).json()["choices"][0]
    assert bare["text"] == "" and bare["logprobs"]["tokens"] == []
    echo_only = complete(api, max_tokens=0, echo=True).json()["choices"][0]
    assert echo_only["text"] == PROMPT and echo_only["logprobs"] is None
    # a prompt of BOS alone: one token, which nothing predicts
    bos = complete(api, prompt=[1], max_tokens=0, logprobs=1, echo=True).json()["choices"][0]
    assert bos["text"] == "" and bos["logprobs"] == {
        "tokens": ["<s>"], "token_logprobs": [None], "top_logprobs": [None], "text_offset": [0]}


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
