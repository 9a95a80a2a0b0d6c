"""The two outputs besides pretraining text: aligned translations and word definitions.

``parallel/libreoffice.jsonl`` pairs the help pages' blocks across the five languages (used for
translation tasks); ``definitions.jsonl`` lists WordNet words with gloss and example (used for
definition tasks by scripts/build_instruct_data.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .builder import Builder
from .packages import LO_LANGS, deb
from .pretrain import is_val
from .text import log, write_text
from .wordnet import WORDNET_POS

PARALLEL_MIN_CHARS = 12  # shorter or one-word help blocks (icons, labels) are not aligned
PARALLEL_MIN_WORDS = 2


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
    """One JSON line per (word, synset); the example prefers one that uses the word; the
    synset's hypernyms (and a verb's sentence frames) let a script walk WordNet's tree."""
    rows = []
    for s in builder.wordnet():
        for word in s.words:
            row: dict[str, Any] = {"word": word, "pos": WORDNET_POS[s.pos], "gloss": s.definition}
            using = [e for e in s.examples if word.lower() in e.lower()]
            if using or s.examples:
                row["example"] = (using or s.examples)[0]
            row["synset"] = f"{s.offset}-{s.pos}"
            row["hypernyms"] = s.hypernyms
            if s.pos == "v":
                row["frames"] = s.frames
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
