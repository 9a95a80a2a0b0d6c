"""The evaluations' figures, drawn like the paper's: a length x depth passkey heat map, the
perplexity curve, per-expert shares per layer and domain, repetition rates per layer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mixtral.atomic import atomic_write


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, bbox_inches="tight"))
    _pyplot().close(fig)


def passkey_heatmap(result: dict[str, Any], path: Path, title: str) -> None:
    plt = _pyplot()
    lengths, depths = result["lengths"], result["depths"]
    grid = [[row[j] for row in result["accuracy"]] for j in range(len(depths))]  # [depth][len]
    fig, ax = plt.subplots(figsize=(1.2 + 0.8 * len(lengths), 1.2 + 0.45 * len(depths)))
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="lower")
    ax.set_xticks(range(len(lengths)), [f"{n / 1024:g}k" if n >= 1024 else str(n)
                                        for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{100 * d:.0f}%" for d in depths])
    for j, row in enumerate(grid):
        for i, v in enumerate(row):
            ax.text(i, j, f"{v:.2f}", ha="center", va="center", fontsize=7)
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("passkey depth")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="retrieval accuracy")
    _save(fig, path)


def perplexity_curve(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["length"] for r in rows], [r["perplexity"] for r in rows], marker="o")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("perplexity of the first L tokens")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    _save(fig, path)


def routing_bars(result: dict[str, Any], path: Path, title: str) -> None:
    plt = _pyplot()
    layers, domains = result["table_layers"], list(result["domains"])
    n = result["experts"]
    fig, axes = plt.subplots(len(layers), 1, figsize=(max(6, 0.9 * n), 2.4 * len(layers)),
                             squeeze=False)
    width = 0.8 / len(domains)
    for ax, layer in zip(axes[:, 0], layers, strict=True):
        for j, name in enumerate(domains):
            shares = result["domains"][name]["either"][layer]
            ax.bar([e + (j - (len(domains) - 1) / 2) * width for e in range(n)], shares,
                   width, label=name)
        ax.axhline(1 / n, color="black", linestyle="--", linewidth=0.8)
        ax.set_xticks(range(n))
        ax.set_ylabel(f"layer {layer}")
    axes[-1, 0].set_xlabel("expert (share of assignments, first or second choice)")
    axes[0, 0].legend(fontsize=7, ncol=min(4, len(domains)))
    axes[0, 0].set_title(title)
    _save(fig, path)


def repetition(result: dict[str, Any], path: Path, title: str) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
    b = result["baselines"]
    for ax, key, label in ((axes[0], "repeat_first", "first choice"),
                           (axes[1], "repeat_either", "first or second choice")):
        for name, d in result["domains"].items():
            ax.plot(range(result["layers"]), d[key], marker=".", label=name)
        ax.axhline(b["first" if key == "repeat_first" else "either"], color="black",
                   linestyle="--", linewidth=0.8)
        ax.set_xlabel("layer")
        ax.set_ylabel(f"repetition ({label})")
    axes[0].legend(fontsize=7)
    fig.suptitle(title)
    _save(fig, path)
