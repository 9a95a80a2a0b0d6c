"""Time the reference generation loop (prefill + batch-1 greedy decode) on a random-weights
preset. Prints one JSON line. Example:

    python benchmarks/decode.py --preset bench --dtype bf16 --device cpu --new 64
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from mixtral.config import param_counts, preset
from mixtral.formats import parse_dtype
from mixtral.generate import generate
from mixtral.model import Transformer


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="bench")
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    args = preset(a.preset)
    with torch.device("meta"):
        model = Transformer(args).to(parse_dtype(a.dtype))  # no fp32 copy of a big model
    model = model.to_empty(device=a.device)
    model.init_weights(std=0.02)
    model.eval()
    prompt = torch.randint(3, args.vocab_size, (a.prompt_len,)).tolist()
    sync = torch.cuda.synchronize if a.device.startswith("cuda") else (lambda: None)
    list(generate(model, prompt, 4))  # warm-up
    prefill, decode = [], []
    for _ in range(a.repeats):
        sync()
        t0 = time.perf_counter()
        tokens = generate(model, prompt, a.new)
        next(tokens)  # the first token needs the whole prefill
        sync()
        t1 = time.perf_counter()
        n = 1 + sum(1 for _ in tokens)
        sync()
        t2 = time.perf_counter()
        prefill.append(a.prompt_len / (t1 - t0))
        decode.append((n - 1) / (t2 - t1))
    # weights one decode token reads: all active ones, but only one row of the embedding table
    touched = param_counts(args)["active"] - args.vocab_size * args.dim + args.dim
    print(json.dumps({
        "preset": a.preset, "dtype": a.dtype, "device": a.device,
        "device_name": torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu",
        "threads": torch.get_num_threads(), "prompt_len": a.prompt_len, "new_tokens": a.new,
        "prefill_tok_s_median": round(statistics.median(prefill), 1),
        "decode_tok_s_median": round(statistics.median(decode), 2),
        "weight_bytes_read_per_token": touched * torch.finfo(parse_dtype(a.dtype)).bits // 8,
    }))


if __name__ == "__main__":
    main()
