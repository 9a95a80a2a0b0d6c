"""The training loop: pretraining, SFT and DPO share it; what differs (data, loss) is a Task.

One explicit loop — AdamW, warmup + cosine (train/optimizer.py), gradient accumulation and
clipping, optional bf16 autocast, periodic held-out evaluation, a JSONL metrics log and a
loss-curve PNG (train/logs.py) — and checkpoints that never lose work (train/state.py);
`resume` continues from the latest bit for bit (batches are a function of the step). A NaN/inf
loss or gradient norm stops the run before the update, with a clear message naming the step,
and leaves the last good checkpoint untouched; weights are checked before every save, so no
checkpoint holds a non-finite value. Under torchrun the same loop runs data-parallel: rank r
takes micro-batches r, r+W, ... and gradients are averaged. Full training shards each layer's
parameters, gradients and optimizer state over the ranks with FSDP (`fully_shard`; `fsdp:
false` keeps whole copies and all-reduces the gradients); LoRA's small adapters are always
all-reduced. Checkpoints are gathered whole on rank 0, so a run may resume on any number of
processes.

TrainConfig and TrainingError live in train/config.py and are re-exported here, where callers
have always imported them from.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor

from mixtral.checkpoint import load
from mixtral.config import PRESETS, preset
from mixtral.lora import apply_lora
from mixtral.model import Transformer
from mixtral.parallel import launching
from mixtral.quant import quantize_model
from mixtral.tokenizer import default_tokenizer
from mixtral.train.config import TrainConfig, TrainingError
from mixtral.train.logs import MetricsLog, Progress
from mixtral.train.optimizer import RowGrad, lr_at, optimizer, set_lr
from mixtral.train.state import (
    check_weights,
    intact,
    latest,
    resume_state,
    resume_weights,
    save_checkpoint,
)
from mixtral.train.tasks import Task, make_task

__all__ = ["TrainConfig", "TrainingError", "build_model", "train"]


def build_model(cfg: TrainConfig) -> Transformer:
    if Path(cfg.init).exists():
        model = load(cfg.init, dtype=torch.float32)
        # a checkpoint brings its own shape: a `model` setting that differs would be ignored
        differ = {k: v for k, v in cfg.model.items() if getattr(model.args, k, None) != v}
        if differ:
            raise TrainingError(f"model={differ}: init={cfg.init} is a checkpoint, whose shape "
                                "cannot change (drop these settings, or start from a preset)")
        for key, unset in (("final_norm_init", 1.0), ("embedding_shared", 0.0),
                           ("embedding_space", 0.0)):
            if getattr(cfg, key) != unset:
                raise TrainingError(f"{key}={getattr(cfg, key)}: init={cfg.init} is a "
                                    "checkpoint, whose weights are kept (it sets a preset's "
                                    "random init only)")
        if cfg.tie_embeddings and not torch.equal(model.output.weight, model.tok_embeddings.weight):
            raise TrainingError(f"tie_embeddings=true: init={cfg.init} has an output head that "
                                "differs from its embeddings (start from a tied checkpoint or a "
                                "preset, or set tie_embeddings=false)")
        model.train()
    elif cfg.init not in PRESETS:  # a checkpoint that is not there, not a preset misspelt
        raise TrainingError(f"init={cfg.init}: no such file or directory (init takes a "
                            f"checkpoint folder or a preset: {', '.join(PRESETS)})")
    else:
        model = Transformer(preset(cfg.init).with_(**cfg.model))
        generator = torch.Generator().manual_seed(cfg.seed)
        model.init_weights(std=0.02, generator=generator)
        with torch.no_grad():
            model.norm.weight.fill_(cfg.final_norm_init)
            if cfg.embedding_shared:
                rows = model.tok_embeddings.weight  # [V, dim]
                shared = torch.randn(rows.shape[1], generator=generator)
                rows += shared * (cfg.embedding_shared * 0.02 * rows.shape[1] ** 0.5
                                  / shared.norm())
            if cfg.embedding_space:
                _space_twins(model.tok_embeddings.weight, cfg.embedding_space, generator)
    if cfg.tie_embeddings:  # one Parameter from here on: one gradient, one optimizer state
        model.output.weight = model.tok_embeddings.weight
    if cfg.embedding_lr_scale == 0:
        # frozen: no gradient at all, not a gradient at lr 0, which would still count in the
        # clipped norm (a tied 32000-row matrix's gradient dominated it, shrinking every other
        # step ~5x in issue 17's warm-up)
        model.tok_embeddings.weight.requires_grad_(False)
    return model


def _space_twins(rows: torch.Tensor, scale: float, generator: torch.Generator) -> None:
    """rows[▁X] = rows[X] + space for every twin pair of the tokenizer's pieces, and + space for
    every other piece that starts a word (TrainConfig.embedding_space)."""
    tok = default_tokenizer()
    pieces = tok.pieces()
    if rows.shape[0] != len(pieces):
        raise TrainingError(f"embedding_space needs the tokenizer's {len(pieces)}-piece "
                            f"vocabulary, the model has {rows.shape[0]} rows")
    spaced = [i for i, p in enumerate(pieces) if p.startswith("\u2581") and len(p) > 1]
    twins = tok.twins()
    space = torch.randn(rows.shape[1], generator=generator)
    space *= scale * 0.02 * rows.shape[1] ** 0.5 / space.norm()
    rows[list(twins)] = rows[list(twins.values())]
    rows[spaced] += space


def train(cfg: TrainConfig) -> Path:
    """Run (or resume) a training stage; returns the final checkpoint folder."""
    rank, world = _distributed()
    sharded = world > 1 and cfg.fsdp and not cfg.lora_rank
    if sharded and cfg.tie_embeddings:  # refused before any work
        raise TrainingError("tie_embeddings=true cannot be sharded (FSDP would split the shared "
                            "matrix twice): set fsdp=false")
    if sharded and (cfg.embedding_rows, cfg.embedding_twins) != ("all", "free"):
        raise TrainingError(f"embedding_rows={cfg.embedding_rows} and embedding_twins="
                            f"{cfg.embedding_twins} cannot be sharded (they shape whole rows' "
                            "gradient, which FSDP splits): set fsdp=false")
    if sharded and cfg.sampled_softmax:  # the loss reads the output rows outside forward
        raise TrainingError("sampled_softmax cannot be sharded (the loss reads whole output "
                            "rows, which FSDP splits): set fsdp=false")
    out = Path(cfg.out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    resume_from = latest(out) if cfg.resume else None
    done = int(resume_from.name.removeprefix("step-")) if resume_from is not None else 0
    if done > cfg.steps:  # a longer run is already here: its step `steps` may not have been kept
        asked = out / f"step-{cfg.steps:06d}"
        if asked.is_dir():
            return asked
        raise TrainingError(f"{out} already holds step {done}, past steps={cfg.steps}, and "
                            f"{asked.name} was not kept: ask for steps={done} or more, or "
                            "give another out=")
    model = build_model(cfg)
    if cfg.lora_base_bits:
        quantize_model(model, cfg.lora_base_bits)
    if cfg.lora_rank:
        apply_lora(model, cfg.lora_rank, cfg.lora_alpha, tuple(cfg.lora_targets))
    aux_coef = model.args.router_aux_loss_coef if cfg.aux_coef is None else cfg.aux_coef
    task = make_task(cfg, default_tokenizer(), model, aux_coef)
    if resume_from is not None:
        resume_weights(resume_from, model)
    if sharded:
        _fully_shard(model)
    opt = optimizer(model, cfg)
    rowgrad = RowGrad.of(cfg, model)
    start = resume_state(resume_from, model, opt, sharded) if resume_from is not None else 0
    log = MetricsLog(out / "metrics.jsonl", start, rank == 0)
    bar = Progress(cfg, start, rank == 0)
    model.train()
    for step in range(start, cfg.steps):
        t0 = time.perf_counter()
        set_lr(opt, step, cfg)
        opt.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        for m in range(cfg.grad_accum):
            batch = task.batch(step, m * world + rank)
            if rowgrad is not None:
                rowgrad.see(batch)
            with _autocast(cfg):
                loss, stats = task.loss(model, batch)
            if not torch.isfinite(loss):
                raise TrainingError(
                    f"step {step}: the loss is {loss.item()} (not finite); stopping. "
                    f"{intact(out, cfg)}")
            (loss / cfg.grad_accum).backward()
            for k, v in {"loss": loss.item(), **stats}.items():
                totals[k] = totals.get(k, 0.0) + v / cfg.grad_accum
        if world > 1:  # FSDP has already averaged (reduce-scattered) the gradients
            _average(totals, world, None if sharded else model)
        if rowgrad is not None:
            rowgrad.apply(model.tok_embeddings.weight.grad, world)
        norm = torch.nn.utils.clip_grad_norm_(
            [p for p in model.parameters() if p.requires_grad], cfg.grad_clip)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        if not torch.isfinite(norm):  # the same on every rank: the gradients are reduced
            raise TrainingError(
                f"step {step}: the gradient norm is {float(norm)} (not finite) while the loss "
                f"is {totals['loss']:.4g}; stopping before the update. {intact(out, cfg)}")
        opt.step()
        seconds = time.perf_counter() - t0
        record = {"step": step + 1, "lr": lr_at(step, cfg), "grad_norm": float(norm),
                  "step_seconds": seconds,
                  "tokens_per_s": task.tokens_per_batch * cfg.grad_accum * world / seconds,
                  **totals}
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            record.update(_evaluate(model, task, cfg))
        log.write(record)
        bar.update(record)
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
            check_weights(model, step, out, cfg, world)  # never save a broken model
            weights, optim = _full_state(model, opt, sharded)  # a collective under FSDP
            if rank == 0:
                save_checkpoint(out, step + 1, model, weights, optim, cfg, sharded)
    bar.close()
    if rank == 0:
        log.plot(out / "loss.png")
    if world > 1:
        dist.barrier()
    return out / f"step-{cfg.steps:06d}"


@torch.no_grad()
def _evaluate(model: Transformer, task: Task, cfg: TrainConfig) -> dict[str, float]:
    model.eval()
    sums: dict[str, float] = {}
    batches = task.eval_batches()
    for batch in batches:
        with _autocast(cfg):
            loss, stats = task.loss(model, batch)
        for k, v in {"loss": loss.item(), **stats}.items():
            sums[k] = sums.get(k, 0.0) + v / len(batches)
    model.train()
    return {f"eval_{k}": v for k, v in sums.items()}


def _autocast(cfg: TrainConfig) -> contextlib.AbstractContextManager[Any]:
    if cfg.autocast == "bf16":
        device = "cuda" if torch.cuda.is_available() else "cpu"
        return torch.autocast(device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# --- data parallelism ----------------------------------------------------------------------------

def _distributed() -> tuple[int, int]:
    world = launching.world()  # the launch's variables are read in one place
    if world == 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), world


def _average(totals: dict[str, float], world: int, model: Transformer | None) -> None:
    """Average the logged values over the ranks, and the gradients unless FSDP did."""
    if model is not None:
        for p in model.parameters():
            if p.requires_grad:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad)
                p.grad /= world
    keys = sorted(totals)
    values = torch.tensor([totals[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(values)
    for k, v in zip(keys, (values / world).tolist(), strict=True):
        totals[k] = v


def _fully_shard(model: Transformer) -> None:
    """FSDP2: each block is one unit (gathered for its forward and backward, then freed);
    the root holds the embeddings, final norm and output head."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.layers:
        fully_shard(layer)
    fully_shard(model)


def _full_state(model: Transformer, opt: torch.optim.Optimizer,
                sharded: bool) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The whole model and optimizer state (gathered onto rank 0 when sharded)."""
    if not sharded:
        return {k: v.detach() for k, v in model.state_dict().items()}, opt.state_dict()
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return (cast(dict[str, Tensor], get_model_state_dict(model, options=options)),
            cast(dict[str, Any], get_optimizer_state_dict(model, opt, options=options)))
