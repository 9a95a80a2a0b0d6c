"""Running lm-eval tasks on our model offline: `evaluate` returns the scores as plain JSON,
`go_offline` keeps the libraries off the hub (these machines have none).

Tasks are looked up in the offline tasks shipped with the package (`mixtral/eval/tasks`), then
in the caller's folders, then among lm-eval's bundled tasks (whose data must be local).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lm_eval

import mixtral.eval.harness.adapter  # noqa: F401  (registers model "mixtral" for lm-eval)

TASKS_DIR = Path(__file__).parent.parent / "tasks"


def go_offline(force: bool = True) -> None:
    """No hub access for datasets, metrics or tokenizers (these machines have none). With
    force=False an explicit setting in the environment is kept."""
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        if force:
            os.environ[var] = "1"
        else:
            os.environ.setdefault(var, "1")
    # the libraries read these once, at import: update copies already made
    if "huggingface_hub" in sys.modules:
        import huggingface_hub.constants

        huggingface_hub.constants.HF_HUB_OFFLINE = os.environ["HF_HUB_OFFLINE"] == "1"
    if "datasets" in sys.modules:
        import datasets.config

        offline = os.environ["HF_DATASETS_OFFLINE"] == "1"
        datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = offline


def evaluate(model_path: str | None, tasks: Sequence[str], *, limit: int | None = None,
             num_fewshot: int | None = None, batch_size: int = 1, seed: int = 1234,
             device: str = "cpu", dtype: str | None = None,
             include_path: Sequence[str] | None = None, max_length: int | None = None,
             apply_chat_template: bool = False) -> dict[str, Any]:
    """Run lm-eval `tasks` on our model (a checkpoint, or the default model when model_path is
    None), fully offline, and return the JSON-serialisable part of lm-eval's results:
    `results` ({task: {"<metric>,<filter>": value, ...}}), `groups`, `versions`, `n-shot`,
    `higher_is_better`, `n-samples` and a `config` summary.

    Tasks are looked up in the shipped offline tasks (`mixtral/eval/tasks`), then in
    `include_path` folders, then among lm-eval's bundled tasks (whose data must be local).
    `seed` seeds Python, NumPy, torch and the few-shot sampler."""
    go_offline()
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    tasks = list(tasks)
    if not tasks:
        raise ValueError("no tasks given")
    paths = [str(TASKS_DIR), *(str(p) for p in include_path or ())]
    for p in paths:
        if not Path(p).is_dir():
            raise FileNotFoundError(f"include_path {p!r}: no such folder")
    manager = TaskManager(include_path=paths, include_defaults=False)
    if not set(tasks) <= set(manager.all_tasks):  # index lm-eval's ~200 folders only if needed
        manager = TaskManager(include_path=paths)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"unknown task(s): {', '.join(unknown)} (not in {', '.join(paths)} nor "
                         "among lm-eval's bundled tasks)")
    model_args: dict[str, Any] = {"path": model_path, "device": device, "batch_size": batch_size}
    if dtype is not None:
        model_args["dtype"] = dtype
    if max_length is not None:
        model_args["max_length"] = max_length
    out = simple_evaluate(model="mixtral", model_args=model_args, tasks=tasks,
                          num_fewshot=num_fewshot, limit=limit, task_manager=manager,
                          log_samples=False, apply_chat_template=apply_chat_template,
                          random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                          fewshot_random_seed=seed)
    assert out is not None  # None only on non-zero ranks of a distributed run
    keep = ("results", "groups", "versions", "n-shot", "higher_is_better", "n-samples")
    summary = {k: out[k] for k in keep if k in out}
    summary["config"] = {"model": "mixtral", "model_path": model_path, "dtype": dtype,
                         "device": device, "batch_size": batch_size, "max_length": max_length,
                         "limit": limit, "num_fewshot": num_fewshot, "seed": seed,
                         "apply_chat_template": apply_chat_template, "tasks": tasks,
                         "lm_eval_version": lm_eval.__version__}
    # numpy scalars and the like -> plain JSON values
    return json.loads(json.dumps(summary, default=_jsonable))


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    return str(value)
