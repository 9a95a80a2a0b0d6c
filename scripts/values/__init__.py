"""Value lists split between training and evaluation, so that held-out figures measure a skill
and not the memory of a list (issue 17).

`train.json` and `eval.json` beside this file are built once by `scripts/build_values.py` from
the Faker library's locales (MIT): training draws on one set of locales, evaluation on a
disjoint set, and every evaluation value that also occurs in the training lists (compared
case-insensitively), among the hand-written lists of `scripts/build_instruct_data.py`, or that
the made-up-word generator of that script could produce, is dropped. The lists are committed,
not rebuilt at training time, so that a newer Faker cannot move the split.

The training generators (`build_instruct_data.py`, `build_curriculum.py`) read only
`load("train")`; the evaluation generator (`heldout/`) reads only `load("eval")`;
tests/test_values.py checks both the disjointness and that no generator crosses over.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

HERE = Path(__file__).resolve().parent
SPLITS = ("train", "eval")
# what each list holds; every split has every kind
KINDS = ("first", "last", "street", "city", "country", "job", "company", "domain", "word")


@cache
def load(split: str) -> dict[str, list[str]]:
    """The value lists of one split: kind -> sorted distinct values."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    data = json.loads((HERE / f"{split}.json").read_text(encoding="utf-8"))
    return {kind: data["values"][kind] for kind in KINDS}


def provenance(split: str) -> dict[str, object]:
    """How the split was built: Faker version, locales, counts."""
    data = json.loads((HERE / f"{split}.json").read_text(encoding="utf-8"))
    return {k: v for k, v in data.items() if k != "values"}
