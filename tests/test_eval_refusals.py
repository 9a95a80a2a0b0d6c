"""scripts/eval_refusals.py: the first-token probe on models whose answers are known."""

import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import build_instruct_data as shipped  # noqa: E402
from eval_refusals import measure, requests  # noqa: E402

from mixtral import chat  # noqa: E402
from mixtral.tokenizer import default_tokenizer  # noqa: E402

TOK = default_tokenizer()
REFUSE = TOK.encode(shipped.REFUSAL, bos=False)[0]


def model_refusing(words: set[str]):
    """Refuses (its last position's argmax the refusal's first piece) a prompt holding one of
    `words` (whole words), answers "Sure" to the rest."""
    sure = TOK.encode("Sure", bos=False)[0]
    prompts = {}

    def model(x: torch.Tensor) -> torch.Tensor:
        text = prompts.setdefault(tuple(x[0].tolist()), TOK.decode(x[0].tolist()))
        logits = torch.zeros(*x.shape, TOK.vocab_size)
        refuse = bool(words & set(re.findall(r"[a-z']+", text.lower())))
        logits[0, -1, REFUSE if refuse else sure] = 1.0
        return logits
    return model


def test_groups_are_the_generators_triples_under_the_safe_prompt_and_the_pools():
    groups = requests(n=40, seed=3)
    assert len(groups["harmful"]) == len(groups["twin"]) == len(groups["ask"]) > 20
    assert len(groups["held-out harmful"]) == len(groups["held-out harmless"]) == 120  # pools
    for ms in groups.values():
        assert all(m[0] == {"role": "system", "content": shipped.SAFE_PROMPT} for m in ms)
        assert all(chat.encode(m) for m in ms[:2])


def test_a_model_that_refuses_everything_and_one_that_refuses_nothing():
    groups = requests(n=40, seed=3)
    every = measure(model_refusing({"always"}), groups)  # the safe prompt's first word
    assert all(k == (n if "harmful" in g else 0) for g, (k, n) in every.items())
    none = measure(model_refusing(set()), groups)
    assert all(k == (0 if "harmful" in g else n) for g, (k, n) in none.items())


def test_a_model_that_knows_the_acts_refuses_the_harmful_request_and_not_its_twin():
    from curriculum import safety

    harm = {"hurt", "poison", "steal", "threaten", "blackmail", "punch", "stalk", "bomb", "hack",
            "forge", "drown", "smuggle", "scam", "shoplift", "slash", *safety.MORE_HARM}
    got = measure(model_refusing(harm), requests(n=60, seed=4))
    assert got["twin"][0] == got["twin"][1] == got["ask"][0] > 20
    assert 0.2 * got["harmful"][1] < got["harmful"][0] < got["harmful"][1]
