"""Training data: packed pretraining text, SFT rows (conversations and plain text),
preference pairs.

Batches are a pure function of (seed, step, micro-batch index): a resumed run, or a run split
over several processes, draws exactly the batches an uninterrupted single-process run draws.
Malformed input stops with the file and line that is wrong.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mixtral.chat import ChatError, encode, encode_for_training
from mixtral.tokenizer import Tokenizer
from mixtral.train.config import TrainingError


class DataError(TrainingError):
    """A data file that cannot be trained on, named with its line."""


def _files(paths: Sequence[str | Path], suffixes: tuple[str, ...]) -> list[Path]:
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.suffix in suffixes and f.is_file())
        elif p.is_file():
            out.append(p)
        else:
            raise DataError(f"{p}: no such file or directory")
    if not out:
        raise DataError(f"no {'/'.join(suffixes)} files in {', '.join(map(str, paths))}")
    return out


def _jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
                if not isinstance(obj, dict):
                    raise DataError(f"{path}:{n}: expected a JSON object")
                yield n, obj
    except UnicodeDecodeError:
        raise _not_utf8(path) from None


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise _not_utf8(path) from None


def _not_utf8(path: Path) -> DataError:
    """Where `path` stops being UTF-8: its first bad line, the byte and its column (counted in
    characters, as an editor shows it). The decoder's own error cannot say: it decodes the
    file in chunks, and its position is within the chunk, not the file or a line."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):  # a UTF-8 sequence never holds a newline byte
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                column = len(raw[:e.start].decode("utf-8")) + 1
                return DataError(f"{path}:{n}: not UTF-8 (byte 0x{raw[e.start]:02x} at "
                                 f"column {column})")
    return DataError(f"{path}: not UTF-8")  # only if the file changed while being read


# --- pretraining ---------------------------------------------------------------------------------

def pretrain_tokens(paths: Sequence[str | Path], tokenizer: Tokenizer) -> Tensor:
    """All documents as one int32 stream: <s> document </s> ... Plain-text files are one
    document each; JSONL files hold one {"text": ...} document per line."""
    stream: list[int] = []
    for path in _files(paths, (".txt", ".jsonl")):
        if path.suffix == ".jsonl":
            for n, obj in _jsonl(path):
                if not isinstance(obj.get("text"), str):
                    raise DataError(f'{path}:{n}: expected {{"text": "..."}}')
                stream += tokenizer.encode(obj["text"], bos=True, eos=True)
        else:
            stream += tokenizer.encode(_read_text(path), bos=True, eos=True)
    return torch.tensor(stream, dtype=torch.int32)


@dataclass
class Batch:
    tokens: Tensor  # [B, T] model input
    targets: Tensor  # [B, T] next tokens
    loss_mask: Tensor  # [B, T] 1 where the target counts
    token_mask: Tensor  # [B, T] 1 where the input is a real token (not padding)
    key: int = 0  # seeds what the loss draws (sampled_softmax), so a resumed run draws the same


def batch_key(seed: int, step: int, micro: int) -> int:
    return seed * 1_000_003 + step * 1009 + micro


def _generator(seed: int, step: int, micro: int) -> torch.Generator:
    return torch.Generator().manual_seed(batch_key(seed, step, micro))


def pretrain_batch(stream: Tensor, batch_size: int, seq_len: int, seed: int, step: int,
                   micro: int) -> Batch:
    """Random windows of seq_len + 1 tokens from the stream."""
    if len(stream) < seq_len + 2:
        raise DataError(f"{len(stream)} tokens of data cannot fill a sequence of {seq_len}")
    starts = torch.randint(0, len(stream) - seq_len - 1, (batch_size,),
                           generator=_generator(seed, step, micro))
    windows = torch.stack([stream[s:s + seq_len + 1] for s in starts.tolist()]).long()
    ones = torch.ones(batch_size, seq_len, dtype=torch.bool)
    return Batch(windows[:, :-1], windows[:, 1:], ones, ones, batch_key(seed, step, micro))


# --- supervised fine-tuning ----------------------------------------------------------------------

def sft_examples(paths: Sequence[str | Path], tokenizer: Tokenizer,
                 max_len: int) -> list[tuple[list[int], list[int]]]:
    """JSONL lines -> (ids, loss mask) rows of at most max_len + 1 tokens. A line is a
    conversation, {"messages": [...]} ending with an assistant message (loss on the answers,
    the rest cut off); plain text, {"text": "..."} (loss on every token, as in pretraining,
    so that fine-tuning keeps text modelling alive; a long text becomes several rows, so none
    of it is lost); or token ids as Hugging Face writes them, {"input_ids": [...], "labels":
    [...]} (a label is its input id where the loss counts, -100 where it does not; for
    sequences that are not text, such as spans drawn from the whole vocabulary)."""
    out = []
    for path in _files(paths, (".jsonl",)):
        for n, obj in _jsonl(path):
            if "input_ids" in obj:
                ids, mask = _id_row(obj, tokenizer.vocab_size, f"{path}:{n}")
                out.append((ids[:max_len + 1], mask[:max_len + 1]))
                continue
            messages, text = obj.get("messages"), obj.get("text")
            if isinstance(messages, list) == isinstance(text, str):
                raise DataError(f'{path}:{n}: expected {{"messages": [...]}} or '
                                f'{{"text": "..."}}' + (", not both" if text is not None
                                                        and messages is not None else ""))
            if isinstance(text, str):
                if not text.strip():
                    raise DataError(f"{path}:{n}: the text is empty")
                out += text_rows(tokenizer.encode(text, bos=True, eos=True), max_len)
                continue
            try:
                ids, mask = encode_for_training(obj["messages"], tokenizer)
            except ChatError as e:
                raise DataError(f"{path}:{n}: {e}") from None
            out.append((ids[:max_len + 1], mask[:max_len + 1]))
    return out


def _id_row(obj: dict[str, Any], vocab_size: int, where: str) -> tuple[list[int], list[int]]:
    """A checked {"input_ids": [...], "labels": [...]} line -> (ids, loss mask)."""
    ids, labels = obj.get("input_ids"), obj.get("labels")
    if not (isinstance(ids, list) and isinstance(labels, list) and len(ids) == len(labels) >= 2
            and all(type(i) is int for i in ids + labels)):
        raise DataError(f'{where}: expected {{"input_ids": [...], "labels": [...]}}: two '
                        "lists of integers of one length, at least 2")
    bad = next((i for i in ids if not 0 <= i < vocab_size), None)
    if bad is not None:
        raise DataError(f"{where}: input id {bad} is outside the vocabulary (0..{vocab_size - 1})")
    wrong = next((j for j, (i, y) in enumerate(zip(ids, labels, strict=True))
                  if y not in (i, -100)), None)
    if wrong is not None:
        raise DataError(f"{where}: labels[{wrong}] is {labels[wrong]}: a label is its input id "
                        f"({ids[wrong]}) or -100 (no loss)")
    if labels[0] != -100:
        raise DataError(f"{where}: labels[0] must be -100: nothing comes before the first id "
                        "to predict it")
    return ids, [int(y != -100) for y in labels]


def text_rows(ids: list[int], max_len: int) -> list[tuple[list[int], list[int]]]:
    """A document's ids as rows of at most max_len + 1 tokens, each row starting where the
    last one's final target was, so every token after <s> is a target exactly once."""
    return [(ids[s:s + max_len + 1], [0] + [1] * (len(ids[s:s + max_len + 1]) - 1))
            for s in range(0, max(len(ids) - 1, 1), max_len)]


def pad_batch(rows: list[tuple[list[int], list[int]]], pad_id: int = 0) -> Batch:
    """Right-pad (ids, mask) rows into one batch; padding never counts."""
    T = max(len(ids) for ids, _ in rows) - 1
    B = len(rows)
    tokens = torch.full((B, T + 1), pad_id, dtype=torch.long)
    mask = torch.zeros(B, T + 1, dtype=torch.bool)
    real = torch.zeros(B, T + 1, dtype=torch.bool)
    for i, (ids, m) in enumerate(rows):
        tokens[i, :len(ids)] = torch.tensor(ids)
        mask[i, :len(m)] = torch.tensor(m, dtype=torch.bool)
        real[i, :len(ids)] = True
    return Batch(tokens[:, :-1], tokens[:, 1:], mask[:, 1:], real[:, :-1])


def sample_rows(n: int, batch_size: int, seed: int, step: int, micro: int) -> list[int]:
    return torch.randint(0, n, (batch_size,), generator=_generator(seed, step, micro)).tolist()


# --- preference pairs ----------------------------------------------------------------------------

@dataclass
class Pair:
    chosen: tuple[list[int], list[int]]  # (ids, mask on the response)
    rejected: tuple[list[int], list[int]]


def preference_pairs(paths: Sequence[str | Path], tokenizer: Tokenizer, max_len: int) -> list[Pair]:
    """JSONL lines {"messages": [... ending with a user turn], "chosen": str, "rejected": str}."""
    out = []
    for path in _files(paths, (".jsonl",)):
        for n, obj in _jsonl(path):
            messages, chosen, rejected = obj.get("messages"), obj.get("chosen"), obj.get("rejected")
            if not (isinstance(messages, list) and isinstance(chosen, str)
                    and isinstance(rejected, str)):
                raise DataError(f'{path}:{n}: expected {{"messages": [...], "chosen": "...", '
                                '"rejected": "..."}}')
            try:
                prompt = encode(messages, tokenizer=tokenizer)
            except ChatError as e:
                raise DataError(f"{path}:{n}: {e}") from None
            sides = []
            ends = (True, obj.get("rejected_eos", True) is not False)  # rambling: no </s>
            for answer, eos in zip((chosen, rejected), ends, strict=True):
                response = tokenizer.encode(answer, bos=False) + ([tokenizer.eos_id] if eos else [])
                ids = (prompt + response)[:max_len + 1]
                sides.append((ids, ([0] * len(prompt) + [1] * len(response))[:max_len + 1]))
            out.append(Pair(sides[0], sides[1]))
    return out
