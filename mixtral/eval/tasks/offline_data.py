"""Loaders for the offline tasks: `custom_dataset: !function offline_data.<name>` in their YAMLs.

lm-eval calls a task's `custom_dataset` with the task's metadata and `dataset_kwargs` as keyword
arguments (e.g. `version`, and the model_args it was run with); none of them changes the data.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets

HERE = Path(__file__).parent


def _splits(file_name: str) -> datasets.DatasetDict:
    """{split: [row, ...]} in a JSON file next to this module -> a DatasetDict."""
    data = json.loads((HERE / file_name).read_text(encoding="utf-8"))
    return datasets.DatasetDict({split: datasets.Dataset.from_list(rows)
                                 for split, rows in data.items()})


def mc_demo(**_: Any) -> datasets.DatasetDict:
    return _splits("mc_demo.json")


def arith_demo(**_: Any) -> datasets.DatasetDict:
    return _splits("arith_demo.json")


def ppl_demo(**_: Any) -> datasets.DatasetDict:
    return _splits("ppl_demo.json")
