"""scripts/curriculum/induction.py: the probe's figures on models whose answers are known."""

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts" / "curriculum"))

from induction import lacking, probe, spans  # noqa: E402

V = 50


def copier(x: torch.Tensor) -> torch.Tensor:
    """Uniform over the vocabulary on the first showing, certain of the repeat."""
    logits = torch.zeros(*x.shape, V)
    length = (x.shape[1] - 1) // 2
    logits[:, length:-1].scatter_(2, x[:, length + 1:, None], 1e4)
    return logits


def test_a_copier_has_induction_and_a_uniform_model_has_none():
    x = spans(range(3, V), n=4, length=10, seed=1)
    assert x.shape == (4, 21) and torch.equal(x[:, 1:11], x[:, 11:])
    got = probe(copier, x)
    assert abs(got["first"] - math.log(V)) < 1e-3
    assert got["repeat"] < 1e-3 and got["repeat_accuracy"] == 1.0
    uniform = probe(lambda t: torch.zeros(*t.shape, V), x)
    for showing in ("first", "repeat"):
        assert abs(uniform[showing] - math.log(V)) < 1e-3


def test_the_gate_names_the_checkpoints_without_induction():
    x = spans(range(3, V), n=4, length=10, seed=1)
    report = {"copier": {"corpus": probe(copier, x)},
              "uniform": {"corpus": probe(lambda t: torch.zeros(*t.shape, V), x)}}
    assert lacking(report, 0.5) == ["uniform"]
    assert lacking(report, 1.01) == []  # the uniform model's repeat equals its first showing
