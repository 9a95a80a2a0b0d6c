"""What every corpus source shares: logging, the error type, ``Document``, cleaning, writing.

One copy of the cleaning rules (NFC, Unix newlines, no control characters, at most one blank
line) and of the file writing keeps every source's text in the same format.
"""

from __future__ import annotations

import hashlib
import re
import sys
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_T0 = time.monotonic()  # log times are since the first import


def log(msg: str) -> None:
    """Print a progress message with the elapsed time to stderr."""
    print(f"[{time.monotonic() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


class SourceError(RuntimeError):
    """A download or parse failure; the message names the package and file."""


@dataclass
class Document:
    """One document: ``key`` is stable and language-independent where possible."""

    key: str
    paragraphs: list[str]


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\u200b\ufeff]")
_NBSP = re.compile(r"[\u00a0\u202f]")


def clean_text(text: str) -> str:
    """NFC, Unix newlines, no control characters or trailing spaces, at most one blank line."""
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    text = _NBSP.sub(" ", _CONTROL.sub("", text))
    text = "\n".join(line.rstrip() for line in text.split("\n")).strip("\n")
    return re.sub(r"\n{3,}", "\n\n", text)


def split_paragraphs(text: str) -> list[str]:
    """Split on blank lines and clean; empty paragraphs are dropped."""
    paragraphs = (clean_text(p) for p in re.split(r"\n[ \t]*\n", text.replace("\r", "")))
    return [p for p in paragraphs if p.strip()]


def decode(data: bytes, where: str) -> str:
    """UTF-8 (with or without BOM), else Latin-1 with a warning."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        log(f"warning: {where} is not UTF-8, reading it as Latin-1")
        return data.decode("latin-1")


def write_text(path: Path, text: str) -> dict[str, Any]:
    """Write ``text`` as UTF-8 (creating folders); return its size and sha256 for the manifest."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = text.encode("utf-8")
    path.write_bytes(data)
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
