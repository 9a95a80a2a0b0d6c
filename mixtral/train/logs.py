"""What a run reports as it goes: metrics.jsonl (one JSON record per step), a loss-curve PNG
at the end, and a progress bar on the terminal. Only rank 0 writes them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mixtral.atomic import atomic_write, atomic_write_text
from mixtral.train.config import TrainConfig


def _step(line: str) -> float:
    """A record's step; a line a killed run left half written (always past the checkpoint it
    resumes from, as records are written after their step) counts as past every step."""
    try:
        return float(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return float("inf")


class MetricsLog:
    def __init__(self, path: Path, start: int, enabled: bool) -> None:
        self.path, self.enabled = path, enabled
        if enabled and path.exists():  # a resumed run rewrites what came after its checkpoint
            keep = [line for line in path.read_text(errors="replace").splitlines()
                    if _step(line) <= start]
            atomic_write_text(path, "".join(line + "\n" for line in keep))

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def plot(self, png: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train", lw=1)
        evals = [r for r in rows if "eval_loss" in r]
        if evals:
            ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-",
                    label="held-out")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        try:
            atomic_write(png, lambda tmp: fig.savefig(tmp, dpi=110))
        finally:
            plt.close(fig)


class Progress:
    """A tqdm bar with the loss and speed (nothing when disabled or on other ranks)."""

    def __init__(self, cfg: TrainConfig, start: int, enabled: bool) -> None:
        self.bar = None
        if enabled and cfg.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=cfg.steps, initial=start, desc=f"{cfg.stage}", unit="step",
                            dynamic_ncols=True)

    def update(self, record: dict[str, Any]) -> None:
        if self.bar is not None:
            post = {"loss": f"{record['loss']:.3f}", "tok/s": f"{record['tokens_per_s']:.0f}"}
            if "eval_loss" in record:
                post["eval"] = f"{record['eval_loss']:.3f}"
            self.bar.set_postfix(post)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
