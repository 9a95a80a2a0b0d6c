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


def test_a_path_that_is_no_checkpoint_is_named_in_one_line(tmp_path):
    import subprocess
    corpus = tmp_path / "val"
    corpus.mkdir()
    (corpus / "a.txt").write_text("Some plain text to take token frequencies from.\n")
    script = Path(__file__).resolve().parents[1] / "scripts" / "curriculum" / "induction.py"
    r = subprocess.run([sys.executable, str(script), str(tmp_path / "step-002000"),
                        "--corpus", str(corpus)], capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and "step-002000" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_the_gate_names_the_checkpoints_without_induction():
    x = spans(range(3, V), n=4, length=10, seed=1)
    report = {"copier": {"corpus": probe(copier, x)},
              "uniform": {"corpus": probe(lambda t: torch.zeros(*t.shape, V), x)}}
    assert lacking(report, 0.5) == ["uniform"]
    assert lacking(report, 1.01) == []  # the uniform model's repeat equals its first showing


def test_the_pilot_batches_losses_and_head_readout():
    """scripts/curriculum/induction_pilot.py: the repeat is masked exactly; the loss with no
    sampling is the full softmax's on those pieces, and the sampled one estimates it; reading
    the heads leaves the model's attention as it was."""
    import argparse
    import random

    import induction_pilot as pilot
    import torch.nn.functional as F

    import mixtral.model as model_module

    x, mask = pilot.batch(random.Random(0), 6, 32)
    assert x.shape == mask.shape == (6, 33) and (x[:, 0] == 1).all()
    for row, m in zip(x, mask, strict=True):
        n = int(m.sum())
        assert 8 <= n <= 15 and m[n + 1:2 * n + 1].all()  # the repeat follows the first showing
        assert torch.equal(row[1:n + 1], row[n + 1:2 * n + 1])
    torch.manual_seed(0)
    model = pilot.build(argparse.Namespace(dim=64, layers=2, heads=2, seed=0, shared=1.0))
    rows = model.tok_embeddings.weight
    assert torch.allclose(rows.norm(dim=1), torch.ones(len(rows)))
    assert model.output.weight is rows and not rows.requires_grad
    with torch.no_grad():
        full = pilot.loss_on_repeats(model, x, mask, 0)
        logits = model(x[:, :-1])
        want = F.cross_entropy(logits[mask[:, 1:]], x[:, 1:][mask[:, 1:]])
        assert torch.allclose(full, want, atol=1e-5)
        sampled = pilot.loss_on_repeats(model, x, mask, 4096)
        assert abs(sampled.item() - full.item()) < 0.05  # near-uniform at init: a close estimate
        model.norm.weight.fill_(30.0)  # far from uniform: the targets' own logits matter
        full = pilot.loss_on_repeats(model, x, mask, 0)
        exact = pilot.loss_on_repeats(model, x, mask, 32000)  # all of the rest: the full loss
        assert full.item() > 1 and torch.allclose(exact, full, atol=1e-4)
        before = model(x[:, :-1])
    r = pilot.measure(model, pilot.probe_rows())  # induction.py's probe, the model left training
    assert model.training and set(r) == {"first", "repeat", "repeat_accuracy"}
    sdpa = F.scaled_dot_product_attention
    found = pilot.heads(model, pilot.probe_rows())
    assert model_module.F.scaled_dot_product_attention is sdpa
    assert len(found) == 4 and all(0 <= r[k] <= 1 for r in found for k in ("prev", "induct"))
    with torch.no_grad():
        assert torch.equal(model(x[:, :-1]), before)
