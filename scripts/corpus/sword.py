"""Bibles from SWORD zText modules (WEB, KJV, Reina-Valera 1909): one document per chapter.

A zText module is a verse index (``.bzv``) into zlib blocks (``.bzs`` / ``.bzz``) of OSIS XML;
``osis_text`` turns a verse's OSIS into plain text. Chapters are keyed by OSIS id (``Gen.1``), so
the same chapter is held out in every translation.
"""

from __future__ import annotations

import html
import re
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

from .packages import Fetched
from .text import Document, SourceError


def sword_entries(files: dict[str, bytes], testament: str) -> Iterator[str]:
    """Raw OSIS text of every verse-index slot of a zText module, in canonical order."""
    bzs, bzz, bzv = (files[f"{testament}.{ext}"] for ext in ("bzs", "bzz", "bzv"))
    current, block = -1, b""
    for pos in range(0, len(bzv) - 9, 10):
        number, offset, size = struct.unpack_from("<IIH", bzv, pos)
        if size == 0:
            yield ""
            continue
        if number != current:
            start, csize, _ = struct.unpack_from("<III", bzs, number * 12)
            block, current = zlib.decompress(bzz[start : start + csize]), number
        yield block[offset : offset + size].decode("utf-8", errors="replace")


_NOTE = re.compile(r"<note\b.*?</note>", re.S)
_BREAK_TAG = re.compile(r"</?title\b[^>]*>")
_SPACE_TAG = re.compile(r"<(?=/?(?:l|lb|lg|div|item|list|p|milestone|chapter|verse)\b)")
_TAG = re.compile(r"<[^>]*>")


def osis_text(raw: str, prose: bool = False) -> str:
    """Plain text of an OSIS fragment: notes dropped, titles on their own lines, no pilcrows.

    With ``prose`` (introductions), OSIS paragraphs and poetry lines also start new lines.
    """
    text = _BREAK_TAG.sub("\n", _NOTE.sub(" ", raw))  # notes often sit between two words
    text = re.sub(r"<[^>]*$", "", text)  # a tag cut off at the end of an oversized slot
    if prose:
        text = re.sub(r"<(?:/?p\b|div\b|lb\b|l\b|/l>|item\b)[^>]*>", "\n", text)
    text = html.unescape(_TAG.sub("", _SPACE_TAG.sub(" <", text))).replace("\u00b6", " ")
    lines = (re.sub(r" ([,.;:!?])", r"\1", " ".join(line.split())) for line in text.split("\n"))
    return "\n".join(line for line in lines if line)


_BOOK = re.compile(r"<div\b(?=[^>]*\btype=\"book\")(?=[^>]*\bsID=)[^>]*>")
_CHAPTER = re.compile(r"<chapter\b(?=[^>]*\bsID=)[^>]*\bosisID=\"([^\"]+)\"[^>]*>")


def book_name(raw: str, fallback: str) -> str:
    """The short book name (usfm ``h`` or ``toc2`` milestone) of a book heading slot."""
    for kind in ("x-usfm-h", "x-usfm-toc2"):
        match = re.search(rf"<milestone\b(?=[^>]*type=\"{kind}\")[^>]*\bn=\"([^\"]+)\"", raw)
        if match:
            return html.unescape(match.group(1)).strip()
    return fallback


def extract_sword(pkg: Fetched) -> list[Document]:
    """One document per chapter, keyed by OSIS id (``Gen.1``); one verse per line."""
    found = pkg.members(r"modules/texts/ztext/[^/]+/[on]t\.bz[szv]$")
    files = {Path(name).name: data for name, data in found}
    docs: list[Document] = []
    book = pending_title = chapter = ""
    lines: list[str] = []

    def flush() -> None:
        nonlocal pending_title
        if chapter and lines:
            paragraphs = [pending_title] if pending_title else []
            paragraphs.append(f"{book} {chapter.split('.')[-1]}\n" + "\n".join(lines))
            docs.append(Document(chapter, paragraphs))
            pending_title = ""

    for testament in ("ot", "nt"):
        if f"{testament}.bzv" not in files:
            continue
        for raw in sword_entries(files, testament):
            chap = _CHAPTER.search(raw)
            head = raw[: chap.start()] if chap else raw
            books = list(_BOOK.finditer(head))
            if books:  # a book heading slot (may start with front matter, e.g. a preface)
                flush()
                chapter, lines = "", []
                front = osis_text(head[: books[-1].start()], prose=True)
                if front:
                    docs.append(Document(f"front.{len(docs)}", front.split("\n")))
                head = head[books[-1].start() :]
                osis_book = re.search(r"osisID=\"([^\".]+)", head)
                book = book_name(head, osis_book.group(1) if osis_book else "?")
                pending_title = osis_text(head)
                if not chap:
                    continue
            if chap:  # a chapter heading slot: start a new document
                flush()
                chapter, lines = chap.group(1), []
                raw = raw[chap.end() :]
            text = osis_text(raw)
            if text and chapter:
                lines.append(text)
    flush()
    if len(docs) < 100:
        raise SourceError(f"{pkg.path.name}: only {len(docs)} chapters found")
    return docs
