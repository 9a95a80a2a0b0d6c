#!/usr/bin/env python3
"""What int8/int4 weights cost in quality: logit KL and perplexity against the bf16 model on a
fixed text, as the fast paths compute them (the kernels `mixtral bench` times).

    python benchmarks/quant_quality.py [--model default|bench|PATH] [--text FILE]
                                       [--tokens 4096] [--window 512]

The text is cut into non-overlapping windows of `--window` tokens (each scored from its
start); for every precision: perplexity of the text, mean KL(p_bf16 || p_quant) per token in
nats, the share of positions whose most likely next token is the bf16 model's, and the largest
per-token KL. fp32 is listed as the scale of pure rounding noise. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mixtral.assemble import assemble
from mixtral.model import Transformer
from mixtral.tokenizer import default_tokenizer

DEFAULT_TEXT = Path("/usr/share/common-licenses/GPL-3")  # on every Debian; fixed, public


def build(model: str, dtype: torch.dtype, bits: int | None = None,
          group_size: int | None = None) -> Transformer:
    """The model on the fast paths, in `dtype` or quantized to `bits` (int4: `group_size`)."""
    return assemble(None if model == "default" else model, dtype=dtype, quantize=bits,
                    group_size=group_size, presets=True)


@torch.inference_mode()
def log_probs(model: Transformer, windows: list[torch.Tensor]) -> torch.Tensor:
    """Next-token log-probabilities [positions, V] over all windows, fp32."""
    return torch.cat([F.log_softmax(model(w[None])[0, :-1].float(), dim=-1) for w in windows])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default", help="default (the shipped model), a preset "
                    "(random weights, e.g. bench) or a checkpoint folder")
    ap.add_argument("--text", default=str(DEFAULT_TEXT if DEFAULT_TEXT.exists() else
                                          Path(__file__).parent.parent / "README.md"))
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--window", type=int, default=512)
    a = ap.parse_args()
    ids = default_tokenizer().encode(Path(a.text).read_text(), bos=False)[: a.tokens]
    windows = [torch.tensor([1] + ids[i:i + a.window - 1])
               for i in range(0, len(ids) - a.window + 2, a.window - 1)]
    targets = torch.cat([w[1:] for w in windows])
    base_model = build(a.model, torch.bfloat16)
    base = log_probs(base_model, windows)
    del base_model
    rows = []
    for name in ("bf16", "fp32", "int8", "int4 g128", "int4 g64", "int4 g32"):
        start = time.perf_counter()
        if name == "bf16":
            lp = base
        else:
            bits = int(name[3]) if name.startswith("int") else None
            group = int(name.split("g")[1]) if "g" in name else None
            model = build(a.model, torch.float32 if name == "fp32" else torch.bfloat16, bits,
                          group)
            lp = log_probs(model, windows)
        kl = (base.exp() * (base - lp)).sum(-1)  # KL(p_bf16 || p) per position
        ppl = torch.exp(-lp.gather(1, targets[:, None]).mean()).item()
        agree = (lp.argmax(-1) == base.argmax(-1)).float().mean().item()
        rows.append((name, ppl, kl.mean().item(), kl.max().item(), agree,
                     time.perf_counter() - start))
    print(f"model {a.model}, text {a.text}: {len(targets)} scored tokens in {len(windows)} "
          f"windows of {a.window}\n")
    print("| weights | perplexity | mean KL vs bf16 (nats/token) | max KL | top-1 = bf16's |")
    print("|---|---|---|---|---|")
    for name, ppl, kl_mean, kl_max, agree, _ in rows:
        print(f"| {name} | {ppl:.3f} | {kl_mean:.5f} | {kl_max:.4f} | {100 * agree:.2f} % |")


if __name__ == "__main__":
    main()
