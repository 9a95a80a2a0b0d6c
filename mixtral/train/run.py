"""The training loop: pretraining, SFT and DPO share it; what differs (data, loss) is a Task.

One explicit loop — AdamW, warmup + cosine, gradient accumulation and clipping, optional bf16
autocast, periodic held-out evaluation, a JSONL metrics log, a loss-curve PNG — and
checkpoints that never lose work: each is written to a temporary folder, fsynced and renamed,
then `latest` is switched atomically; `resume` continues from it bit for bit (batches are a
function of the step, and the optimizer and RNG states are saved as plain tensors and numbers,
read back with weights_only=True so that a planted pickle cannot run). A NaN/inf loss or
gradient norm stops the run before the update, with a clear message naming the step, and
leaves the last good checkpoint untouched; weights are checked before every save, so no
checkpoint holds a non-finite value. Under torchrun the
same loop runs data-parallel: rank r takes micro-batches r, r+W, ... and gradients are averaged.
Full training shards each layer's parameters, gradients and optimizer state over the ranks
with FSDP (`fully_shard`; `fsdp: false` keeps whole copies and all-reduces the gradients);
LoRA's small adapters are always all-reduced. Checkpoints are gathered whole on rank 0, so a
run may resume on any number of processes.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import pickle
import re
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol, cast

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor

from mixtral.checkpoint import load, save
from mixtral.config import preset
from mixtral.lora import LoRAExperts, LoRALinear, apply_lora, save_adapter
from mixtral.model import Transformer
from mixtral.quant import quantize_model
from mixtral.tokenizer import Tokenizer, default_tokenizer
from mixtral.train import data as D
from mixtral.train.losses import (
    cross_entropy,
    dpo_loss,
    load_balancing_loss,
    router_z_loss,
    sequence_logprobs,
)


class TrainingError(RuntimeError):
    pass


@dataclass
class TrainConfig:
    stage: str  # pretrain | sft | dpo
    out: str
    data: list[str]
    eval_data: list[str] = field(default_factory=list)  # default: hold out a slice of data
    init: str = "tiny"  # a preset (random weights) or a checkpoint to start from
    model: dict[str, Any] = field(default_factory=dict)  # ModelArgs changes for a preset
    steps: int = 100
    batch_size: int = 8
    grad_accum: int = 1
    seq_len: int = 256
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 10
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    aux_coef: float | None = None  # load balancing; None: the model's (0.02 for Mixtral)
    z_coef: float = 0.0  # router z-loss
    dpo_beta: float = 0.1
    lora_rank: int = 0  # 0: full fine-tuning
    lora_alpha: float = 32.0
    lora_targets: list[str] = field(default_factory=lambda: ["attention", "experts"])
    lora_base_bits: int = 0  # 8: the frozen base in int8 (its memory halves; QLoRA-style)
    eval_every: int = 50
    eval_batches: int = 4
    save_every: int = 50
    keep: int = 2  # checkpoints kept besides the final one
    seed: int = 0
    autocast: str = "none"  # none | bf16
    fsdp: bool = True  # under torchrun, full training: shard parameters and optimizer state
    resume: bool = True
    progress: bool = True

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{source}: unknown setting(s) {', '.join(unknown)}; known: "
                             f"{', '.join(sorted(known))}")
        missing = [k for k in ("stage", "out", "data") if k not in values]
        if missing:
            raise ValueError(f"{source}: missing setting(s) {', '.join(missing)}")
        cfg = cls(**values)
        if cfg.lora_base_bits not in (0, 8):
            raise ValueError(f"{source}: lora_base_bits must be 0 (as loaded) or 8, got "
                             f"{cfg.lora_base_bits}")
        if cfg.lora_base_bits and not cfg.lora_rank:
            raise ValueError(f"{source}: lora_base_bits needs LoRA (lora_rank > 0): a "
                             "quantized base cannot be trained itself")
        if cfg.stage not in ("pretrain", "sft", "dpo"):
            raise ValueError(f"{source}: stage must be pretrain, sft or dpo, got {cfg.stage!r}")
        if isinstance(cfg.data, str):
            cfg.data = [cfg.data]
        if isinstance(cfg.eval_data, str):
            cfg.eval_data = [cfg.eval_data]
        cfg.betas = tuple(cfg.betas)  # type: ignore[assignment]
        return cfg


# --- tasks: what each stage trains on ------------------------------------------------------------

class Task(Protocol):
    tokens_per_batch: int

    def batch(self, step: int, micro: int) -> Any: ...

    def loss(self, model: Transformer, batch: Any) -> tuple[Tensor, dict[str, float]]: ...

    def eval_batches(self) -> list[Any]: ...


def _lm_loss(model: Transformer, batch: D.Batch, cfg: TrainConfig,
             aux_coef: float) -> tuple[Tensor, dict[str, float]]:
    logits, router_logits = model(batch.tokens, return_router_logits=True)
    ce = cross_entropy(logits, batch.targets, batch.loss_mask)
    loss = ce
    stats = {"ce": ce.item()}
    if aux_coef:
        aux = load_balancing_loss(router_logits, model.args.num_experts_per_tok, batch.token_mask)
        loss = loss + aux_coef * aux
        stats["aux"] = aux.item()
    if cfg.z_coef:
        z = router_z_loss(router_logits, batch.token_mask)
        loss = loss + cfg.z_coef * z
        stats["z"] = z.item()
    return loss, stats


class PretrainTask:
    def __init__(self, cfg: TrainConfig, tokenizer: Tokenizer, aux_coef: float) -> None:
        self.cfg, self.aux_coef = cfg, aux_coef
        stream = D.pretrain_tokens(cfg.data, tokenizer)
        if cfg.eval_data:
            self.eval_stream = D.pretrain_tokens(cfg.eval_data, tokenizer)
            self.stream = stream
        else:  # hold out the last 2 % (at least two sequences)
            cut = len(stream) - max(len(stream) // 50, 2 * (cfg.seq_len + 2))
            self.stream, self.eval_stream = stream[:cut], stream[cut:]
        self.tokens_per_batch = cfg.batch_size * cfg.seq_len

    def batch(self, step: int, micro: int) -> D.Batch:
        c = self.cfg
        return D.pretrain_batch(self.stream, c.batch_size, c.seq_len, c.seed, step, micro)

    def loss(self, model: Transformer, batch: D.Batch) -> tuple[Tensor, dict[str, float]]:
        return _lm_loss(model, batch, self.cfg, self.aux_coef)

    def eval_batches(self) -> list[D.Batch]:
        c = self.cfg
        return [D.pretrain_batch(self.eval_stream, c.batch_size, c.seq_len, 12345, 0, i)
                for i in range(c.eval_batches)]


class SFTTask:
    def __init__(self, cfg: TrainConfig, tokenizer: Tokenizer, aux_coef: float) -> None:
        self.cfg, self.aux_coef = cfg, aux_coef
        rows = D.sft_examples(cfg.data, tokenizer, cfg.seq_len)
        if cfg.eval_data:
            self.rows, self.eval_rows = rows, D.sft_examples(cfg.eval_data, tokenizer, cfg.seq_len)
        else:
            cut = max(len(rows) - max(len(rows) // 20, 1), 1)
            self.rows, self.eval_rows = rows[:cut], rows[cut:] or rows[:1]
        self.tokens_per_batch = cfg.batch_size * cfg.seq_len

    def batch(self, step: int, micro: int) -> D.Batch:
        c = self.cfg
        picks = D.sample_rows(len(self.rows), c.batch_size, c.seed, step, micro)
        return D.pad_batch([self.rows[i] for i in picks])

    def loss(self, model: Transformer, batch: D.Batch) -> tuple[Tensor, dict[str, float]]:
        return _lm_loss(model, batch, self.cfg, self.aux_coef)

    def eval_batches(self) -> list[D.Batch]:
        size = self.cfg.batch_size
        return [D.pad_batch(self.eval_rows[i:i + size])
                for i in range(0, min(len(self.eval_rows), size * self.cfg.eval_batches), size)]


class DPOTask:
    """Policy vs a frozen reference (the starting model; with LoRA, the adapters switched off)."""

    def __init__(self, cfg: TrainConfig, tokenizer: Tokenizer, model: Transformer) -> None:
        self.cfg = cfg
        pairs = D.preference_pairs(cfg.data, tokenizer, cfg.seq_len)
        if cfg.eval_data:
            self.pairs, self.eval_pairs = pairs, D.preference_pairs(cfg.eval_data, tokenizer,
                                                                    cfg.seq_len)
        else:
            cut = max(len(pairs) - max(len(pairs) // 10, 1), 1)
            self.pairs, self.eval_pairs = pairs[:cut], pairs[cut:] or pairs[:1]
        self.reference = None if cfg.lora_rank else copy.deepcopy(model).requires_grad_(False)
        self.tokens_per_batch = 2 * cfg.batch_size * cfg.seq_len

    def _batch(self, pairs: list[D.Pair]) -> D.Batch:
        return D.pad_batch([p.chosen for p in pairs] + [p.rejected for p in pairs])

    def batch(self, step: int, micro: int) -> D.Batch:
        c = self.cfg
        picks = D.sample_rows(len(self.pairs), c.batch_size, c.seed, step, micro)
        return self._batch([self.pairs[i] for i in picks])

    def loss(self, model: Transformer, batch: D.Batch) -> tuple[Tensor, dict[str, float]]:
        n = batch.tokens.shape[0] // 2
        logp = sequence_logprobs(model(batch.tokens), batch.targets, batch.loss_mask)
        with torch.no_grad(), _reference(model, self.reference) as ref:
            ref_logp = sequence_logprobs(ref(batch.tokens), batch.targets, batch.loss_mask)
        loss, stats = dpo_loss(logp[:n], logp[n:], ref_logp[:n], ref_logp[n:], self.cfg.dpo_beta)
        return loss, stats

    def eval_batches(self) -> list[D.Batch]:
        size = self.cfg.batch_size
        return [self._batch(self.eval_pairs[i:i + size])
                for i in range(0, min(len(self.eval_pairs), size * self.cfg.eval_batches), size)]


@contextlib.contextmanager
def _reference(model: Transformer, frozen: Transformer | None) -> Iterator[Transformer]:
    if frozen is not None:
        yield frozen
        return
    adapters = [m for m in model.modules() if isinstance(m, (LoRALinear, LoRAExperts))]
    scales = [m.scaling for m in adapters]
    for m in adapters:
        m.scaling = 0.0
    try:
        yield model
    finally:
        for m, s in zip(adapters, scales, strict=True):
            m.scaling = s


# --- the loop ------------------------------------------------------------------------------------

def build_model(cfg: TrainConfig) -> Transformer:
    if Path(cfg.init).exists():
        model = load(cfg.init, dtype=torch.float32)
        model.train()
        return model
    model = Transformer(preset(cfg.init).with_(**cfg.model))
    model.init_weights(std=0.02, generator=torch.Generator().manual_seed(cfg.seed))
    return model


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def optimizer(model: Transformer, cfg: TrainConfig) -> torch.optim.AdamW:
    decay, rest = _param_groups(model)
    return torch.optim.AdamW([{"params": [p for _, p in decay], "weight_decay": cfg.weight_decay},
                              {"params": [p for _, p in rest], "weight_decay": 0.0}],
                             lr=cfg.lr, betas=cfg.betas)


Named = list[tuple[str, torch.nn.Parameter]]


def _param_groups(model: Transformer) -> tuple[Named, Named]:
    """(decayed, not decayed) trainable parameters: matrices other than the embeddings decay."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [(n, p) for n, p in trainable if p.dim() >= 2 and "tok_embeddings" not in n]
    rest = [(n, p) for n, p in trainable if not (p.dim() >= 2 and "tok_embeddings" not in n)]
    return decay, rest


def _grouped_names(model: Transformer) -> list[str]:
    """Parameter names in the optimizer's index order."""
    decay, rest = _param_groups(model)
    return [n for n, _ in decay + rest]


def train(cfg: TrainConfig) -> Path:
    """Run (or resume) a training stage; returns the final checkpoint folder."""
    rank, world = _distributed()
    out = Path(cfg.out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    tokenizer = default_tokenizer()
    model = build_model(cfg)
    if cfg.lora_base_bits:
        quantize_model(model, cfg.lora_base_bits)
    if cfg.lora_rank:
        apply_lora(model, cfg.lora_rank, cfg.lora_alpha, tuple(cfg.lora_targets))
    aux_coef = model.args.router_aux_loss_coef if cfg.aux_coef is None else cfg.aux_coef
    task: Task
    if cfg.stage == "pretrain":
        task = PretrainTask(cfg, tokenizer, aux_coef)
    elif cfg.stage == "sft":
        task = SFTTask(cfg, tokenizer, aux_coef)
    else:
        task = DPOTask(cfg, tokenizer, model)
    resume_from = _latest(out) if cfg.resume else None
    if resume_from is not None:
        _resume_weights(resume_from, model)
    sharded = world > 1 and cfg.fsdp and not cfg.lora_rank
    if sharded:
        _fully_shard(model)
    opt = optimizer(model, cfg)
    start = _resume_state(resume_from, model, opt, sharded) if resume_from is not None else 0
    log = _MetricsLog(out / "metrics.jsonl", start, rank == 0)
    bar = _progress(cfg, start, rank == 0)
    model.train()
    for step in range(start, cfg.steps):
        t0 = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        opt.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        for m in range(cfg.grad_accum):
            batch = task.batch(step, m * world + rank)
            with _autocast(cfg):
                loss, stats = task.loss(model, batch)
            if not torch.isfinite(loss):
                raise TrainingError(
                    f"step {step}: the loss is {loss.item()} (not finite); stopping. "
                    f"{_intact(out, cfg)}")
            (loss / cfg.grad_accum).backward()
            for k, v in {"loss": loss.item(), **stats}.items():
                totals[k] = totals.get(k, 0.0) + v / cfg.grad_accum
        if world > 1:  # FSDP has already averaged (reduce-scattered) the gradients
            _average(totals, world, None if sharded else model)
        norm = torch.nn.utils.clip_grad_norm_(
            [p for p in model.parameters() if p.requires_grad], cfg.grad_clip)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        if not torch.isfinite(norm):  # the same on every rank: the gradients are reduced
            raise TrainingError(
                f"step {step}: the gradient norm is {float(norm)} (not finite) while the loss "
                f"is {totals['loss']:.4g}; stopping before the update. {_intact(out, cfg)}")
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
            _check_weights(model, step, out, cfg, world)  # never save a broken model
            weights, optim = _full_state(model, opt, sharded)  # a collective under FSDP
            if rank == 0:
                _save(out, step + 1, model, weights, optim, cfg, sharded)
    bar.close()
    if rank == 0:
        log.plot(out / "loss.png")
    if world > 1:
        dist.barrier()
    return out / f"step-{cfg.steps:06d}"


def _intact(out: Path, cfg: TrainConfig) -> str:
    return (f"The last good checkpoint, {_latest(out) or 'none yet'}, is intact: lower lr "
            f"({cfg.lr}) or check the data, then resume")


@torch.no_grad()
def _check_weights(model: Transformer, step: int, out: Path, cfg: TrainConfig,
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
                            f"without saving it. {_intact(out, cfg)}")


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


def _distributed() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
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


# --- checkpoints ---------------------------------------------------------------------------------

def _latest(out: Path) -> Path | None:
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


def _save(out: Path, step: int, model: Transformer, weights: dict[str, Tensor],
          optim: dict[str, Any], cfg: TrainConfig, sharded: bool) -> Path:
    name = f"step-{step:06d}"
    tmp = out / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    if cfg.lora_rank:
        save_adapter(model, tmp / "adapter", cfg.lora_rank, cfg.lora_alpha,
                     tuple(cfg.lora_targets))
        (tmp / "adapter" / "base.txt").write_text(str(Path(cfg.init).resolve()) + "\n")
    else:
        save(weights, model.args, tmp, "hf")
    # optimizer state by parameter name when gathered from FSDP, by index otherwise
    state = {"step": step, "optimizer": optim, "optimizer_by_name": sharded,
             "rng": torch.get_rng_state(), "config": asdict(cfg)}
    torch.save(state, tmp / "trainer_state.pt")
    for f in tmp.rglob("*"):
        if f.is_file():
            with open(f, "rb+") as fh:
                os.fsync(fh.fileno())
    final = out / name
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    pointer = out / ".latest.tmp"
    pointer.write_text(name + "\n")
    os.replace(pointer, out / "latest")
    _fsync_dir(out)
    steps = sorted(p for p in out.glob("step-*") if p.is_dir())
    for old in steps[:-(cfg.keep + 1)] if len(steps) > cfg.keep + 1 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _resume_weights(folder: Path, model: Transformer) -> None:
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


def _resume_state(folder: Path, model: Transformer, opt: torch.optim.Optimizer,
                  sharded: bool) -> int:
    state = _trainer_state(folder / "trainer_state.pt")
    if sharded or state.get("optimizer_by_name"):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        if state.get("optimizer_by_name"):
            set_optimizer_state_dict(model, opt, state["optimizer"],
                                     options=StateDictOptions(full_state_dict=True))
        else:  # saved by a process holding whole parameters: index -> name first
            by_name = _optimizer_by_name(state["optimizer"], _grouped_names(model))
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


def _optimizer_by_name(saved: dict[str, Any], names: list[str]) -> dict[str, Any]:
    ids = [i for g in saved["param_groups"] for i in g["params"]]
    name_of = dict(zip(ids, names, strict=True))
    return {"state": {name_of[i]: v for i, v in saved["state"].items()},
            "param_groups": [{**g, "params": [name_of[i] for i in g["params"]]}
                             for g in saved["param_groups"]]}


# --- logs ----------------------------------------------------------------------------------------

class _MetricsLog:
    def __init__(self, path: Path, start: int, enabled: bool) -> None:
        self.path, self.enabled = path, enabled
        if enabled and path.exists():  # a resumed run rewrites what came after its checkpoint
            keep = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= start]
            path.write_text("".join(line + "\n" for line in keep))

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
        tmp = png.with_suffix(".tmp.png")
        fig.savefig(tmp, dpi=110)
        plt.close(fig)
        os.replace(tmp, png)


class _progress:
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
