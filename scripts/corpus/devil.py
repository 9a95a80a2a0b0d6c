"""The Devil's Dictionary (Ambrose Bierce), read from the dictd database of ``dict-devil``.

dictd's index gives each entry's offset and length in base-64 digits into the gzipped body.
"""

from __future__ import annotations

import gzip

from .packages import Fetched
from .text import Document, split_paragraphs

_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def dictd_number(text: str) -> int:
    value = 0
    for char in text:
        value = value * 64 + _B64.index(char)
    return value


def extract_devil(pkg: Fetched) -> list[Document]:
    """The Devil's Dictionary: the preface, then one document per dictd entry."""
    body = gzip.decompress(pkg.member(r"dictd/devil\.dict\.dz$"))
    index = pkg.member(r"dictd/devil\.index$").decode("utf-8")
    entries: dict[int, tuple[int, str]] = {}
    for line in index.splitlines():
        word, start, length = line.split("\t")[:3]
        entries.setdefault(dictd_number(start), (dictd_number(length), word))
    docs = []
    for offset, (size, word) in sorted(entries.items()):
        text = body[offset : offset + size].decode("utf-8")
        if word == "00databaseinfo":
            preface = text.find("PREFACE")
            if preface < 0:
                continue
            word, text = "preface", text[preface:]
        elif word.startswith("00database"):
            continue
        docs.append(Document(word, split_paragraphs(text)))
    return docs
