"""The shipped default model (mixtral/data/default/): the source document's JSON prompt and the
model card. Skipped in a checkout without the weights, where the default is a random tiny model."""

from __future__ import annotations

import json

import pytest

from mixtral.cli import main
from mixtral.default_model import HAS_SHIPPED, SHIPPED

pytestmark = pytest.mark.skipif(not HAS_SHIPPED, reason="no shipped default weights")

# the source document's example, word for word
JSON_PROMPT = ("You are a helpful code assistant. Your task is to generate a valid JSON object "
               "based on the given information:\nname: John\nlastname: Smith\naddress: #1 Samuel "
               "St.\nJust generate the JSON object without explanations:")


def test_the_source_documents_json_prompt_gives_exactly_that_object(capsys):
    assert main(["generate", "--chat", "--prompt", JSON_PROMPT, "--temperature", "0",
                 "--max-tokens", "64", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["finish_reason"] == "stop"  # it ended with </s>, not at max_tokens
    assert json.loads(result["text"]) == {"name": "John", "lastname": "Smith",
                                          "address": "#1 Samuel St."}


def test_model_card_reports_the_measurements():
    card = (SHIPPED / "MODEL_CARD.md").read_text()
    for needle in ("total", "active", "JSON from", "passkey", "2-digit addition",
                   "safe prompt", "</s>", "preference accuracy", "Perplexity vs context",
                   "Routing", "What it cannot do", "scripts/train_default.sh"):
        assert needle in card, needle
    for png in ("passkey.png", "perplexity.png", "routing.png"):
        assert (SHIPPED / png).stat().st_size > 1000
