#!/usr/bin/env python3
"""Whether a candidate default model replaces the shipped one (issue 17): the rule, stated before
any candidate is measured by it, and its verdict on two `scripts/eval_heldout.py` reports.

    python scripts/eval_heldout.py --n 200 --seed 2027 --json shipped.json
    python scripts/eval_heldout.py --n 200 --seed 2027 --model CANDIDATE --dtype bf16 --json c.json
    python scripts/ship_gate.py shipped.json c.json      # exit 0: replace; 1: keep the shipped

Candidates are picked on the held-out sets' usual seed (17); picking one of several on the sets
that measure them flatters its figures (two draws of one recipe differ by ~3 points of mean
share), so the pick is confirmed on sets it was not picked on: both reports on one seed other than
17, made the same way (--n, --per-cell). It replaces the shipped model only if
  1. it meets at least as many of the issue's targets, and its mean share over the target
     figures (standing, below) is at least the shipped model's; and
  2. no target figure is worse by more than chance: the one-sided two-proportion z (pooled) of
     shipped over candidate stays below Z_WORSE (p < 0.01 for each figure). A gain in the mean
     cannot buy the loss of a skill (runs/p-rows met 4 targets to the shipped model's 3 and
     wrote 2 of 100 new JSON values to its 17).
The ten fixed records of tests/test_default_model.py are not part of the rule: at a share near
18 % ten records cannot tell models apart (runs/d13 3 of 10 and 20 of 100, runs/d18 2 and 17,
runs/d24b 1 and 19). They hold the shipped weights to their own count under the code, and take
the new model's count when it ships. The safety sets draw 40 requests a group from pools of
120 (scripts/heldout/requests.json), so another seed asks about two in three requests the
selection did not (until 7 December 2026 the pools held 40, and a confirmation repeated them).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from eval_heldout import TARGETS

SELECTION_SEED = 17  # eval_heldout.py's default: the seed candidates are picked on
Z_WORSE = 2.326      # one-sided p = 0.01


def target_figures(summary: dict[str, Any]) -> list[tuple[str, float]]:
    """The issue's out-of-distribution targets as (summary key, least share); a target over
    every passkey length ("*") becomes one figure per length measured."""
    out = []
    for (name, group), least in TARGETS.items():
        if group == "*":
            out += sorted(((k, least) for k in summary if k.startswith(f"{name} len=")),
                          key=lambda kv: int(kv[0].rsplit("=", 1)[1]))
        else:
            out.append((f"{name} {group}".strip(), least))
    return out


def standing(summary: dict[str, Any]) -> dict[str, float]:
    """How a model stands on the target figures: how many it meets and its mean share."""
    figures = target_figures(summary)
    shares = [summary[k]["share"] if k in summary else 0.0 for k, _ in figures]
    met = sum(share >= least for share, (_, least) in zip(shares, figures, strict=True))
    return {"met": met, "of": len(figures), "mean": sum(shares) / len(shares)}


def z_worse(shipped: dict[str, Any], candidate: dict[str, Any]) -> float:
    """How far the candidate's share is below the shipped model's, in pooled standard errors."""
    k1, n1, k2, n2 = shipped["k"], shipped["n"], candidate["k"], candidate["n"]
    pooled = (k1 + k2) / (n1 + n2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    return 0.0 if se == 0 else (k1 / n1 - k2 / n2) / se


def verdict(shipped: dict[str, Any], candidate: dict[str, Any]) -> tuple[bool, list[str]]:
    """(replace?, the lines that say why) for two eval_heldout.py reports."""
    for field in ("seed", "n", "per_cell"):
        if shipped.get(field) != candidate.get(field):
            raise ValueError(f"the reports differ in {field}: {shipped.get(field)} and "
                             f"{candidate.get(field)}; measure both the same way")
    if shipped.get("seed") == SELECTION_SEED:
        raise ValueError(f"the reports are on seed {SELECTION_SEED}, the one candidates are "
                         "picked on; confirm on another (eval_heldout.py --seed)")
    s, c = shipped["summary"], candidate["summary"]
    lines, worse = [], []
    for key, least in target_figures(s):
        if key not in c:
            raise ValueError(f"the candidate's report has no figure {key!r}")
        z = z_worse(s[key], c[key])
        lines.append(f"{key}: {s[key]['k']}/{s[key]['n']} -> {c[key]['k']}/{c[key]['n']} "
                     f"(target {round(100 * least)} %, z {z:+.2f})")
        if z >= Z_WORSE:
            worse.append(key)
    a, b = standing(s), standing(c)
    lines.append(f"targets met: {a['met']} -> {b['met']} of {a['of']}; mean share "
                 f"{100 * a['mean']:.1f} -> {100 * b['mean']:.1f} %")
    ok_standing = b["met"] >= a["met"] and b["mean"] >= a["mean"]
    if not ok_standing:
        lines.append("keep: fewer targets met or a lower mean share")
    if worse:
        lines.append(f"keep: worse beyond chance (z >= {Z_WORSE}) on {', '.join(worse)}")
    replace = ok_standing and not worse
    if replace:
        lines.append("replace: as many targets met, a mean share as high, no figure worse "
                     "beyond chance")
    return replace, lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shipped", type=Path, help="eval_heldout.py report of the shipped model")
    p.add_argument("candidate", type=Path, help="eval_heldout.py report of the candidate")
    a = p.parse_args(argv)
    reports = []
    for path in (a.shipped, a.candidate):
        try:
            report = json.loads(path.read_text())
            if not isinstance(report, dict) or not isinstance(report.get("summary"), dict):
                raise ValueError("not an eval_heldout.py report (no summary)")
        except (OSError, ValueError) as e:
            print(f"ship_gate: {path}: {e}", file=sys.stderr)
            return 2
        reports.append(report)
    try:
        replace, lines = verdict(*reports)
    except ValueError as e:
        print(f"ship_gate: {e}", file=sys.stderr)
        return 2
    except (KeyError, TypeError) as e:  # a figure without its k and n
        print(f"ship_gate: a report's figures are not eval_heldout.py's ({e} missing or "
              "malformed); measure both with scripts/eval_heldout.py", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0 if replace else 1


if __name__ == "__main__":
    sys.exit(main())
