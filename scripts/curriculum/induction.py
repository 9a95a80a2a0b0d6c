#!/usr/bin/env python3
"""Does a checkpoint copy? The induction probe: random spans shown twice, [BOS, span, span], and
the model's mean loss on the second showing against the first. A model with induction heads
predicts the repeat far better than the first showing; one without (every checkpoint of the
first curriculum run, issue 17) scores them alike, and no copy-dependent skill (JSON values,
passkeys) can be taught on top of it.

    python scripts/curriculum/induction.py CHECKPOINT... [--spans 16] [--length 30] [--json OUT]
                                           [--require 0.5]

--require R fails (exit status 1) unless every checkpoint's repeat loss on corpus pieces is at
most R times its first-showing loss: scripts/train_default.sh stops there rather than spend
hours teaching skills to a base that cannot copy.

Two pools of pieces: `corpus` draws tokens with their frequencies in the validation text
(pieces the model has seen), `vocab` draws uniformly from the whole vocabulary (mostly pieces it
has hardly seen: copying them needs each piece's output row to match its input embedding).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

Model = Callable[[torch.Tensor], torch.Tensor]  # tokens [B, T] -> logits [B, T, V]


def spans(pool: Sequence[int], n: int, length: int, seed: int) -> torch.Tensor:
    """n rows of [BOS, span, span] -> [n, 1 + 2 * length]."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        span = [rng.choice(pool) for _ in range(length)]
        rows.append([1, *span, *span])
    return torch.tensor(rows)


@torch.no_grad()
def probe(model: Model, x: torch.Tensor) -> dict[str, float]:
    """Mean loss (nats) on the first showing (its 2nd token on: the first has no context) and on
    the repeat, and the repeat's greedy accuracy."""
    length = (x.shape[1] - 1) // 2
    logp = torch.log_softmax(model(x)[:, :-1].float(), -1)  # [B, T-1, V]: predicts x[:, 1:]
    nll = -logp.gather(2, x[:, 1:, None])[..., 0]  # [B, T-1]
    first, repeat = nll[:, 1:length], nll[:, length:]
    hits = logp.argmax(-1)[:, length:] == x[:, 1 + length:]
    return {"first": round(first.mean().item(), 3), "repeat": round(repeat.mean().item(), 3),
            "repeat_accuracy": round(hits.float().mean().item(), 3)}


def lacking(report: dict[str, dict[str, dict[str, float]]], ratio: float) -> list[str]:
    """The checkpoints whose repeat loss on corpus pieces is above ratio x the first's."""
    return [path for path, r in report.items()
            if r["corpus"]["repeat"] > ratio * r["corpus"]["first"]]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--corpus", default="data/corpus/pretrain/val",
                   help="text whose token frequencies make the corpus pool")
    p.add_argument("--spans", type=int, default=16)
    p.add_argument("--length", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path)
    p.add_argument("--require", type=float, metavar="R",
                   help="fail unless repeat <= R x first on corpus pieces, for every checkpoint")
    a = p.parse_args()
    import mixtral
    from mixtral.checkfile import CheckpointError
    from mixtral.tokenizer import default_tokenizer

    files = sorted(Path(a.corpus).glob("*.txt"))
    if not files:
        sys.exit(f"induction.py: no .txt files in {a.corpus}")
    tok = default_tokenizer()
    corpus = [t for f in files for t in tok.encode(f.read_text()[:100_000], bos=False)]
    pools = {"corpus": corpus, "vocab": range(3, tok.vocab_size)}
    report = {}
    for path in a.checkpoints:
        try:
            model = mixtral.load(path, dtype="float32")
        except CheckpointError as e:  # not a checkpoint: one line, not a traceback
            print(f"induction.py: {e}", file=sys.stderr)
            sys.exit(2)
        report[path] = {name: probe(model, spans(pool, a.spans, a.length, a.seed))
                        for name, pool in pools.items()}
        print(path, json.dumps(report[path]))
    if a.json:
        a.json.write_text(json.dumps(report, indent=1) + "\n")
    failed = lacking(report, a.require) if a.require is not None else []
    if failed:
        sys.exit(f"induction.py: no induction (repeat > {a.require} x first on corpus pieces): "
                 + ", ".join(failed))


if __name__ == "__main__":
    main()
