"""Where evaluation results go: JSON written atomically, and one line per run appended to a
JSONL log (model, settings, time, headline figures) so runs can be compared later."""

from __future__ import annotations

import datetime
import json
import platform
from pathlib import Path
from typing import Any

import torch

from mixtral.atomic import atomic_write_text


def write_json(path: Path, obj: Any) -> None:
    """JSON, written atomically: a crash leaves the old file or the new one, never half."""
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_text(path: Path, text: str) -> None:
    """UTF-8 text, written atomically, in a folder made if missing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)


def append_run(log: Path, command: str, model: str, settings: dict[str, Any],
               summary: dict[str, Any], seconds: float, outputs: list[Path]) -> None:
    record = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": command, "model": model, "settings": settings, "summary": summary,
              "seconds": round(seconds, 2), "outputs": [str(p) for p in outputs],
              "torch": torch.__version__, "host": platform.node(),
              "device": settings.get("device", "cpu")}
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a", encoding="utf-8") as f:  # one write of one line: appends do not mix
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
