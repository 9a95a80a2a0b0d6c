"""Jane Austen's six novels, read from the R package janeaustenr's lazy-load database.

The text sits in ``data/Rdata.rdb`` as R character vectors (one per line), indexed by
``Rdata.rdx``; ``RReader`` understands just enough of R's XDR serialization to read them, so R
is not needed.
"""

from __future__ import annotations

import gzip
import lzma
import struct
import zlib
from typing import Any

from .packages import Fetched
from .text import Document, SourceError, split_paragraphs


class RReader:
    """A minimal reader for R's XDR serialization (enough for character vectors and lists)."""

    def __init__(self, data: bytes) -> None:
        if data[:2] != b"X\n":
            raise SourceError("not an XDR R serialization")
        self.data, self.pos = data, 2
        self.refs: list[Any] = []
        version = self.read_int()
        self.pos += 8  # writer and minimal reader versions
        if version == 3:
            self.pos += 4 + self.read_int()  # native encoding name

    def read_int(self) -> int:
        (value,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return int(value)

    def length(self) -> int:
        n = self.read_int()
        return (self.read_int() << 32) + self.read_int() if n == -1 else n

    def read(self) -> Any:
        """Read one object: vectors become lists, named vectors dicts, pairlists dicts."""
        flags = self.read_int()
        kind, levels = flags & 0xFF, flags >> 12
        has_attr, has_tag = flags & 0x200, flags & 0x400
        if kind in (254, 253, 252, 251, 250, 242, 241):  # NULL, environments, markers
            return None
        if kind == 255:  # reference to an earlier symbol
            index = flags >> 8 or self.read_int()
            return self.refs[index - 1]
        if kind == 1:  # symbol
            name = self.read()
            self.refs.append(name)
            return name
        if kind == 9:  # CHARSXP
            n = self.read_int()
            if n == -1:
                return None
            raw = self.data[self.pos : self.pos + n]
            self.pos += n
            return raw.decode("latin-1" if levels & 4 else "utf-8", errors="replace")
        if kind in (2, 239):  # pairlist
            if has_attr:
                self.read()  # attributes of a pairlist cell are not needed
            tag = self.read() if has_tag else None
            head = {tag: self.read()}
            tail = self.read()
            return {**head, **tail} if isinstance(tail, dict) else head
        value = self.read_vector(kind)
        attrs = self.read() if has_attr else None
        if isinstance(attrs, dict) and isinstance(attrs.get("names"), list):
            return dict(zip(attrs["names"], value, strict=True))
        return value

    def read_vector(self, kind: int) -> list[Any]:
        n = self.length()
        if kind in (16, 19, 20):  # character vector, list, expression
            return [self.read() for _ in range(n)]
        fmt = {10: "i", 13: "i", 14: "d"}.get(kind)
        if fmt is None:
            raise SourceError(f"unsupported R object type {kind}")
        values = struct.unpack_from(f">{n}{fmt}", self.data, self.pos)
        self.pos += n * struct.calcsize(fmt)
        return list(values)


def r_lazyload_object(rdb: bytes, offset: int, length: int, compressed: int) -> Any:
    """Decompress and read one object of an R lazy-load database (.rdb)."""
    blob = rdb[offset : offset + length]
    if compressed in (2, 3):
        kind, body = blob[4:5], blob[5:]
        if kind == b"Z":
            body = lzma.decompress(body)
        elif kind == b"2":
            import bz2

            body = bz2.decompress(body)
        elif kind != b"0":
            body = zlib.decompress(blob[4:])
        return RReader(body).read()
    return RReader(zlib.decompress(blob[4:])).read()


def extract_austen(pkg: Fetched) -> list[Document]:
    """Six novels: character vectors (one per line) in janeaustenr's data/Rdata.rdb."""
    base = r"janeaustenr/data/Rdata"
    index = RReader(gzip.decompress(pkg.member(base + r"\.rdx$"))).read()
    rdb = pkg.member(base + r"\.rdb$")
    compressed = int((index.get("compressed") or [1])[0])
    docs = []
    for name, (offset, length) in sorted(index["variables"].items()):
        lines = r_lazyload_object(rdb, offset, length, compressed)
        if not isinstance(lines, list) or not all(isinstance(x, str | None) for x in lines):
            raise SourceError(f"Rdata.rdb: object {name!r} is not a character vector")
        text = "\n".join(x or "" for x in lines)
        docs.append(Document(name, split_paragraphs(text)))
    return docs
