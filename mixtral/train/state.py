"""A run's saved state: checkpoints that never lose work, and resuming from them.

Each checkpoint is written to a temporary folder, fsynced and renamed to step-N, then `latest`
is switched atomically, so a run killed at any moment leaves the last good checkpoint intact.
Beside the weights (or LoRA adapters) lies trainer_state.pt: the step, the optimizer and RNG
states as plain tensors and numbers, read back with weights_only=True so that a planted pickle
cannot run. Weights are checked before every save: no checkpoint holds a non-finite value.
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor

from mixtral.atomic import atomic_write_text, fsync
from mixtral.checkpoint import load, save
from mixtral.lora import save_adapter
from mixtral.model import Transformer
from mixtral.train.config import TrainConfig, TrainingError


def latest(out: Path) -> Path | None:
    """The checkpoint `latest` names: only a step-N folder of this run (a pointer written by
    someone else, e.g. "../other-run/step-4", is refused, not followed)."""
    pointer = out / "latest"
    if not pointer.exists():
        return None
    name = pointer.read_text().strip()
    folder = out / name
    if not re.fullmatch(r"step-\d+", name) or folder.resolve().parent != out.resolve():
        raise TrainingError(f"{pointer} names {name[:200]!r}, which is not a step-N folder "
                            f"inside {out}; refusing to resume from it")
    return folder if folder.is_dir() else None


def intact(out: Path, cfg: TrainConfig) -> str:
    """The end of a stopped run's message: what survived, and what to do next."""
    return (f"The last good checkpoint, {latest(out) or 'none yet'}, is intact: lower lr "
            f"({cfg.lr}) or check the data, then resume")


@torch.no_grad()
def check_weights(model: Transformer, step: int, out: Path, cfg: TrainConfig,
                  world: int) -> None:
    """TrainingError, on every rank, if any rank holds a non-finite parameter."""
    bad = next((name for name, p in model.named_parameters()
                if not torch.isfinite(p.to_local() if isinstance(p, DTensor) else p).all()),
               None)
    if world > 1:  # all ranks stop together, or the others would wait for rank 0 forever
        flag = torch.tensor([float(bad is not None)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and bad is None:
            bad = "a parameter on another rank"
    if bad is not None:
        raise TrainingError(f"step {step}: after the update {bad} is not finite; stopping "
                            f"without saving it. {intact(out, cfg)}")


def save_checkpoint(out: Path, step: int, model: Transformer, weights: dict[str, Tensor],
                    optim: dict[str, Any], cfg: TrainConfig, sharded: bool) -> Path:
    """step-N beside the earlier ones, `latest` pointing at it; the oldest beyond `keep` go."""
    name = f"step-{step:06d}"
    tmp = out / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    if cfg.lora_rank:
        save_adapter(model, tmp / "adapter", cfg.lora_rank, cfg.lora_alpha,
                     tuple(cfg.lora_targets))
        (tmp / "adapter" / "base.txt").write_text(str(Path(cfg.init).resolve()) + "\n")
    else:
        save(_unshared(weights), model.args, tmp, "hf")
    # optimizer state by parameter name when gathered from FSDP, by index otherwise
    state = {"step": step, "optimizer": optim, "optimizer_by_name": sharded,
             "rng": torch.get_rng_state(), "config": asdict(cfg)}
    torch.save(state, tmp / "trainer_state.pt")
    for f in tmp.rglob("*"):
        if f.is_file():
            fsync(f)
    final = out / name
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)  # a folder: renamed here; the pointer's write flushes `out` after it
    atomic_write_text(out / "latest", name + "\n")
    steps = sorted(p for p in out.glob("step-*") if p.is_dir())
    for old in steps[:-(cfg.keep + 1)] if len(steps) > cfg.keep + 1 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _unshared(weights: dict[str, Tensor]) -> dict[str, Tensor]:
    """Tied weights (tie_embeddings: one matrix under two names) as separate equal tensors:
    the checkpoint layout has both, and safetensors refuses tensors that share memory."""
    seen: set[int] = set()
    out = {}
    for name, t in weights.items():
        out[name] = t.clone() if t.numel() and t.data_ptr() in seen else t
        seen.add(t.data_ptr())
    return out


def resume_weights(folder: Path, model: Transformer) -> None:
    """The checkpoint's weights (or adapters) into the model, before any sharding."""
    if (folder / "adapter").exists():
        from safetensors.torch import load_file

        tensors = load_file(folder / "adapter" / "adapter.safetensors")
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, t in tensors.items():
                params[name].copy_(t)
    else:
        weights = load(folder, dtype=torch.float32).state_dict()
        model.load_state_dict(weights)


def resume_state(folder: Path, model: Transformer, opt: torch.optim.Optimizer,
                 sharded: bool) -> int:
    """The optimizer and RNG states into place; returns the step to continue from."""
    state = _trainer_state(folder / "trainer_state.pt")
    saved_opt = state.get("optimizer")
    saved = saved_opt.get("param_groups") if isinstance(saved_opt, dict) else None
    had = [len(g.get("params", ())) for g in saved] if isinstance(saved, list) else None
    sizes = [len(g["params"]) for g in opt.param_groups]
    if had is not None and had != sizes:
        # e.g. embedding_lr_scale set or unset since the run started
        raise TrainingError(f"{folder}: its optimizer state's parameter groups hold {had} "
                            f"parameters, this run's settings make {sizes} (embedding_lr_scale "
                            "changed? resume with the run's settings, or start a new out)")
    if sharded or state.get("optimizer_by_name"):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        if state.get("optimizer_by_name"):
            set_optimizer_state_dict(model, opt, state["optimizer"],
                                     options=StateDictOptions(full_state_dict=True))
        else:  # saved by a process holding whole parameters: index -> name first
            by_name = _optimizer_by_name(state["optimizer"], _names_in_order(model, opt))
            set_optimizer_state_dict(model, opt, by_name,
                                     options=StateDictOptions(full_state_dict=True))
    else:
        opt.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    print(f"[mixtral train] resuming from {folder} (step {state['step']})", file=sys.stderr)
    return int(state["step"])


def _trainer_state(path: Path) -> dict[str, Any]:
    """The saved step, optimizer and RNG state: tensors, numbers, strings and containers only
    (weights_only=True), so a pickle planted in the run folder is refused, never run."""
    try:
        state = torch.load(path, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TrainingError(f"{path}: refusing to load it: it holds more than tensors and "
                            f"numbers ({first[:300]})") from None
    if not isinstance(state, dict):
        raise TrainingError(f"{path}: not a trainer state (a {type(state).__name__})")
    return state


def _names_in_order(model: Transformer, opt: torch.optim.Optimizer) -> list[str]:
    """The parameters' names in the optimizer's index order (its groups', one after another)."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    return [name_of[id(p)] for group in opt.param_groups for p in group["params"]]


def _optimizer_by_name(saved: dict[str, Any], names: list[str]) -> dict[str, Any]:
    ids = [i for g in saved["param_groups"] for i in g["params"]]
    name_of = dict(zip(ids, names, strict=True))
    return {"state": {name_of[i]: v for i, v in saved["state"].items()},
            "param_groups": [{**g, "params": [name_of[i] for i in g["params"]]}
                             for g in saved["param_groups"]]}
