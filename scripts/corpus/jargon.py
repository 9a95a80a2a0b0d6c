"""The Jargon File 4.4.7 (``jargon-text``): chapters, appendices and one document per entry.

The plain-text edition is indented and carries tables of contents and box-drawing tables;
``jargon_paragraphs`` removes those so only prose is left.
"""

from __future__ import annotations

import gzip
import re

from .packages import Fetched
from .text import Document, SourceError, decode, split_paragraphs

_JARGON_SECTION = re.compile(r"^(Chapter\s\d+\.|Appendix\s[A-Z]\.|Glossary$)")
_JARGON_ENTRY = re.compile(r"^   :(.+?):")
_BOX = re.compile(r"[\u2500-\u257f]")


def jargon_paragraphs(lines: list[str]) -> list[str]:
    """Dedent and split; drop tables of contents, box-drawing tables and centred part titles."""
    text = "\n".join(re.sub(r"^ {1,3}", "", line) for line in lines)
    out: list[str] = []
    in_toc = False
    for para in split_paragraphs(text):
        if para.strip() == "Table of Contents":
            in_toc = True
            continue
        if in_toc and "\n" not in para and not para.rstrip().endswith((".", ":", "?", "!")):
            continue
        in_toc = False
        if len(_BOX.findall(para)) > len(para) // 10 or re.match(r" {10,}Part [IVX]+\.", para):
            continue
        out.append(para.lstrip("\n"))
    return out


def extract_jargon(pkg: Fetched) -> list[Document]:
    """Jargon File 4.4.7: chapters, one document per glossary entry, appendices."""
    text = decode(gzip.decompress(pkg.member(r"jargon-text/jargon\.txt\.gz$")), "jargon.txt")
    sections: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        if _JARGON_SECTION.match(line):
            sections.append((line.strip(), []))
        elif sections:
            sections[-1][1].append(line)
    docs = []
    for title, lines in sections:
        if title != "Glossary":
            docs.append(Document(title, [title, *jargon_paragraphs(lines)]))
            continue
        entry, body = "", list[str]()
        for line in [*lines, "   :<end>:"]:
            match = _JARGON_ENTRY.match(line)
            if match:
                if entry:
                    docs.append(Document(f"entry:{entry}", jargon_paragraphs(body)))
                entry, body = match.group(1), []
            if entry:
                body.append(line)
    if len(docs) < 1000:
        raise SourceError(f"jargon.txt: only {len(docs)} sections/entries found")
    return docs
