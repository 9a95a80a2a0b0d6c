"""Tensor- and expert-parallel inference over torch.distributed, as module swaps on a built
model (model.py knows nothing of it). Every rank holds the whole residual stream; what is split
is the weights, and each split layer ends in one all-reduce that sums the ranks' partial
outputs. Three rooms:

  sharding    the plan (what rank r owns under --tp / --ep) and the sharded attention and
              MoE layers swapped into a model
  loading     a rank's shard read straight from a checkpoint
  launching   the torchrun launch: ranks (read here only), joining, quiet followers, and
              serving with rank 0 as the leader the others follow

`--tp N` and `--ep N` may be combined over the same N ranks (attention split by heads, experts
by owner). Sums happen in another order than in one process, so logits agree to fp32
reduction-order error (tests/test_parallel.py states the bound), and greedy tokens agree.
The KV cache is the caller's as always: `model.args` on a rank describes its local heads.
"""

from mixtral.parallel.launching import (
    Leader,
    finish,
    follow,
    init,
    is_leader,
    join,
    launched,
    local_rank,
    quiet,
    rank,
    world,
)
from mixtral.parallel.loading import load_sharded, read_shard
from mixtral.parallel.sharding import (
    ParallelError,
    Plan,
    ShardedAttention,
    ShardedMoe,
    shard_modules,
)

__all__ = ["Leader", "ParallelError", "Plan", "ShardedAttention", "ShardedMoe", "finish",
           "follow", "init", "is_leader", "join", "launched", "load_sharded", "local_rank",
           "quiet", "rank", "read_shard", "shard_modules", "world"]
