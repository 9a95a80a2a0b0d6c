"""Perplexity against context length: the Mixtral paper's Figure 4 (right).

For each document with at least `max_len` tokens (BOS included) and each length L of a ladder,
the perplexity of the document's first L tokens (YaRN's "truncate" mode). A causal model's loss
at position t does not depend on later tokens, so one chunked pass over the first `max_len`
tokens gives the losses of every prefix at once (`curve`); `reference_curve` recomputes each
length with its own full forward pass and no cache, and the tests hold the two equal.
Aggregates: exp(total NLL / total tokens) over documents (token-weighted), and YaRN's exp(mean
of the per-document mean NLL). The claim under test is a curve that falls as L grows:
`monotone` allows each step to rise by a relative `tolerance` (small samples are noisy).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from mixtral.eval.forward import check_length, token_nll
from mixtral.model import Transformer
from mixtral.tokenizer import Tokenizer


def read_documents(path: str | Path) -> list[tuple[str, str]]:
    """(name, text) pairs: each line of a .jsonl file is one document (its "text" field), any
    other file is one document of UTF-8 text (.txt, .md, .py, ...); a folder contributes its
    files, sorted by path, leaving out hidden ones and __pycache__. A file that is not UTF-8
    text (an image, compiled code) is refused by name rather than skipped."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    files = [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*")
                       if p.is_file() and not is_hidden(p.relative_to(path)))
    if not files:
        raise ValueError(f"{path}: no files (text files or .jsonl)")
    out = []
    for f in files:
        text = read_text(f)
        if f.suffix != ".jsonl":
            out.append((f.name, text))
            continue
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)["text"]
            except (ValueError, KeyError, TypeError):
                raise ValueError(f'{f}:{n}: expected a JSON object with a "text" string') from None
            if not isinstance(doc, str):
                raise ValueError(f'{f}:{n}: "text" must be a string')
            out.append((f"{f.name}:{n}", doc))
    return out


def read_text(path: str | Path) -> str:
    """A file's UTF-8 text; a file that is not text is a ValueError that names it."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text; give text files (one document each) or "
                         ".jsonl ({\"text\": ...} per line)") from None


def is_hidden(relative: Path) -> bool:
    """Dot files and folders, and Python's bytecode caches: never documents."""
    return any(part.startswith(".") or part == "__pycache__" for part in relative.parts)


def ladder(max_len: int, start: int = 128) -> list[int]:
    """Powers of two from `start` below max_len, then max_len itself."""
    out, n = [], start
    while n < max_len:
        out.append(n)
        n *= 2
    return out + [max_len]


def select(tokenizer: Tokenizer, documents: Sequence[tuple[str, str]], max_len: int,
           limit: int | None = None) -> list[tuple[str, list[int]]]:
    """The documents with at least max_len tokens, cut to their first max_len."""
    chosen, longest = [], 0
    for name, text in documents:
        ids = tokenizer.encode(text)
        longest = max(longest, len(ids))
        if len(ids) >= max_len:
            chosen.append((name, ids[:max_len]))
            if limit is not None and len(chosen) == limit:
                break
    if not chosen:
        raise ValueError(f"no document has {max_len} tokens (the longest has {longest}): "
                         "lower --max-len or add longer documents")
    return chosen


def _aggregate(nll: list[torch.Tensor], lengths: Sequence[int]) -> list[dict[str, float]]:
    rows = []
    for length in lengths:
        per_doc = [d[:length - 1] for d in nll]  # L tokens predict L - 1 of them
        total = sum(float(d.double().sum()) for d in per_doc)
        count = sum(len(d) for d in per_doc)
        doc_means = [float(d.double().mean()) for d in per_doc]
        rows.append({"length": length, "perplexity": math.exp(total / count),
                     "perplexity_mean_of_documents": math.exp(sum(doc_means) / len(doc_means)),
                     "tokens": count})
    return rows


def curve(model: Transformer, docs: Sequence[tuple[str, list[int]]], lengths: Sequence[int],
          chunk: int = 1024, progress: Callable[[int], Any] | None = None
          ) -> list[dict[str, float]]:
    """One chunked pass per document; every length read from the same per-token losses."""
    _check(model, docs, lengths)
    nll = []
    for _, ids in docs:
        nll.append(token_nll(model, ids[:max(lengths)], chunk))
        if progress:
            progress(1)
    return _aggregate(nll, lengths)


@torch.inference_mode()
def reference_curve(model: Transformer, docs: Sequence[tuple[str, list[int]]],
                    lengths: Sequence[int]) -> list[dict[str, float]]:
    """The slow oracle: a separate full forward (no cache) for every (document, length)."""
    _check(model, docs, lengths)
    device = model.device
    by_length: dict[int, list[torch.Tensor]] = {}
    for length in lengths:
        for _, ids in docs:
            tokens = torch.tensor([ids[:length]], device=device)
            logits = model(tokens)[0, :-1]
            nll = torch.nn.functional.cross_entropy(logits, tokens[0, 1:], reduction="none")
            by_length.setdefault(length, []).append(nll.cpu())
    rows = []
    for length in lengths:
        rows += _aggregate(by_length[length], [length])
    return rows


def _check(model: Transformer, docs: Sequence[tuple[str, list[int]]],
           lengths: Sequence[int]) -> None:
    if not lengths or min(lengths) < 2:
        raise ValueError(f"lengths must be >= 2 tokens, got {list(lengths)}")
    check_length(model, max(lengths), f"perplexity at length {max(lengths)}")
    short = [name for name, ids in docs if len(ids) < max(lengths)]
    if short:
        raise ValueError(f"documents shorter than {max(lengths)} tokens: {short[:5]}")


def monotone(rows: Sequence[dict[str, float]], tolerance: float) -> bool:
    """Each step of the curve at most `tolerance` (relative) above the one before."""
    values = [r["perplexity"] for r in rows]
    return all(b <= a * (1 + tolerance) for a, b in zip(values, values[1:], strict=False))
