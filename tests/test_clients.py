"""The official clients against a live server: mistralai (newest and 0.4.2) and openai, plus
the examples of the user's source document, sent through the client."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from serving import LiveServer

from mixtral import chat

pytestmark = pytest.mark.live  # a server on loopback

KEY = "test-key"
CONDIMENT = [  # the source document's two-turn chat
    {"role": "user", "content": "What is your favorite condiment?"},
    {"role": "assistant", "content": "Well, I'm quite partial to a good squeeze of fresh lemon "
     "juice. It adds just the right amount of zesty flavour to whatever I'm cooking up in the "
     "kitchen!"},
    {"role": "user", "content": "The right amount of what?"},
]
FEW_SHOT = [  # its system + user example
    {"role": "system", "content": "You are a helpful code assistant that help with writing Python "
     "code for a user requests. Please only produce the function and avoid explaining."},
    {"role": "user", "content": "Create a Python function to convert Celsius to Fahrenheit."},
]
JSON_PROMPT = ("You are a helpful code assistant. Your task is to generate a valid JSON object "
               "based on the given information:\nname: John\nlastname: Smith\naddress: #1 Samuel "
               "St.\nJust generate the JSON object without explanations:")


@pytest.fixture(scope="module")
def server():
    from mixtral.server.app import json_constraints
    s = LiveServer(api_key=KEY, json_constraint=json_constraints())
    prompts = []
    engine = s.state.engine
    job = engine.job  # every choice of every request is made here, then queued
    engine.job = lambda prompt, *a, **k: prompts.append(prompt) or job(prompt, *a, **k)
    s.prompts = prompts
    yield s
    s.stop()


# --- mistralai, newest ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mistral(server):
    from mistralai.client import Mistral
    return Mistral(api_key=KEY, server_url=server.url)


def test_mistralai_complete_and_stream(mistral, server):
    r = mistral.chat.complete(model="mistral-small", messages=CONDIMENT, max_tokens=6,
                              random_seed=2)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 6
    assert server.prompts[-1] == chat.encode(CONDIMENT)
    assert r.usage.prompt_tokens == len(chat.encode(CONDIMENT))
    events = list(mistral.chat.stream(model="mistral-small", messages=CONDIMENT, max_tokens=6,
                                      random_seed=2))
    text = "".join(e.data.choices[0].delta.content or "" for e in events)
    assert text == r.choices[0].message.content
    assert events[-1].data.usage.completion_tokens == 6


def test_mistralai_safe_prompt_and_few_shot(mistral, server):
    mistral.chat.complete(model="open-mixtral-8x7b", messages=FEW_SHOT, max_tokens=2,
                          safe_prompt=True)
    assert server.prompts[-1] == chat.encode(FEW_SHOT, safe_prompt=True)
    assert chat.SAFE_PROMPT in mistral_decode(server.prompts[-1])


def mistral_decode(ids):
    from mixtral.tokenizer import default_tokenizer
    return default_tokenizer().decode(ids)


def test_mistralai_json_mode(mistral):
    r = mistral.chat.complete(model="mistral-small", max_tokens=200, random_seed=0,
                              messages=[{"role": "user", "content": JSON_PROMPT}],
                              response_format={"type": "json_object"})
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_mistralai_models_and_errors(server):
    from mistralai.client import Mistral
    from mistralai.client.errors import HTTPValidationError, SDKError

    client = Mistral(api_key=KEY, server_url=server.url)
    assert "open-mixtral-8x7b" in [m.id for m in client.models.list().data]
    assert client.models.retrieve(model_id="mistral-small").id == "mistral-small"
    with pytest.raises(SDKError) as e:
        Mistral(api_key="wrong", server_url=server.url).models.list()
    assert e.value.status_code == 401
    with pytest.raises(HTTPValidationError) as v:
        client.chat.complete(model="mistral-small", messages=[{"role": "user", "content": "x"}],
                             temperature=9.0)
    assert v.value.data.detail[0].loc[-1] == "temperature"


def test_mistralai_new_fields(mistral, server):
    # mistralai 3.x sends vLLM's sampling fields and logprobs; its temperature stays Mistral's
    from mistralai.client.errors import HTTPValidationError

    r = mistral.chat.complete(model="mistral-small", messages=CONDIMENT, max_tokens=4,
                              temperature=0, top_k=5, repetition_penalty=1.1, logprobs=True,
                              top_logprobs=3)
    assert r.usage.completion_tokens == 4
    greedy = mistral.chat.complete(model="mistral-small", messages=CONDIMENT, max_tokens=4,
                                   temperature=0)
    assert r.choices[0].message.content != "" and greedy.choices[0].message.content != ""
    with pytest.raises(HTTPValidationError) as v:  # Mistral's own bound, for its own client
        mistral.chat.complete(model="mistral-small", messages=CONDIMENT, temperature=1.8)
    assert v.value.data.detail[0].loc[-1] == "temperature"


def test_openai_completions_and_logprobs(openai_client):
    r = openai_client.completions.create(model="mistral-small", prompt="Hello", max_tokens=4,
                                         temperature=0, logprobs=2, echo=False)
    assert r.choices[0].logprobs.tokens and r.usage.completion_tokens == 4
    c = openai_client.chat.completions.create(
        model="mistral-small", messages=[{"role": "developer", "content": "Be brief."},
                                         *CONDIMENT], max_tokens=4, temperature=2.0, seed=1,
        logprobs=True, top_logprobs=2)
    assert len(c.choices[0].logprobs.content) <= 4


# --- openai --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def openai_client(server):
    from openai import OpenAI
    return OpenAI(api_key=KEY, base_url=server.url + "/v1", max_retries=0)


def test_openai_complete_and_stream(openai_client):
    r = openai_client.chat.completions.create(model="mistral-small", messages=FEW_SHOT,
                                              max_tokens=5, seed=4)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5
    stream = openai_client.chat.completions.create(
        model="mistral-small", messages=FEW_SHOT, max_completion_tokens=5, seed=4, stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
        r.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5


def test_openai_json_schema(openai_client):
    import jsonschema

    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                               "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    r = openai_client.chat.completions.create(
        model="mistral-small", max_tokens=200, seed=1,
        messages=[{"role": "user", "content": "Give a person as JSON."}],
        response_format={"type": "json_schema",
                         "json_schema": {"name": "person", "schema": schema, "strict": True}})
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)


def test_openai_models_and_errors(openai_client, server):
    import openai

    assert openai_client.models.retrieve("mistral-small").id == "mistral-small"
    assert len(openai_client.models.list().data) == 4
    bad = openai.OpenAI(api_key="wrong", base_url=server.url + "/v1", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    with pytest.raises(openai.UnprocessableEntityError):
        openai_client.chat.completions.create(model="mistral-small", temperature=9,
                                              messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="Expected last role"):
        openai_client.chat.completions.create(model="mistral-small", messages=CONDIMENT[:2])
    with pytest.raises(openai.NotFoundError, match="Invalid model"):
        openai_client.chat.completions.create(model="gpt-4", messages=CONDIMENT)


# --- mistralai 0.4.2, in its own virtualenv ------------------------------------------------------

OLD_CLIENT = Path(os.environ.get("MIXTRAL_MISTRALAI_042", Path(__file__).parent.parent /
                                 ".venv" / "mistralai-0.4.2")) / "bin" / "python"


@pytest.mark.skipif(not OLD_CLIENT.exists(), reason="make test creates the mistralai 0.4.2 venv")
def test_mistralai_0_4_2(server):
    script = Path(__file__).parent / "clients" / "mistralai_042.py"
    out = subprocess.run([str(OLD_CLIENT), str(script), server.url], capture_output=True,
                         text=True, timeout=120, env={**os.environ, "MISTRAL_API_KEY": KEY})
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["complete"]["finish_reason"] == "length"
    assert seen["complete"]["usage"][1] == 5
    assert seen["stream"] == seen["complete"]["content"] and seen["stream_finish"] == "length"
    assert "open-mixtral-8x7b" in seen["models"]
    assert seen["auth_error"] == 401 and seen["validation_error"] == 422
    sent = [{"role": "system", "content": "You are a helpful code assistant."},
            {"role": "user", "content": "Create a Python function to convert Celsius."}]
    assert chat.encode(sent, safe_prompt=True) in server.prompts  # safe_prompt reached the model
