"""The prefix cache: copies of KV that finished requests computed, kept so that a later prompt
beginning with the same tokens starts its prefill at the first new one (prompt caching).

The KV of position p depends on tokens 0..p and on nothing after them (causal attention, and
RoPE rotates by the absolute position), so KV is reusable exactly when it is a true prefix:
the same tokens at the same positions. Copies are kept in blocks of `block` positions, in a
tree: a block's key is its tokens, under the block before it — the whole prefix picks it, as in
vLLM's automatic prefix caching, but with the tokens themselves as keys (no hash, so no
collision can ever hand a request another prompt's KV). Requests that share a system prompt or
a few-shot preamble and then diverge share its blocks; the turns of a chat extend one path.

A request's prompt logits are kept too, on the block where its prompt ends, when the blocks up
to there hold the very KV those logits were computed from (see `store`): a later request with
the very same prompt (a retry, a regenerate, a seeded replay) then runs no forward pass at all
and samples the logits the first one did. Re-running only the last prompt token instead would
compute it as a decoding step does (one row: other kernels than a prompt's chunk), which in
bf16 on a CPU with native bf16 (avx512_bf16) moves logits by up to ~0.1 and so changes seeded
samples.

A sequence's last block is usually partial; it is kept as a leaf of fewer tokens (replaced by
the full block when a longer sequence stores it), and a lookup uses any block partly: a prompt
that shares 100 of a block's 64+36 tokens reuses exactly 100 positions. Reuse is therefore
token-exact whatever the block size, which only sets the granularity of sharing and eviction.

Bounded by `budget` bytes, least recently used first. A lookup or a store touches its blocks
from the deepest up, so every block is more recent than the blocks below it: the least
recently used block is always a leaf, and evicting it never strands a block whose prefix is
gone. Everything here is deterministic (no hashing, no clocks). The engine calls it from its
own thread only.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

BLOCK = 64  # positions per block


def common_prefix(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    """How many leading ids a and b share, at most `limit`."""
    n = max(0, min(len(a), len(b), limit))
    if list(a[:n]) == list(b[:n]):  # the usual answer (all of it) without a Python loop
        return n
    i = 0
    while a[i] == b[i]:  # stops before n: they differ there
        i += 1
    return i


@dataclass(eq=False)
class _Block:
    tokens: tuple[int, ...]
    k: Tensor  # [layers, kv heads, len(tokens), head dim]
    v: Tensor
    parent: _Block | None
    children: dict[tuple[int, ...], _Block] = field(default_factory=dict)
    ends: dict[int, Tensor] = field(default_factory=dict)  # n -> logits of a prompt ending
                                                           # at this block's n-th token

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes + sum(t.nbytes for t in self.ends.values())


@dataclass
class Hit:
    """What a lookup found: blocks from the first position on, and how many positions of each
    to use (all but possibly the last in full)."""
    path: list[tuple[_Block, int]]

    @property
    def tokens(self) -> int:
        return sum(n for _, n in self.path)

    @property
    def logits(self) -> Tensor | None:
        """The logits kept for a prompt of exactly the hit's tokens, if any."""
        return self.path[-1][0].ends.get(self.path[-1][1]) if self.path else None


class PrefixCache:
    def __init__(self, budget: int, block: int = BLOCK) -> None:
        if budget < 0 or block < 1:
            raise ValueError(f"prefix cache: budget {budget} and block {block} must be >= 0/1")
        self.budget, self.block = budget, block
        self.used = 0  # bytes held
        self.root = _Block((), torch.empty(0), torch.empty(0), None)
        self._lru: OrderedDict[_Block, None] = OrderedDict()  # least recent first

    def __len__(self) -> int:
        return len(self._lru)

    def lookup(self, ids: Sequence[int], limit: int) -> Hit:
        """The longest cached prefix of ids[:limit] (empty when nothing matches)."""
        path: list[tuple[_Block, int]] = []
        node, at, B = self.root, 0, self.block
        while at + B <= limit and (child := node.children.get(tuple(ids[at:at + B]))):
            path.append((child, B))
            node, at = child, at + B
        best, used = None, 0  # the last block may be used in part: the child sharing the most
        for child in node.children.values():
            n = common_prefix(child.tokens, ids[at:limit], limit - at)
            if n > used:
                best, used = child, n
        if best is not None:
            path.append((best, used))
        return Hit(path)

    def copy(self, hit: Hit, k: Tensor, v: Tensor) -> None:
        """Write the hit's KV into one sequence's cache rows k, v [layers, K, S, A] at its
        positions, and mark its blocks used."""
        at = 0
        for block, n in hit.path:
            k[:, :, at:at + n].copy_(block.k[:, :, :n])
            v[:, :, at:at + n].copy_(block.v[:, :, :n])
            at += n
        self._touch([b for b, _ in hit.path])

    def store(self, ids: Sequence[int], k: Tensor, v: Tensor,
              prompt: tuple[int, Tensor, int] | None = None) -> None:
        """Keep copies of the KV of positions 0..len(ids)-1 (one sequence's rows k, v
        [layers, K, S, A], holding ids), sharing the blocks already held; then evict down to
        the budget. `prompt` (its length, the logits the sequence's prefill computed after it,
        how many of its positions were copied from here): the logits are kept where the prompt
        ends if every block up to there holds the KV they were computed from, i.e. is this
        store's own copy or lies within the copied positions (a block held before that came
        from another computation, which may differ in its last bits)."""
        per_token = 2 * k[:, :, :1].nbytes
        ids = ids[:self.budget // per_token] if per_token else ids  # more would be evicted
        path, node, B, own = [], self.root, self.block, []
        for at in range(0, len(ids), B):
            tokens = tuple(ids[at:at + B])
            child = node.children.get(tokens)
            if child is None and len(tokens) < B and any(
                    t[:len(tokens)] == tokens for t in node.children):
                break  # a partial tail that a held block already covers
            own.append(child is None)
            if child is None:
                child = self._add(node, tokens, k[:, :, at:at + len(tokens)],
                                  v[:, :, at:at + len(tokens)])
            path.append(child)
            node = child
        if prompt is not None:
            n, logits, copied = prompt
            last = (n - 1) // B  # the block holding the prompt's last token
            end = n - last * B  # the prompt's end in it
            theirs = 0 < n <= sum(len(b.tokens) for b in path) and all(
                own[i] or i * B + len(path[i].tokens) <= copied for i in range(last + 1))
            # only in room left free (logits never push KV out), and once
            if theirs and self.used + logits.nbytes <= self.budget and end not in path[last].ends:
                path[last].ends[end] = logits.clone()
                self.used += logits.nbytes
        self._touch(path)
        while self.used > self.budget:
            self._drop(next(iter(self._lru)))  # the least recent block, always a leaf

    def _add(self, parent: _Block, tokens: tuple[int, ...], k: Tensor, v: Tensor) -> _Block:
        for t, sibling in list(parent.children.items()):  # partial tails this one covers
            if len(t) < len(tokens) and tokens[:len(t)] == t:
                self._drop(sibling)
        block = _Block(tokens, k.clone(memory_format=torch.contiguous_format),
                       v.clone(memory_format=torch.contiguous_format), parent)
        parent.children[tokens] = block
        self.used += block.nbytes
        return block

    def _drop(self, block: _Block) -> None:
        assert not block.children, "only leaves are evicted"
        assert block.parent is not None
        del block.parent.children[block.tokens]
        del self._lru[block]
        self.used -= block.nbytes

    def _touch(self, path: list[_Block]) -> None:
        for block in reversed(path):  # deepest first: a prefix is always more recent
            self._lru[block] = None
            self._lru.move_to_end(block)
