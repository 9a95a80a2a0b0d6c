#!/usr/bin/env python3
"""Package the default model that scripts/train_default.sh trained (issue 17's curriculum) into
mixtral/data/default/: its bf16 weights in the layout `mixtral.load` and the CLI read
(config.json + model.safetensors) and MODEL_CARD.md, every figure taken from the run's files.

    python scripts/ship_default.py [--runs runs/default] [--corpus data/corpus]
        [--curriculum data/curriculum] [--before scripts/heldout/results-shipped.json]
        [--stage auto|final|dpo] [--dst mixtral/data/default] [--other-draw REPORT ...]
        [--confirm SHIPPED CANDIDATE]

Which stage ships is decided by measurement (issue 17, item 2). DPO ships only if
  1. its held-out preference accuracy (eval/preference.json: curriculum pairs drawn on another
     seed than training) is strictly above the final SFT stage's, and
  2. it is no worse on the issue's out-of-distribution target figures (eval/heldout.json for
     DPO, eval/final/heldout.json for SFT; scripts/eval_stage.sh writes both): it meets at
     least as many targets, and its mean share over those figures is at least SFT's.
Otherwise the final SFT checkpoint ships, and the card says so and why. `--stage final|dpo`
overrides the rule; the card then says the stage was chosen by hand.
Whether the packaged model replaces the one shipped is another rule, `scripts/ship_gate.py`'s
(on held-out sets of a seed the candidate was not picked on).

Reads, under --runs: <stage>/metrics.jsonl and <stage>/latest for induction, pretrain, copy,
json, skills, sums, numbers, requests, final and dpo (steps, minutes from step_seconds, last train
and held-out loss; DPO's first loss, which must be ln 2); eval/ (the DPO model) and eval/final/
(the SFT model): heldout.json, passkey.json, perplexity.json, routing.json, induction.json and
their figures; eval/base/perplexity.json (the pretrained base); eval/induction-warmup.json and
eval/induction-base.json (the induction probe); eval/preference.json; eval/dpo.json and
eval/sft.json where present (scripts/eval_default.py).
Also the curriculum's tasks.json, the corpus manifest and --before, the held-out report of the
model being replaced (its out-of-distribution figures are the card's "before" column): before
shipping, measure the shipped model into scripts/heldout/results-shipped.json
(`python scripts/eval_heldout.py --json scripts/heldout/results-shipped.json`), so that the file
and the card it is cited by change in the same commit. Where the
shipped stage is one of several draws of its recipe (other seeds), each picked by the same
held-out sets, --other-draw names the others' eval_heldout.py reports: the card states how
each stood, since picking one draw on the sets that measure it flatters its figures.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
from functools import partial
from pathlib import Path
from typing import Any

from curriculum import ORDER
from default_card import Inputs, card
from ship_gate import standing, verdict

import mixtral
from mixtral.atomic import atomic_write, atomic_write_text
from mixtral.checkpoint import save

ROOT = Path(__file__).resolve().parents[1]

MAX_BYTES = 80 * 10**6  # what the repository carries
PICTURES = ("passkey.png", "perplexity.png", "routing.png", "routing_repetition.png")


class ShipError(Exception):
    """A file the card needs is missing or wrong: the message says which and what to run."""


def read_json(path: Path, how: str = "") -> Any:
    if not path.exists():
        raise ShipError(f"{path} is missing" + (f": {how}" if how else ""))
    return json.loads(path.read_text())


def stage_summary(run: Path) -> dict[str, Any]:
    """Steps, wall minutes (every logged step, redone ones after a resume included), the last
    train loss and held-out loss, the first loss, and the final checkpoint of one stage."""
    rows = [json.loads(line) for line in
            read_json_lines(run / "metrics.jsonl", "scripts/train_default.sh writes it")]
    latest = run / (run / "latest").read_text().strip() if (run / "latest").exists() else None
    if latest is None or not latest.is_dir():
        raise ShipError(f"{run}: no finished checkpoint (no latest step-N folder)")
    evals = [r for r in rows if "eval_loss" in r]
    return {"steps": rows[-1]["step"], "checkpoint": latest,
            "minutes": sum(r["step_seconds"] for r in rows) / 60,
            "tokens": sum(r["tokens_per_s"] * r["step_seconds"] for r in rows),
            "first_loss": rows[0]["loss"], "final_loss": rows[-1]["loss"],
            "final_eval_loss": evals[-1]["eval_loss"] if evals else None,
            "last_eval": evals[-1] if evals else {}}


def read_json_lines(path: Path, how: str) -> list[str]:
    if not path.exists():
        raise ShipError(f"{path} is missing: {how}")
    return [line for line in path.read_text().splitlines() if line.strip()]


def choose(preference: dict[str, Any], dpo: dict[str, Any], sft: dict[str, Any],
           forced: str = "auto") -> tuple[str, str]:
    """("dpo" or "final", why) by the rule in this file's docstring (or by hand)."""
    d, s = standing(dpo["summary"]), standing(sft["summary"])
    figures = (f"out of distribution DPO meets {d['met']} of {d['of']} target figures "
               f"(mean share {100 * d['mean']:.1f} %), SFT {s['met']} "
               f"(mean {100 * s['mean']:.1f} %)")
    prefs = (f"held-out preference accuracy DPO {100 * preference['dpo']:.1f} % vs SFT "
             f"{100 * preference['sft']:.1f} % ({preference['pairs']} pairs)")
    if forced != "auto":
        return forced, f"chosen by hand (--stage {forced}), not by the rule: {prefs}; {figures}"
    if preference["dpo"] <= preference["sft"]:
        return "final", (f"DPO did not raise preference accuracy above SFT's: {prefs}; "
                         f"{figures}")
    if d["met"] < s["met"] or d["mean"] < s["mean"]:
        return "final", (f"DPO raised preference accuracy ({prefs}) but is worse on the "
                         f"held-out tasks: {figures}")
    return "dpo", f"DPO raised preference accuracy ({prefs}) and is no worse: {figures}"


def draws(shipped: dict[str, Any], others: dict[str, dict[str, Any]]) -> str:
    """The card's sentence on the other draws of the shipped stage ("" when none were made)."""
    if not others:
        return ""
    mine = standing(shipped["summary"])
    each = "; ".join(f"`{name}` ({report['model']}) meets {st['met']} (mean share "
                     f"{100 * st['mean']:.1f} %)" for name, report in others.items()
                     for st in [standing(report["summary"])])
    return (f"This stage is the best of {len(others) + 1} draws of its recipe (other seeds, the "
            f"same data), picked on these held-out sets: it meets {mine['met']} of "
            f"{mine['of']} target figures (mean share {100 * mine['mean']:.1f} %); {each}. "
            "The picking flatters its figures by about that spread.")


UNCONFIRMED = ("It was not measured against the model it replaces on held-out sets of a seed it "
               "was not picked on (`scripts/ship_gate.py`; `ship_default.py --confirm`).")


def confirmation(shipped: dict[str, Any], candidate: dict[str, Any], checkpoint: Path) -> str:
    """The card's sentence on scripts/ship_gate.py's verdict, on sets of a seed the candidate was
    not picked on; a ShipError where the gate keeps the shipped model or the candidate's report
    measured another checkpoint."""
    if Path(str(candidate.get("model"))).resolve() != checkpoint.resolve():
        raise ShipError(f"--confirm: the candidate's report measured {candidate.get('model')}, "
                        f"not the stage being shipped ({checkpoint})")
    replace, lines = verdict(shipped, candidate)
    if not replace:
        raise ShipError(f"scripts/ship_gate.py keeps the shipped model: {lines[-1]}")
    a, b = standing(shipped["summary"]), standing(candidate["summary"])
    return (f"Against the model it replaces, on held-out sets of a seed it was not picked on "
            f"(`scripts/eval_heldout.py --n {candidate['n']} --seed {candidate['seed']}`), it "
            f"meets {b['met']} of {b['of']} target figures against {a['met']} (mean share "
            f"{100 * b['mean']:.1f} against {100 * a['mean']:.1f} %), no figure worse beyond "
            "chance: `scripts/ship_gate.py`'s rule for replacing the shipped model.")


def write_weights(checkpoint: Path, dst: Path) -> tuple[Any, int]:
    """The checkpoint's bf16 copy as config.json + model.safetensors in dst, each file atomic;
    returns (the model's ModelArgs, bytes of weights)."""
    model = mixtral.load(checkpoint, dtype="bf16")
    with tempfile.TemporaryDirectory() as tmp:
        files = save({k: v.detach() for k, v in model.state_dict().items()}, model.args,
                     Path(tmp) / "m")
        size = sum(f.stat().st_size for f in files)
        if size > MAX_BYTES:
            raise ShipError(f"{size / 1e6:.1f} MB of weights exceed the repository's "
                            f"{MAX_BYTES / 1e6:.0f} MB budget")
        dst.mkdir(parents=True, exist_ok=True)
        for f in files:
            atomic_write(dst / f.name, partial(shutil.copyfile, f))
    return model.args, size


def git_commit() -> str:
    """The repository's commit (short; commit the recipe before shipping); "" outside git."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                              capture_output=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def warm_up(runs: Path) -> Path:
    """The warm-up that passed the probe: induction/, or induction-seedN/ after a retry
    (scripts/train_default.sh; the probe's file is keyed by the checkpoint)."""
    probed = runs / "eval" / "induction-warmup.json"
    if not probed.exists():
        return runs / "induction"
    return runs / Path(next(iter(read_json(probed)))).parent.name


def gather(a: argparse.Namespace) -> Inputs:
    runs = Path(a.runs)
    stages = {s: stage_summary(warm_up(runs) if s == "induction" else runs / s) for s in ORDER}
    if abs(stages["dpo"]["first_loss"] - math.log(2)) > 1e-3:
        raise ShipError(f"{runs / 'dpo'}: DPO's first loss is {stages['dpo']['first_loss']:.4f},"
                        " not ln 2 = 0.6931: its policy did not start equal to its reference")
    ev = runs / "eval"
    how = "scripts/eval_stage.sh MODEL OUT writes it"
    heldout = {"dpo": read_json(ev / "heldout.json", how),
               "final": read_json(ev / "final" / "heldout.json", how)}
    preference = read_json(ev / "preference.json", "scripts/curriculum/preference.py writes it")
    stage, why = choose(preference, heldout["dpo"], heldout["final"], a.stage)
    folder = ev if stage == "dpo" else ev / "final"  # Inputs.eval_folder
    return Inputs(
        stage=stage, why=why, checkpoint=stages[stage]["checkpoint"], stages=stages,
        draws=" ".join(filter(None, (
            draws(heldout[stage], {path: read_json(Path(path)) for path in a.other_draw}),
            confirmation(read_json(Path(a.confirm[0])), read_json(Path(a.confirm[1])),
                         stages[stage]["checkpoint"]) if a.confirm else UNCONFIRMED))),
        heldout=heldout, preference=preference, before=read_json(Path(a.before)),
        before_path=a.before,
        in_distribution={s: read_json(ev / f"{s}.json") for s in ("sft", "dpo")
                         if (ev / f"{s}.json").exists()},
        passkey=read_json(folder / "passkey.json", how),
        perplexity=read_json(folder / "perplexity.json", how),
        base_perplexity=read_json(ev / "base" / "perplexity.json",
                                  "scripts/train_default.sh writes it"),
        routing=read_json(folder / "routing.json", how),
        routing_table=(folder / "routing.md").read_text(),
        commands={r["command"]: r for r in map(json.loads, read_json_lines(
            folder / "runs.jsonl", how))},
        tasks=read_json(Path(a.curriculum) / "tasks.json",
                        "scripts/build_curriculum.py writes it"),
        manifest=read_json(Path(a.corpus) / "manifest.json",
                           "scripts/build_corpus.py writes it"),
        eval_root=ev,
        commit=git_commit(),
        induction={label: next(iter(read_json(path, how).values())) for label, path in (
            ("warm-up", ev / "induction-warmup.json"), ("pretrained base",
             ev / "induction-base.json"), (f"shipped ({stage})", folder / "induction.json"))})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", default="runs/default", help="scripts/train_default.sh's RUNS")
    p.add_argument("--corpus", default="data/corpus", help="its CORPUS (manifest.json)")
    p.add_argument("--curriculum", default="data/curriculum", help="its DATA/curriculum")
    p.add_argument("--before", default="scripts/heldout/results-shipped.json",
                   help="scripts/eval_heldout.py's report on the model being replaced")
    p.add_argument("--stage", choices=("auto", "final", "dpo"), default="auto",
                   help="the stage to ship (auto: by the rule in this script's docstring)")
    p.add_argument("--dst", default="mixtral/data/default")
    p.add_argument("--other-draw", action="append", default=[], metavar="REPORT",
                   help="scripts/eval_heldout.py's report on another draw (seed) of the "
                   "shipped stage, picked against by the same held-out sets (repeatable)")
    p.add_argument("--confirm", nargs=2, metavar=("SHIPPED", "CANDIDATE"),
                   help="eval_heldout.py's reports on the shipped model and this stage on a seed "
                   "it was not picked on: ship only if scripts/ship_gate.py replaces the shipped "
                   "model (the card quotes the verdict)")
    a = p.parse_args(argv)
    try:
        inputs = gather(a)
        dst = Path(a.dst)
        args, size = write_weights(inputs.checkpoint, dst)
    except (ShipError, OSError, ValueError) as e:
        print(f"ship_default.py: {e}", file=sys.stderr)
        return 2
    for png in PICTURES:
        if (inputs.eval_folder / png).exists():
            atomic_write(dst / png, partial(shutil.copyfile, inputs.eval_folder / png))
    atomic_write_text(dst / "MODEL_CARD.md", card(inputs, args, size))
    print(f"shipped {inputs.stage}: {inputs.checkpoint} -> {dst} ({size / 1e6:.1f} MB of "
          f"weights, bf16; {inputs.why})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
