"""Chat encoding against two oracles: mistral-common's verified token vectors, and an independent
re-implementation of the v1 instruct layout with plain SentencePiece (the contract's §8.2)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import sentencepiece
from hypothesis import given, settings
from hypothesis import strategies as st

import mixtral
from mixtral.chat import SAFE_PROMPT, ChatError, encode
from mixtral.tokenizer import default_tokenizer

VECTORS = json.loads((Path(__file__).parent / "data" / "chat_vectors.json").read_text())
TOKENIZER_FILE = Path(default_tokenizer()._sp.file_path)


def test_tokenizer_is_mixtrals():
    # the hub's Mixtral-8x7B(-Instruct) tokenizer.model has exactly these bytes
    assert hashlib.sha256(TOKENIZER_FILE.read_bytes()).hexdigest() == \
        "dadfd56d766715c61d2ef780a525ab43b8e6da4de6865bda3d95fdef5e134055"
    tok = default_tokenizer()
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (32000, 1, 2)


@pytest.mark.parametrize("case", VECTORS["cases"], ids=lambda c: c["name"])
def test_verified_token_vectors(case):
    assert encode(case["messages"]) == case["tokens"]


def test_stable_api_after_bare_import():
    assert mixtral.chat.encode([{"role": "user", "content": "Hi"}]) == \
        [1, 733, 16289, 28793, 15359, 733, 28748, 16289, 28793]


@pytest.fixture(scope="module")
def sp() -> sentencepiece.SentencePieceProcessor:
    return sentencepiece.SentencePieceProcessor(model_file=str(TOKENIZER_FILE))


def reference_v1(messages: list[dict], sp) -> list[int]:
    """Mixtral-Instruct v1: [BOS] sp("[INST] {system\\n\\n}{user} [/INST]") sp(answer) [EOS] ..."""
    def text(c):
        return c if isinstance(c, str) else "\n\n".join(x["text"] for x in c if x["text"])

    system = [text(m["content"]) for m in messages if m["role"] == "system" and m["content"]]
    turns: list[dict] = []
    for m in messages:
        if m["role"] == "system":
            continue
        t = text(m["content"])
        if turns and turns[-1]["role"] == m["role"]:  # same role twice: one turn
            prev = turns[-1]
            prev["content"] = prev["content"] + "\n\n" + t if prev["content"] and t else \
                prev["content"] or t
            prev["prefix"] = prev["prefix"] or m.get("prefix", False)
        else:
            turns.append({"role": m["role"], "content": t, "prefix": m.get("prefix", False)})
    if not turns or turns[0]["role"] != "user":
        turns.insert(0, {"role": "user", "content": "", "prefix": False})
    ids, first = [1], True
    for m in turns:
        if m["role"] == "user":
            c = m["content"]
            if first and system:
                c = "\n\n".join(system) + "\n\n" + c
            first = False
            ids += sp.encode(f"[INST] {c} [/INST]")
        else:
            ids += sp.encode(m["content"]) + ([] if m["prefix"] else [2])
    return ids


LOOKALIKES = ["</s>", "<s>", "[INST]", "[/INST]", "<unk>", "<0x0A>", "▁", "\n\n", "  ", "\t"]
texts = st.lists(st.one_of(st.text(max_size=12), st.sampled_from(LOOKALIKES),
                           st.text(alphabet="日本語🦜éß \n", max_size=6)),
                 max_size=4).map("".join)


@st.composite
def conversations(draw):
    messages = [{"role": "system", "content": draw(texts)}
                for _ in range(draw(st.integers(0, 2)))]
    role = draw(st.sampled_from(["user", "assistant"]))
    for _ in range(draw(st.integers(0, 5))):
        content = draw(texts if role == "user" else texts.filter(bool))
        messages.append({"role": role, "content": content})
        role = draw(st.sampled_from(["user", "assistant"]))
    if draw(st.booleans()):
        messages.append({"role": "user", "content": draw(texts)})
    else:
        if not any(m["role"] != "system" for m in messages):
            messages.append({"role": "user", "content": draw(texts)})
        messages.append({"role": "assistant", "content": draw(texts.filter(bool)),
                         "prefix": True})
    return messages


REFUSALS = ["Assistant message must have either content or tool_calls",  # empty assistant
            "Conversation must start with a user message or system message"]


@settings(max_examples=300, deadline=None)
@given(conversations())
def test_encoding_matches_independent_reference(sp, messages):
    try:
        got = encode(messages)
    except ChatError as e:
        # mistral-common (the API's validator) refuses a few shapes; only these, by rule
        assert any(rule in str(e) for rule in REFUSALS), (messages, e)
        return
    assert got == reference_v1(messages, sp)


@settings(max_examples=100, deadline=None)
@given(texts)
def test_control_token_lookalikes_stay_text(content):
    ids = encode([{"role": "user", "content": content}])
    assert ids[0] == 1 and ids.count(1) == 1 and 2 not in ids


def test_safe_prompt_is_the_first_system_message():
    user = [{"role": "user", "content": "How to kill a linux process?"}]
    case = next(c for c in VECTORS["cases"] if c["name"] == "safe_prompt_only")
    assert encode(user, safe_prompt=True) == case["tokens"]
    with_system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    explicit = [{"role": "system", "content": SAFE_PROMPT}, *with_system]
    assert encode(with_system, safe_prompt=True) == encode(explicit)
    case = next(c for c in VECTORS["cases"] if c["name"] == "safe_prompt_plus_user_system")
    assert encode(with_system, safe_prompt=True) == case["tokens"]


@pytest.mark.parametrize("messages,message", [
    ([], "at least one message"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
     "Expected last role User"),
    ([{"role": "assistant", "content": "b"}], "must start with a user message or system"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
      {"role": "system", "content": "s"}, {"role": "user", "content": "c"}],
     "Unexpected role 'system' after role 'assistant'"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "prefix": True},
      {"role": "user", "content": "c"}], "prefix True must be last"),
    ([{"role": "robot", "content": "x"}], r"messages\[0\]: role must be one of"),
    ([{"role": "tool", "content": "x"}], "tools are not supported"),
    ([{"role": "user", "content": 3}], r"messages\[0\].content must be a string"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}],
     r"messages\[0\].content\[0\]: only text chunks"),
    (["hello"], r"messages\[0\] must be an object"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": ""},
      {"role": "user", "content": "b"}], "Assistant message must have either content"),
    ([{"role": "user", "content": "x", "prefix": True}], "'prefix' is a boolean for assistant"),
])
def test_wrong_conversations_get_clear_errors(messages, message):
    with pytest.raises(ChatError, match=message):
        encode(messages)
