"""WordNet 3.0 synsets from ``wordnet-base``'s ``data.{noun,verb,adj,adv}`` files.

Parsed once and used twice: as pretraining text (``sources.wordnet_documents``) and as the
word/gloss/example rows of ``definitions.jsonl`` (``artifacts.build_definitions``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .packages import Fetched
from .text import SourceError, clean_text


@dataclass
class Synset:
    offset: str
    pos: str
    lexfile: int
    words: list[str]
    definition: str
    examples: list[str]
    gloss: str
    hypernyms: list[str]  # "offset-pos" of the synsets one level up ("@" and "@i" pointers)
    frames: list[int]  # a verb's sentence frames (8: "Somebody ----s something", 9: "...
    # somebody"), for any of its words


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
                at = 4 + 2 * count
                pointers = [fields[at + 1 + 4 * i : at + 5 + 4 * i] for i in range(int(fields[at]))]
                hypernyms = [f"{off}-{pos}" for sym, off, pos, _ in pointers if sym in ("@", "@i")]
                at += 1 + 4 * len(pointers)
                # a verb's frames: f_cnt, then "+ f_num w_num" each (w_num 00: every word)
                frames = sorted({int(fields[at + 2 + 3 * i]) for i in range(int(fields[at]))}
                                if fields[2] == "v" else ())
                gloss = clean_text(gloss)
                definition, examples = parse_gloss(gloss)
                synsets.append(
                    Synset(fields[0], fields[2], int(fields[1]), words, definition, examples, gloss,
                           hypernyms, frames)
                )
            except (IndexError, ValueError) as exc:
                raise SourceError(f"{name}: bad line {line[:60]!r}: {exc}") from exc
    return synsets
