#!/usr/bin/env python3
"""How long each stage of recipes/curriculum/ takes on this machine: the time budget of issue 17
(the whole recipe in 3 hours on 2 CPU cores), computed from measurements.

    python scripts/curriculum/budget.py data/curriculum [--reps 3] [--rows 1500]
        [--pretrain-step 3.88]

A training step's time grows with the tokens in its batch, and an SFT batch is padded to its
longest row, so a stage's step costs what its padded batch costs. This script (1) draws
batches from each built stage as the trainer does (rows uniformly at random) and measures
their padded lengths; (2) times one full training step (forward, backward, AdamW) of the
recipe's model at batch x 256, 512 and 1024 tokens, repeated and interleaved, keeping the
fastest (on a shared machine the fastest is the least disturbed); (3) scales the times so that
the pretraining shape takes --pretrain-step seconds, the figure a quiet run measured (the
shipped model's card: 1300 steps in 84.1 minutes), and prints minutes per stage.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from curriculum import ORDER  # noqa: E402
from mixtral.config import preset
from mixtral.model import Transformer
from mixtral.tokenizer import default_tokenizer
from mixtral.train.data import sft_examples

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "recipes"
SHAPES = (256, 512, 1024)


def padded_lengths(path: Path, rows: int, batch: int, seq_len: int, seed: int = 0) -> float:
    """The mean length of a batch of `batch` rows drawn from the first `rows` lines of `path`,
    padded to its longest row, as the trainer pads it (sft_examples cuts rows at seq_len + 1)."""
    sample = path.parent / f".budget-{path.parent.name}.jsonl"
    sample.write_text("".join(path.read_text().splitlines(keepends=True)[:rows]))
    try:
        lengths = [len(ids) - 1 for ids, _ in sft_examples([sample], default_tokenizer(), seq_len)]
    finally:
        sample.unlink()
    r = random.Random(seed)
    return float(np.mean([max(r.choices(lengths, k=batch)) for _ in range(2000)]))


def dpo_lengths(path: Path, rows: int, batch: int, seq_len: int) -> float:
    """The same for DPO: a batch holds each pair's chosen and rejected side."""
    tok = default_tokenizer()
    lengths = []
    for line in path.read_text().splitlines()[:rows]:
        obj = json.loads(line)
        prompt = sum(len(tok.encode(m["content"], bos=False)) + 8 for m in obj["messages"])
        lengths.append(min(prompt + len(tok.encode(obj["chosen"], bos=False)) + 2, seq_len))
    r = random.Random(0)
    return float(np.mean([max(r.choices(lengths, k=batch)) for _ in range(2000)]))


def step_seconds(model_args: dict, batch: int, reps: int) -> dict[int, float]:
    """The fastest of `reps` full training steps at batch x T tokens, for each T of SHAPES."""
    model = Transformer(preset("tiny").with_(**model_args))
    model.init_weights(std=0.02, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    best = dict.fromkeys(SHAPES, float("inf"))
    for _ in range(reps):
        for T in SHAPES:
            tokens = torch.randint(0, model.args.vocab_size, (batch, T + 1))
            t0 = time.perf_counter()
            logits = model(tokens[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            best[T] = min(best[T], time.perf_counter() - t0)
    return best


def at(length: float, times: dict[int, float]) -> float:
    """A step's time at a padded length, interpolated between the measured shapes (the output
    layer dominates: time is close to linear in the tokens)."""
    return float(np.interp(length, SHAPES, [times[T] for T in SHAPES],
                           left=times[SHAPES[0]] * length / SHAPES[0]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("curriculum", type=Path, help="scripts/build_curriculum.py's output folder")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--rows", type=int, default=1500, help="lines of each stage to measure")
    p.add_argument("--pretrain-step", type=float, default=84.1 * 60 / 1300,
                   help="seconds per pretraining step (16 x 256) on a quiet machine")
    a = p.parse_args()
    torch.set_num_threads(2)
    pretrain = yaml.safe_load((RECIPES / "default" / "pretrain.yaml").read_text())
    warmup = yaml.safe_load((RECIPES / "default" / "induction.yaml").read_text())
    times = step_seconds(warmup["model"], pretrain["batch_size"], a.reps)  # its shape stays
    scale = a.pretrain_step / times[pretrain["seq_len"]]
    print(f"measured step seconds at batch {pretrain['batch_size']}: "
          + ", ".join(f"{T}: {s:.2f}" for T, s in times.items())
          + f"; scaled by {scale:.2f} to the quiet pretraining step", file=sys.stderr)
    stages = {"induction": (warmup["steps"], a.pretrain_step * warmup["batch_size"]
                            / pretrain["batch_size"], warmup["seq_len"]),
              "pretrain": (pretrain["steps"], a.pretrain_step, pretrain["seq_len"])}
    for name in ORDER[2:]:  # the curriculum's stages, after the warm-up and pretraining
        recipe = yaml.safe_load((RECIPES / "curriculum" / f"{name}.yaml").read_text())
        B, T = recipe["batch_size"], recipe["seq_len"]
        if name == "dpo":  # 2B rows, plus the frozen reference's forward (a third of a step)
            length = dpo_lengths(a.curriculum / "dpo.jsonl", a.rows, B, T)
            seconds = 2 * (B / pretrain["batch_size"]) * at(length, times) * scale * 4 / 3
        else:
            length = padded_lengths(a.curriculum / name / "sft.jsonl", a.rows, B, T)
            seconds = (B / pretrain["batch_size"]) * at(length, times) * scale
        stages[name] = (recipe["steps"], seconds, length)
    total = 0.0
    print("| stage | steps | padded length | s/step | minutes |\n|---|---|---|---|---|")
    for name, (steps, seconds, length) in stages.items():
        total += steps * seconds / 60
        print(f"| {name} | {steps} | {length:.0f} | {seconds:.2f} | {steps * seconds / 60:.1f} |")
    print(f"| total | | | | {total:.1f} |")


if __name__ == "__main__":
    main()
