"""scripts/ship_default.py's rule for which stage ships (issue 17: DPO only if it raises held-out
preference accuracy above SFT's and is no worse on the held-out task figures) and the card's
targets table (a share below its target is "not met", never rounded up). The whole script runs
on the dry run's outputs in tests/test_train_default.py, which trains them once."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from card_why import why_section  # noqa: E402
from curriculum import ORDER  # noqa: E402
from default_card import Inputs, targets_table  # noqa: E402
from eval_heldout import wilson  # noqa: E402
from ship_default import choose, main  # noqa: E402
from ship_gate import standing, target_figures  # noqa: E402

LENGTHS = (128, 256, 512, 768, 1000)


def report(json_k: int = 95, passkey_k: int = 18, eos_k: int = 100, n: int = 100) -> dict:
    """An eval_heldout.py report: the target figures with k of n (passkey: k of 20 a length)."""
    counts = {"json/ood": (json_k, n), "json/id": (n, n), "json-new-values/ood": (json_k, n),
              "addition/ood": (80, n), "eos/ood": (eos_k, n),
              "safety/ood harmful refused, safe prompt": (18, 20),
              "safety/ood harmless answered, safe prompt": (18, 20),
              "safety/ood harmless answered, no safe prompt": (19, 20),
              **{f"passkey/ood len={length}": (passkey_k, 20) for length in LENGTHS}}
    return {"summary": {key: {"k": k, "n": m, "share": round(k / m, 4),
                              "ci95": list(wilson(k, m))} for key, (k, m) in counts.items()},
            "model": "test", "command": "python scripts/eval_heldout.py"}


def test_target_figures_are_the_issues_with_one_passkey_figure_per_length():
    figures = dict(target_figures(report()["summary"]))
    assert [k for k in figures if k.startswith("passkey")] == [
        f"passkey/ood len={length}" for length in LENGTHS]
    assert figures["json/ood"] == 0.95 and figures["eos/ood"] == 0.99
    assert figures["safety/ood harmless answered, no safe prompt"] == 0.95
    assert len(figures) == 7 + len(LENGTHS)
    assert standing(report()["summary"]) == pytest.approx(
        {"met": 12, "of": 12, "mean": (0.95 * 2 + 0.8 + 1 + 0.9 * 7 + 0.95) / 12})


def test_dpo_ships_only_if_it_prefers_better_and_is_no_worse_on_the_tasks():
    better, same = {"sft": 0.80, "dpo": 0.85, "pairs": 200}, {"sft": 0.8, "dpo": 0.8,
                                                               "pairs": 200}
    assert choose(better, report(), report())[0] == "dpo"
    stage, why = choose(same, report(), report())  # not strictly above SFT's
    assert stage == "final" and "did not raise preference accuracy" in why
    # better preferences, but one target fewer met (json 94/100 vs 95/100)
    stage, why = choose(better, report(json_k=94), report())
    assert stage == "final" and "worse on the held-out tasks" in why
    # as many targets met, but a lower mean share
    assert choose(better, report(passkey_k=19), report(passkey_k=20))[0] == "final"
    assert choose(better, report(passkey_k=20), report(passkey_k=19))[0] == "dpo"
    stage, why = choose(same, report(), report(), forced="dpo")
    assert stage == "dpo" and "chosen by hand" in why


def card_inputs(shipped: dict, before: dict, base_ppl: float, ppl: float) -> Inputs:
    curve = [{"length": n, "perplexity": ppl} for n in (128, 1024)]
    base = [{"length": n, "perplexity": base_ppl} for n in (128, 1024)]
    return Inputs(stage="dpo", why="", checkpoint=Path("x"), stages={},
                  heldout={"dpo": shipped}, preference={}, before=before, before_path="",
                  in_distribution={}, passkey={}, perplexity={"curve": curve},
                  base_perplexity={"curve": base}, routing={}, routing_table="", commands={},
                  tasks={}, manifest={}, eval_root=Path("eval"), induction={})


def test_the_targets_table_says_not_met_below_a_target_without_rounding_up():
    table, missed = targets_table(card_inputs(report(json_k=949, eos_k=1000, n=1000),
                                              report(json_k=0), 100.0, 150.0))
    row = next(line for line in table.splitlines() if line.startswith("| exact JSON from"))
    assert row == ("| exact JSON from the given fields and values | ≥ 95 % | 100.0 % "
                   "(1000/1000; 100–100) | 94.9 % (949/1000; 93–96) | 0.0 % (0/100; 0–4) | "
                   "**not met** |")
    assert "exact JSON from the given fields and values" in missed
    assert "passkey at every length | all ≥ 90 % | | 5 of 5 lengths | | met |" in table
    assert "plain-text perplexity" not in missed  # 1.5x exactly is within 1.5x
    _, missed = targets_table(card_inputs(report(passkey_k=17), report(), 100.0, 150.1))
    assert "plain-text perplexity" in missed
    assert [m for m in missed if m.startswith("passkey")] == [
        "passkey at every length (0 of 5 met)"]


def fake_runs(runs: Path, dpo_first_loss: float = 0.6931) -> None:
    """Every stage finished (metrics and a latest step folder) and the DPO model evaluated."""
    for stage in ORDER:
        (runs / stage / "step-000002").mkdir(parents=True)
        (runs / stage / "latest").write_text("step-000002\n")
        first = dpo_first_loss if stage == "dpo" else 3.0
        (runs / stage / "metrics.jsonl").write_text(
            f'{{"step": 1, "loss": {first}, "step_seconds": 1.0, "tokens_per_s": 10.0}}\n'
            '{"step": 2, "loss": 0.5, "step_seconds": 1.0, "tokens_per_s": 10.0}\n')
    (runs / "eval").mkdir()
    (runs / "eval" / "heldout.json").write_text(json.dumps(report()))


def test_shipping_without_the_sft_stages_held_out_figures_says_what_to_run(tmp_path, capsys):
    fake_runs(tmp_path / "runs")
    assert main(["--runs", str(tmp_path / "runs"), "--dst", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"ship_default.py: {tmp_path / 'runs' / 'eval' / 'final' / 'heldout.json'} "
                   "is missing: scripts/eval_stage.sh MODEL OUT writes it")
    assert not (tmp_path / "out").exists()


def test_a_dpo_run_that_did_not_start_at_ln_2_is_refused(tmp_path, capsys):
    fake_runs(tmp_path / "runs", dpo_first_loss=0.5)
    assert main(["--runs", str(tmp_path / "runs"), "--dst", str(tmp_path / "out")]) == 2
    assert "DPO's first loss is 0.5000, not ln 2" in capsys.readouterr().err


def test_a_run_without_metrics_is_refused_in_one_line(tmp_path, capsys):
    assert main(["--runs", str(tmp_path / "runs"), "--dst", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "metrics.jsonl is missing" in err
    assert not (tmp_path / "out").exists()


def test_the_why_section_explains_each_missed_target_from_the_report():
    """Nothing when every figure it explains is met; a missed one gets its paragraph, with
    the report's own figures (the twin split, each passkey length, where answers ran long)."""
    met = report()
    met["summary"] |= {"addition/ood": {"k": 80, "n": 100, "share": 0.8, "ci95": [0.7, 0.9]},
                       "eos/ood": {"k": 99, "n": 100, "share": 0.99, "ci95": [0.9, 1.0]}}
    assert why_section(met) == ""
    assert why_section(met, (512, 100.0, 150.0)) == ""  # 1.5x is within the target
    assert "**Perplexity.** 160.9 against the base's 98.2 at 512\ntokens (1.64x)" in why_section(
        met, (512, 98.2, 160.9))
    missed = report(json_k=40, passkey_k=12, eos_k=90)
    missed["summary"]["json-new-values/ood fields copied (twin)"] = {
        "k": 79, "n": 243, "share": 0.3251, "ci95": [0.27, 0.39]}
    missed["rows"] = [{"set": "json/ood", "finish": "length"}] * 2 + [
        {"set": "json/ood", "finish": "length", "answer": '{"phone": "+32 72 738 738 738'},
        {"set": "passkey/ood", "finish": "length", "answer": "The pass key is 5597592"},
        {"set": "json/ood", "finish": "stop"}, {"set": "json/id", "finish": "length"}]
    text = why_section(missed)
    assert text.startswith("## Why the missed targets are missed")
    assert "**JSON.**" in text and "79/243 (33 %)" in text
    assert "**Passkeys.**" in text and "128 tokens 12/20 (60 %)" in text
    assert "(json/ood 3, passkey/ood 1), 1 of them in a" in text  # out of distribution only
    assert "**Sums.**" not in text and "**The safe prompt.**" not in text


def test_the_card_takes_the_warm_up_that_passed_the_probe(tmp_path):
    """After a retry the circuit is in induction-seedN/, and the probe's file says so."""
    from ship_default import warm_up

    runs = tmp_path / "runs"
    assert warm_up(runs) == runs / "induction"
    (runs / "eval").mkdir(parents=True)
    (runs / "eval" / "induction-warmup.json").write_text(
        json.dumps({"runs/d15/induction-seed1/step-004000": {"corpus": {}}}))
    assert warm_up(runs) == runs / "induction-seed1"


def test_the_why_section_quotes_how_far_the_model_separates_harm():
    missed = report()
    missed["summary"]["safety/ood harmless answered, safe prompt"] = {
        "k": 19, "n": 40, "share": 0.475, "ci95": [0.33, 0.63]}
    assert "AUC" not in why_section(missed)  # a report from before the separation figure
    missed["separation"] = {"safe prompt": {
        "auc": 0.626, "ci95": [0.503, 0.748], "harmful": 40, "harmless": 40,
        "best_threshold": {"harmful refused": 24, "harmless answered": 28}}}
    text = why_section(missed)
    assert "**The safe prompt.**" in text
    assert "AUC 0.63\n(95 % interval 0.50–0.75; 0.5 is none)" in text
    assert "refuses 24/40 harmful requests where it\nanswers 28/40 harmless ones" in text


def test_the_card_states_how_the_other_draws_of_the_shipped_stage_stood():
    from ship_default import draws

    shipped, other = report(passkey_k=19), report(passkey_k=16)
    other["model"] = "runs/d24/final/step-000400"
    assert draws(shipped, {}) == ""
    text = draws(shipped, {"seed13.json": other})
    mine, theirs = standing(shipped["summary"]), standing(other["summary"])
    assert mine["met"] > theirs["met"]
    assert text.startswith("This stage is the best of 2 draws of its recipe")
    assert (f"it meets {mine['met']} of {mine['of']} target figures (mean share "
            f"{100 * mine['mean']:.1f} %); `seed13.json` (runs/d24/final/step-000400) meets "
            f"{theirs['met']} (mean share {100 * theirs['mean']:.1f} %).") in text


def test_a_confirmed_stage_ships_with_the_gates_verdict_and_a_kept_one_does_not(tmp_path):
    from ship_default import ShipError, confirmation

    checkpoint = tmp_path / "final" / "step-000400"
    checkpoint.mkdir(parents=True)

    def on_fresh_sets(**k: int) -> dict:
        return {**report(**k), "seed": 2027, "n": 100, "per_cell": 4, "model": str(checkpoint)}

    shipped, better = on_fresh_sets(passkey_k=16), on_fresh_sets(passkey_k=19)
    text = confirmation(shipped, better, checkpoint)
    mine, theirs = standing(better["summary"]), standing(shipped["summary"])
    assert text == (
        "Against the model it replaces, on held-out sets of a seed it was not picked on "
        "(`scripts/eval_heldout.py --n 100 --seed 2027`), it meets "
        f"{mine['met']} of 12 target figures against {theirs['met']} (mean share "
        f"{100 * mine['mean']:.1f} against {100 * theirs['mean']:.1f} %), no figure worse beyond "
        "chance: `scripts/ship_gate.py`'s rule for replacing the shipped model.")
    # keys up, JSON down from 95 to 60 of 100: the mean rises, a skill is lost
    with pytest.raises(ShipError, match="keeps the shipped model: keep: worse beyond chance"):
        confirmation(shipped, on_fresh_sets(json_k=60, passkey_k=20, eos_k=100), checkpoint)
    with pytest.raises(ShipError, match="measured runs/other, not the stage being shipped"):
        confirmation(shipped, {**better, "model": "runs/other"}, checkpoint)
    with pytest.raises(ValueError, match="picked on"):  # the selection seed confirms nothing
        confirmation({**shipped, "seed": 17}, {**better, "seed": 17}, checkpoint)
