"""Prompt reuse: where a new prompt's KV, and sometimes its logits, come from (prompt caching).

When a prompt's turn to prefill comes (every older prompt is in the cache by then), the engine
copies into its cache row the longest prefix it shares with a running sequence's row or with
the `PrefixCache` of finished ones (prefix_cache.py), and its prefill starts at the first token
after it. A prompt identical to a running one's, or to a finished one's whose prompt logits the
prefix cache kept, takes those logits too and runs no forward pass: the n choices of a request
(queued together, consecutive ids) run one prefill between them and decode as rows of one
batch, and a retry samples exactly its first run's numbers. Otherwise the last prompt token
still runs, to give the logits that pick the first token.

KV of a position depends only on the tokens up to it, so a copy is what the prefill would
write, up to the last bits where the copy was computed otherwise: a chat turn's answer was
decoded one row at a time, and in bf16 on a CPU with native bf16 that moves logits by up to
~0.1, enough to change a seeded token now and then.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from torch import Tensor

from mixtral.jobs import Running
from mixtral.prefix_cache import PrefixCache, common_prefix


@dataclass
class Reused:
    tokens: int  # prompt positions whose KV was copied into the row
    logits: Tensor | None  # the whole prompt's logits, when they came with it
    copied: int  # of which from the prefix cache (Running.copied: the KV its logits came from)


def reuse(prompt: list[int], slot: int, others: Iterable[Running], prefixes: PrefixCache,
          k: Tensor, v: Tensor) -> Reused:
    """Copy into cache row `slot` of k, v [layers, B, K, S, A] the longest prefix of `prompt`
    with KV at hand, in the row of one of the `others` (running sequences) or in the prefix
    cache; with the logits of the whole prompt where a running twin or the cache has them."""
    tokens, donor = 0, None
    for d in others:
        if not d.prefilled:
            continue
        if d.logits is not None and d.job.prompt == prompt:
            tokens, donor = len(prompt), d
            break
        if (n := common_prefix(prompt, d.cached(), len(prompt) - 1)) > tokens:
            tokens, donor = n, d
    # the very prompt with its logits kept (a retry), else all but its last token
    hit = prefixes.lookup(prompt, len(prompt))
    if hit.tokens < len(prompt) or hit.logits is None:
        hit = prefixes.lookup(prompt, len(prompt) - 1)
    if hit.tokens > tokens:
        prefixes.copy(hit, k[:, slot], v[:, slot])
        return Reused(hit.tokens, hit.logits if hit.tokens == len(prompt) else None, hit.tokens)
    if donor is None:
        return Reused(0, None, 0)
    k[:, slot, :, :tokens].copy_(k[:, donor.slot, :, :tokens])
    v[:, slot, :, :tokens].copy_(v[:, donor.slot, :, :tokens])
    return Reused(tokens, donor.logits if tokens == len(prompt) else None, 0)
