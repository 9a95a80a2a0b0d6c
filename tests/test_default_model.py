"""The shipped default model (mixtral/data/default/): the source document's JSON prompt and the
model card. Skipped in a checkout without the weights, where the default is a random tiny model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from mixtral import chat
from mixtral.assemble import assemble
from mixtral.cli import main
from mixtral.completion import complete
from mixtral.default_model import HAS_SHIPPED, SHIPPED
from mixtral.generate import GenerationParams
from mixtral.tokenizer import default_tokenizer

pytestmark = pytest.mark.skipif(not HAS_SHIPPED, reason="no shipped default weights")
ROOT = Path(__file__).resolve().parents[1]

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
                   "Routing", "What it cannot do", "scripts/train_default.sh",
                   "out-of-distribution", "scripts/eval_heldout.py"):
        assert needle in card, needle
    for png in ("passkey.png", "perplexity.png", "routing.png"):
        assert (SHIPPED / png).stat().st_size > 1000


# --- out of distribution (issue 17) -----------------------------------------------------------
# Ten records in the source document's prompt whose values come from the evaluation lists of
# scripts/values/ (Faker locales the training lists do not draw on): a model that copies gets
# them right, one that recalls its training names does not.
OOD_RECORDS = [
    {"name": "Juhani", "lastname": "Aavik", "address": "#14 Faksestræde"},
    {"name": "Tilde", "lastname": "Georgescu", "address": "#3 Milana Port"},
    {"name": "Antónia", "lastname": "Kiss"},
    {"name": "Sevil", "lastname": "Bhatti", "address": "#27 Irene Canyon", "city": "Haldia"},
    {"name": "Dzidra", "lastname": "Čuk", "city": "Hostouň"},
    {"name": "Cabbar", "lastname": "Colgan", "address": "#8 Madu Fields"},
    {"name": "Mcebisi", "lastname": "Lauri"},
    {"name": "Emilie", "lastname": "Myhre", "address": "#61 Liepiņš Forges"},
    {"name": "Friðborg", "lastname": "Hugósdóttir", "city": "Khammam"},
    {"name": "Cătălina", "lastname": "Aderogba", "address": "#5 Kazlauskas Ways"},
]


def ood_prompt(record: dict[str, str]) -> str:
    lines = "\n".join(f"{k}: {v}" for k, v in record.items())
    return JSON_PROMPT.split("\n")[0] + f"\n{lines}\n" + JSON_PROMPT.split("\n")[-1]


def test_the_ood_records_are_absent_from_every_training_list():
    sys.path.insert(0, str(ROOT / "scripts"))
    from values import load

    train = {v.casefold() for values in load("train").values() for v in values}
    evaluation = {v for values in load("eval").values() for v in values}
    # an address is "#N street": the street is the list's value
    values = {v.split(" ", 1)[1] if k == "address" else v for r in OOD_RECORDS
              for k, v in r.items()}
    assert values <= evaluation
    assert not {v.casefold() for v in values} & train


@pytest.fixture(scope="module")
def ood_exact() -> int:
    """How many of OOD_RECORDS the shipped weights turn into exactly their object."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from heldout.sets import unique_keys  # the held-out sets' rule: a key given twice is wrong

    model = assemble(SHIPPED)  # bf16 as shipped, the CLI's decode path
    exact = 0
    for record in OOD_RECORDS:
        prompt = chat.encode([{"role": "user", "content": ood_prompt(record)}])
        result = complete(model, default_tokenizer(), prompt,
                          GenerationParams(max_tokens=96, temperature=0.0))
        try:
            exact += json.loads(result.text.strip(), object_pairs_hook=unique_keys) == record
        except ValueError:
            pass
    return exact


# the shipped model's count (runs/d24b's final SFT, its card: json-new-values 19/100; the one
# it replaced, runs/d18's, wrote 2 of these 10 and 17 of the 100, a key given twice counted
# wrong). Ten records cannot tell models apart at a share near 18 %, so this is not the rule
# for replacing the model (scripts/ship_gate.py is, on 200 fresh prompts: 36 against 31); a
# model that ships by that rule brings its own count here.
SHIPPED_OOD_EXACT = 1


def test_json_from_names_it_never_saw_is_no_worse_than_shipped(ood_exact):
    """The shipped weights hold their own count under this code: a change to the chat
    template, the tokenizer, the loader or the decode path that loses a record fails here."""
    assert ood_exact >= SHIPPED_OOD_EXACT, f"{ood_exact}/10 exact"


@pytest.mark.xfail(strict=True, reason=f"issue 17: the shipped model copies "
                   f"{SHIPPED_OOD_EXACT} of these 10 exactly (its card's 'Why the missed "
                   "targets are missed': the lookup of a value by its key fails); flips when "
                   "a model that meets the target ships")
def test_json_from_names_it_never_saw_at_least_9_of_10(ood_exact):
    assert ood_exact >= 9, f"{ood_exact}/10 exact"
