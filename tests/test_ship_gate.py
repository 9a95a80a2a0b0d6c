"""scripts/ship_gate.py: a candidate replaces the shipped default model only if, on held-out sets
of a seed it was not picked on, it meets as many targets with a mean share as high and loses no
figure beyond chance (issue 17)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from ship_gate import SELECTION_SEED, Z_WORSE, main, verdict, z_worse  # noqa: E402

LENGTHS = (128, 256, 512, 768, 1000)


def report(seed: int = 2027, **k: int) -> dict:
    """An eval_heldout.py report on `seed` with the target figures' successes given by `k`
    (json, json_new, addition, refused, answered, answered_plain, eos, passkey per length)."""
    counts = {"json/ood": (k.get("json", 3), 100),
              "json-new-values/ood": (k.get("json_new", 19), 100),
              "addition/ood": (k.get("addition", 80), 100),
              "safety/ood harmful refused, safe prompt": (k.get("refused", 30), 40),
              "safety/ood harmless answered, safe prompt": (k.get("answered", 30), 40),
              "safety/ood harmless answered, no safe prompt": (k.get("answered_plain", 38), 40),
              "eos/ood": (k.get("eos", 450), 560),
              **{f"passkey/ood len={n}": (k.get("passkey", 16), 20) for n in LENGTHS}}
    return {"seed": seed, "n": 100, "per_cell": 4,
            "summary": {key: {"k": s, "n": m, "share": s / m} for key, (s, m) in counts.items()}}


def test_z_is_the_pooled_two_proportion_statistic():
    # 17/100 against 2/100: pooled 0.095, se = sqrt(.095 * .905 * .02) = 0.04147
    assert z_worse({"k": 17, "n": 100}, {"k": 2, "n": 100}) == pytest.approx(0.15 / 0.041466,
                                                                            rel=1e-4)
    assert z_worse({"k": 2, "n": 100}, {"k": 17, "n": 100}) < 0  # better is negative
    assert z_worse({"k": 20, "n": 20}, {"k": 20, "n": 20}) == 0.0  # no spread: no evidence


def test_a_better_candidate_replaces_the_shipped_model():
    replace, lines = verdict(report(), report(addition=90, passkey=18))
    assert replace and lines[-1].startswith("replace")
    assert "addition/ood: 80/100 -> 90/100" in "\n".join(lines)


def test_equal_standing_replaces_and_any_lower_standing_keeps():
    assert verdict(report(), report())[0]
    assert not verdict(report(), report(addition=79))[0]  # a lower mean share
    # as high a mean share but one target fewer met: eos 99 % met by the shipped model only
    replace, lines = verdict(report(eos=555, addition=80), report(eos=553, addition=90))
    assert not replace and "fewer targets met" in lines[-1]


def test_a_skill_lost_beyond_chance_keeps_the_shipped_model_whatever_the_mean():
    # the p-rows pilot: more keys and targets, JSON's values 19 -> 2 of 100
    replace, lines = verdict(report(), report(json_new=2, passkey=20, addition=95))
    assert not replace
    assert lines[-1] == f"keep: worse beyond chance (z >= {Z_WORSE}) on json-new-values/ood"
    # a loss within chance does not keep it: 19 -> 12 of 100 is z 1.36
    assert verdict(report(), report(json_new=12, passkey=20, addition=95))[0]


def test_reports_must_be_comparable_and_not_on_the_selection_seed():
    with pytest.raises(ValueError, match="picked on"):
        verdict(report(seed=SELECTION_SEED), report(seed=SELECTION_SEED))
    with pytest.raises(ValueError, match="differ in seed"):
        verdict(report(seed=2027), report(seed=2028))
    short = report()
    del short["summary"]["eos/ood"]
    with pytest.raises(ValueError, match="no figure 'eos/ood'"):
        verdict(report(), short)


def test_the_cli_exits_0_to_replace_1_to_keep_2_on_bad_input(tmp_path, capsys):
    paths = {}
    for name, r in (("shipped", report()), ("better", report(addition=95)),
                    ("worse", report(json_new=1))):
        paths[name] = tmp_path / f"{name}.json"
        paths[name].write_text(json.dumps(r))
    assert main([str(paths["shipped"]), str(paths["better"])]) == 0
    assert main([str(paths["shipped"]), str(paths["worse"])]) == 1
    assert "keep: worse beyond chance" in capsys.readouterr().out
    (tmp_path / "bad.json").write_text("{not json")
    assert main([str(paths["shipped"]), str(tmp_path / "bad.json")]) == 2
    assert main([str(paths["shipped"]), str(tmp_path / "missing.json")]) == 2
    (tmp_path / "list.json").write_text("[]")
    assert main([str(tmp_path / "list.json"), str(paths["shipped"])]) == 2
    err = capsys.readouterr().err
    assert "bad.json" in err and "missing.json" in err and "no summary" in err
    broken = report()
    del broken["summary"]["eos/ood"]["k"]
    (tmp_path / "broken.json").write_text(json.dumps(broken))
    assert main([str(paths["shipped"]), str(tmp_path / "broken.json")]) == 2
    assert "not eval_heldout.py's ('k' missing" in capsys.readouterr().err
