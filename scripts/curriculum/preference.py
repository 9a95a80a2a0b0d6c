#!/usr/bin/env python3
"""Held-out preference accuracy of the final SFT model and of the DPO model on curriculum pairs:
the share of pairs whose chosen answer the model finds likelier than the rejected one. Issue
17 asks that DPO raise it above SFT's; if it does not, the better stage is shipped.

    python scripts/curriculum/preference.py SFT DPO [--n 600] [--seed 1017] [--json OUT]

The pairs come from scripts/build_curriculum.py on another seed than training (the same
generator and training value lists: in distribution, held out by seed), without the corpus.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from build_curriculum import build  # noqa: E402
from eval_default import preference_accuracy  # noqa: E402

import mixtral  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sft", help="the final SFT checkpoint (DPO's reference)")
    p.add_argument("dpo", help="the DPO checkpoint")
    p.add_argument("--n", type=int, default=600, help="conversations drawn for the pairs")
    p.add_argument("--seed", type=int, default=1017, help="not the training seed (10)")
    p.add_argument("--json", type=Path, help="write the report here too")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        build(Path(tmp), None, a.n, a.seed, 1024)
        pairs = Path(tmp) / "dpo.jsonl"
        count = sum(1 for _ in pairs.open())
        report = {"pairs": count, "seed": a.seed,
                  **{name: preference_accuracy(mixtral.load(path).eval(), pairs)
                     for name, path in (("sft", a.sft), ("dpo", a.dpo))}}
    report["dpo_above_sft"] = report["dpo"] > report["sft"]
    text = json.dumps(report, indent=2)
    print(text)
    if a.json:
        a.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
