"""One rank of a tensor/expert-parallel run, launched by tests/test_parallel.py through torchrun:

    torchrun --nproc-per-node 2 tests/parallel_worker.py CKPT OUT --tp 2 --ep 1 [--fast]
             [--fail-rank R --fail exit|hang]

Loads this rank's shard, computes full-forward logits of a fixed batch and greedy tokens with
the KV cache; rank 0 saves them (and each rank's tokens, to prove the ranks agree) to OUT.

    torchrun --nproc-per-node 2 tests/parallel_worker.py follower-fails generate ... --tp 2

runs `mixtral generate ...` as the CLI would, with logging configured at INFO (as a library
may do) and every rank logging once at INFO and once at WARNING as generation starts; then
rank 1 fails with a ValueError of its own, as a follower's real error would.
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import sys
import time

import torch
import torch.distributed as dist

from mixtral import parallel
from mixtral.fast import optimize
from mixtral.generate import GenerationParams, generate


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("ckpt")
    p.add_argument("out")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--ep", type=int, default=1)
    p.add_argument("--fast", action="store_true")
    p.add_argument("--fail-rank", type=int, default=-1)
    p.add_argument("--fail", choices=["exit", "hang"], default="exit")
    a = p.parse_args()
    torch.set_num_threads(1)
    plan = parallel.init(a.tp, a.ep)
    model = parallel.load_sharded(a.ckpt, plan, torch.float32)
    params = sum(t.numel() for t in model.state_dict().values())  # this rank's shard
    if a.fast:
        optimize(model)
    if plan.rank == a.fail_rank:  # a rank that dies, or stops answering, mid-run
        if a.fail == "exit":
            sys.exit(3)
        time.sleep(600)
    seed = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, model.args.vocab_size, (2, 9), generator=seed)
    with torch.no_grad():
        logits = model(tokens)
        greedy = list(generate(model, tokens[0].tolist(), GenerationParams(max_tokens=12,
                                                                           stop_ids=())))
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, greedy)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if plan.rank == 0:
        torch.save({"logits": logits, "greedy": greedy, "every": every, "rss": rss,
                    "params": params, "heads": (model.args.n_heads, model.args.n_kv_heads)},
                   a.out)
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


def follower_fails(argv: list[str]) -> int:
    from mixtral import completion
    from mixtral.cli import main as cli

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    log, real = logging.getLogger("mixtral.test"), completion.stream

    def stream(*args, **kwargs):  # runs after the launch is joined and the model is built
        rank = dist.get_rank()
        log.info("rank %d: an INFO record", rank)
        log.warning("rank %d: a WARNING record", rank)
        if rank == 1:
            raise ValueError("rank 1 failed on its own")
        return real(*args, **kwargs)

    completion.stream = stream
    return cli(argv)


if __name__ == "__main__":
    if sys.argv[1:2] == ["follower-fails"]:
        sys.exit(follower_fails(sys.argv[2:]))
    main()
