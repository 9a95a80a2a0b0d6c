"""How well the next layer's experts can be foreseen (issue 16 item 3, measured before a
prefetcher is built): apply layer l+1's router to the hidden state layer l's experts receive,
and compare its top-k with the experts layer l+1 then really chooses. Also how skewed the
routing is: the share of all (layer, expert) uses taken by the most used 10 % of experts.

    python benchmarks/prefetch_precision.py                  # the built-in default model
    python benchmarks/prefetch_precision.py --model tiny     # a preset, random weights

The text is fixed (this repository's README.md, its first --tokens tokens), run as one forward
through the reference modules. precision = predicted experts that were chosen / k, averaged over
tokens and layer pairs; `first_hit` = tokens where at least one prediction was right;
`precision_ahead` = the same for layer l+d's router on layer l's input, by distance d (how far
ahead a reader could be told what to read).
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path
from typing import cast

import torch

from mixtral.assemble import assemble
from mixtral.model import MoeLayer, Transformer

README = Path(__file__).resolve().parents[1] / "README.md"


@torch.inference_mode()
def measure(model: Transformer, ids: list[int]) -> dict[str, float | dict[int, float]]:
    moes = [cast(MoeLayer, layer.feed_forward) for layer in model.layers]  # checked next
    assert all(isinstance(m, MoeLayer) for m in moes), "run with the reference modules"
    seen: list[torch.Tensor] = []
    hooks = [m.register_forward_pre_hook(lambda _m, a: seen.append(a[0].reshape(
        -1, a[0].shape[-1]))) for m in moes]
    try:
        model(torch.tensor([ids]))
    finally:
        for h in hooks:
            h.remove()
    k = moes[0].top_k
    chosen = [torch.topk(m.gate(x).float(), k).indices for m, x in zip(moes, seen, strict=True)]
    hits, first = [], []
    for layer in range(len(moes) - 1):
        guess = torch.topk(moes[layer + 1].gate(seen[layer]).float(), k).indices
        right = (guess[:, :, None] == chosen[layer + 1][:, None, :]).any(-1).sum(-1)  # [N]
        hits.append(right.float() / k)
        first.append((right > 0).float())
    ahead = {}  # layer l + d's router on layer l's input, for every distance d
    for d in range(1, len(moes)):
        rights = [(torch.topk(moes[layer + d].gate(seen[layer]).float(), k).indices[:, :, None]
                   == chosen[layer + d][:, None, :]).any(-1).float().mean(-1)
                  for layer in range(len(moes) - d)]
        ahead[d] = round(torch.cat(rights).mean().item(), 4)
    uses = collections.Counter((layer, int(e)) for layer, c in enumerate(chosen)
                               for e in c.flatten())
    n_experts = len(moes) * moes[0].gate.out_features
    top = sorted(uses.values(), reverse=True)[:max(1, n_experts // 10)]
    return {"tokens": len(ids), "precision": round(torch.cat(hits).mean().item(), 4),
            "first_hit": round(torch.cat(first).mean().item(), 4),
            "chance": round(k / moes[0].gate.out_features, 4),
            "skew_top10": round(sum(top) / sum(uses.values()), 4), "precision_ahead": ahead}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="a checkpoint or preset (default: the built-in model)")
    p.add_argument("--tokens", type=int, default=512)
    a = p.parse_args()
    model = assemble(a.model, dtype="fp32", fast=False, presets=True)
    if a.model is None:
        from mixtral.tokenizer import default_tokenizer

        ids = default_tokenizer().encode(README.read_text())[:a.tokens]
    else:  # a random preset: any ids do
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(3, model.args.vocab_size, (a.tokens,), generator=g).tolist()
    print(json.dumps({"model": a.model or "default", **measure(model, ids)}))


if __name__ == "__main__":
    main()
