"""Write a full-size Mixtral-8x7B (46.7B parameters) with random weights as an int4 checkpoint
(the portable layout of mixtral.quant, ~25 GB), tensor by tensor: never more than one shard in RAM.

    python benchmarks/make_full_random.py /tmp/mixtral-8x7b-int4
    mixtral bench --model /tmp/mixtral-8x7b-int4 --max-ram 16GiB --prompt-len 16 --gen-len 8

The weights are random (uniform int4 codes, small scales; N(0, 0.02) embeddings), which is all
a speed and memory measurement needs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

from mixtral.checkpoint import write_checkpoint
from mixtral.config import preset
from mixtral.configs import hf_config
from mixtral.formats import (
    QUANTIZATION_KEY,
    canonical_shapes,
    is_quantized_weight,
    portable_names,
    quantized_tensors,
)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("dst")
    p.add_argument("--preset", default="mixtral-8x7b")
    p.add_argument("--group-size", type=int, default=128)
    a = p.parse_args()
    args = preset(a.preset)
    quant = {"bits": 4, "group_size": a.group_size, "layout": "portable"}
    expected = quantized_tensors(args, torch.bfloat16, quant)
    g = torch.Generator().manual_seed(0)

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for name, shape in canonical_shapes(args).items():
            if not is_quantized_weight(name):
                t = torch.ones(shape) if name.endswith("norm.weight") else \
                    torch.randn(shape, generator=g) * 0.02
                yield name, t.to(torch.bfloat16)
                continue
            qname, sname = portable_names(name, 4)
            qshape, sshape = expected[qname][0], expected[sname][0]
            yield qname, torch.randint(0, 256, qshape, dtype=torch.uint8, generator=g)
            sz = torch.empty(sshape)
            sz[..., 0] = 0.02 / 8  # scale: codes 0..15 -> about +-0.02
            sz[..., 1] = 0.0  # zero point
            yield sname, sz
            print(f"  {name}", file=sys.stderr, flush=True)

    config = {**hf_config(args, torch.bfloat16), QUANTIZATION_KEY: quant}
    files = write_checkpoint(a.dst, config, expected, tensors(), 5 * 2**30)
    total = sum(f.stat().st_size for f in files)
    print(f"{Path(a.dst)}: {len(files)} files, {total / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
