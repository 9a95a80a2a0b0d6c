"""Which experts the router picks: the Mixtral paper's Section 5 (Figures 7-10, Table 5).

For every token (BOS excluded) and layer we record the router's ordered top-k experts (first
choice = largest logit; the softmax over the chosen logits keeps that order). Per layer and
domain: the share of first choices, of second choices and of all assignments ("either") that go
to each expert; and over adjacent tokens of the same document, how often the first choice
repeats and how often the two top-k sets share an expert, against the chance levels 1/E and
1 - C(E-k, k) / C(E, k) (1/8 and 13/28 for Mixtral's 8 experts, top-2).
"""

from __future__ import annotations

import html
import math
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mixtral.cache import KVCache
from mixtral.eval.forward import check_length
from mixtral.eval.perplexity import is_hidden, read_documents
from mixtral.model import Transformer
from mixtral.prefill import chunks
from mixtral.tokenizer import Tokenizer


def baselines(num_experts: int, top_k: int) -> dict[str, float]:
    """Repetition rates of a router that picks uniformly at random."""
    return {"first": 1 / num_experts,
            "either": 1 - math.comb(num_experts - top_k, top_k) / math.comb(num_experts, top_k)}


def table_layers(n_layers: int) -> list[int]:
    """First, middle and last layer: 0, 15, 31 for Mixtral's 32, as in Table 5."""
    return sorted({0, max(n_layers // 2 - 1, 0), n_layers - 1})


@torch.inference_mode()
def choices(model: Transformer, ids: list[int], chunk: int = 1024) -> Tensor:
    """Ordered top-k expert ids [n_layers, len(ids), k] of one sequence, chunk by chunk."""
    check_length(model, len(ids), f"a routing window of {len(ids)} tokens")
    cache = KVCache(model.args, 1, len(ids), model.dtype, model.device)
    parts = []
    for _, router_logits in chunks(model, ids, cache, chunk, last_only=True,
                                   return_router_logits=True):
        # topk sorts descending: column 0 is the first choice
        picks = [torch.topk(r.float(), model.args.num_experts_per_tok, dim=-1).indices
                 for r in router_logits]  # each [t, k]
        parts.append(torch.stack(picks).cpu())  # [n_layers, t, k]
    return torch.cat(parts, dim=1)


def statistics(docs: Sequence[Tensor], num_experts: int) -> dict[str, Any]:
    """Shares and repetition rates of one domain; docs are [n_layers, T, k] choices with the
    BOS position already removed."""
    n_layers, _, k = docs[0].shape
    first = torch.zeros(n_layers, num_experts, dtype=torch.float64)
    second = torch.zeros_like(first)
    every = torch.zeros_like(first)
    same_first = torch.zeros(n_layers, dtype=torch.float64)
    overlap = torch.zeros_like(same_first)
    tokens = pairs = 0
    for c in docs:
        tokens += c.shape[1]
        pairs += max(c.shape[1] - 1, 0)
        for layer in range(n_layers):
            first[layer] += torch.bincount(c[layer, :, 0], minlength=num_experts)
            if k > 1:
                second[layer] += torch.bincount(c[layer, :, 1], minlength=num_experts)
            every[layer] += torch.bincount(c[layer].flatten(), minlength=num_experts)
        now, nxt = c[:, :-1], c[:, 1:]  # adjacent tokens [L, T-1, k]
        same_first += (now[..., 0] == nxt[..., 0]).sum(1)
        overlap += (now[..., :, None] == nxt[..., None, :]).any(-1).any(-1).sum(1)

    def rows(t: Tensor, total: int) -> list[list[float]]:
        return (t / max(total, 1)).tolist()

    return {"tokens": tokens, "pairs": pairs,
            "first": rows(first, tokens), "second": rows(second, tokens) if k > 1 else None,
            "either": rows(every, tokens * k),
            "repeat_first": (same_first / max(pairs, 1)).tolist(),
            "repeat_either": (overlap / max(pairs, 1)).tolist()}


def domains(path: str | Path) -> dict[str, list[tuple[str, str]]]:
    """One domain per file or folder inside `path`, named by its stem (by its whole name where
    two share a stem: code.py and code.txt), or `path` itself if it is a file. Documents are
    read as `read_documents` reads them: any text file, .jsonl line by line."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if path.is_file():
        return {path.stem: read_documents(path)}
    entries = sorted(p for p in path.iterdir() if not is_hidden(Path(p.name)))
    if not entries:
        raise ValueError(f"{path}: no domains (text or .jsonl files, or folders of them)")
    stems = Counter(p.stem for p in entries)
    return {p.stem if stems[p.stem] == 1 else p.name: read_documents(p) for p in entries}


def windows(tokenizer: Tokenizer, documents: Sequence[tuple[str, str]], max_len: int,
            max_tokens: int) -> list[list[int]]:
    """Each document cut into windows of at most max_len tokens, each starting with BOS, until
    max_tokens text tokens are taken."""
    out, taken = [], 0
    step = max_len - 1  # BOS takes one position
    for _, text in documents:
        ids = tokenizer.encode(text, bos=False)
        for start in range(0, len(ids), step):
            piece = ids[start:start + step][:max_tokens - taken]
            if len(piece) < 2:
                break
            out.append([tokenizer.bos_id] + piece)
            taken += len(piece)
            if taken >= max_tokens:
                return out
    return out


def run(model: Transformer, tokenizer: Tokenizer, data: dict[str, list[tuple[str, str]]],
        max_len: int, max_tokens: int, chunk: int = 1024,
        progress: Callable[[int], Any] | None = None) -> dict[str, Any]:
    args = model.args
    check_length(model, max_len, f"--max-len {max_len}")
    result: dict[str, Any] = {
        "layers": args.n_layers, "experts": args.num_experts, "top_k": args.num_experts_per_tok,
        "baselines": baselines(args.num_experts, args.num_experts_per_tok),
        "table_layers": table_layers(args.n_layers), "domains": {}}
    for name, documents in data.items():
        docs = [choices(model, ids, chunk)[:, 1:] for ids in
                windows(tokenizer, documents, max_len, max_tokens)]
        if not docs:
            raise ValueError(f"domain {name!r} has no text")
        result["domains"][name] = statistics(docs, args.num_experts)
        if progress:
            progress(1)
    return result


def table(result: dict[str, Any]) -> str:
    """Markdown in the shape of the paper's Table 5 (percent)."""
    layers = result["table_layers"]
    head = ["domain"] + [f"first L{i}" for i in layers] + [f"first-or-second L{i}"
                                                              for i in layers]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, d in result["domains"].items():
        cells = [f"{100 * d['repeat_first'][i]:.1f} %" for i in layers] + \
                [f"{100 * d['repeat_either'][i]:.1f} %" for i in layers]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    b = result["baselines"]
    chance = [f"{100 * b['first']:.1f} %"] * len(layers) + \
        [f"{100 * b['either']:.1f} %"] * len(layers)
    lines.append("| chance | " + " | ".join(chance) + " |")
    return "\n".join(lines) + "\n"


def html_view(model: Transformer, tokenizer: Tokenizer, text: str, chunk: int = 1024) -> str:
    """The text with every token coloured by its first-choice expert at the first, middle and
    last layer (the paper's Figure 8), as a self-contained HTML page."""
    ids = tokenizer.encode(text)[:model.args.max_seq_len]
    picks = choices(model, ids, chunk)[:, 1:, 0]  # [L, T]
    pieces = [tokenizer.decode(ids[:i + 1])[len(tokenizer.decode(ids[:i])):]
              for i in range(1, len(ids))]
    n = model.args.num_experts
    colour = [f"hsl({round(360 * e / n)}, 70%, 80%)" for e in range(n)]
    legend = " ".join(f'<span style="background:{colour[e]}">expert {e}</span>'
                      for e in range(n))
    sections = []
    for layer in table_layers(model.args.n_layers):
        spans = "".join(
            f'<span title="expert {int(e)}" style="background:{colour[int(e)]}">'
            f"{html.escape(p)}</span>" for p, e in zip(pieces, picks[layer], strict=True))
        sections.append(f"<h2>layer {layer}</h2><pre>{spans}</pre>")
    return ("<!doctype html><meta charset=utf-8><title>first-choice experts</title>"
            "<style>body{font-family:sans-serif} pre{white-space:pre-wrap;line-height:1.6}"
            f"</style><h1>First-choice expert per token</h1><p>{legend}</p>"
            + "".join(sections) + "\n")
