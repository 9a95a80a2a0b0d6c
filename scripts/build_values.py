#!/usr/bin/env python3
"""Build the training and evaluation value lists (scripts/values/{train,eval}.json) from Faker.

    python scripts/build_values.py [--per-locale 120] [--out scripts/values]

Needs the `scripts` extra (`pip install -e .[scripts]`: Faker, MIT). Training draws on the
TRAIN locales, evaluation on the disjoint EVAL locales; an evaluation value is dropped when it
also occurs, case-insensitively, in the training lists or as a word of one of their values, in
the hand-written lists of scripts/build_instruct_data.py (the shipped model's training data), or
when it has the shape of that script's made-up words. Seeded: the same Faker version gives the
same files.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import build_instruct_data as shipped
from values import HERE, KINDS

if TYPE_CHECKING:  # Faker is needed to rebuild the lists, not to read them (or to test them)
    from faker import Faker

TRAIN = ["en_US", "en_GB", "en_AU", "en_CA", "fr_FR", "fr_CA", "de_DE", "de_AT", "es_ES",
         "es_MX", "it_IT", "pt_BR", "pt_PT", "nl_NL", "pl_PL", "ru_RU", "uk_UA", "el_GR",
         "ja_JP", "zh_CN", "ko_KR", "hi_IN", "ar_AA", "he_IL"]
EVAL = ["sv_SE", "no_NO", "da_DK", "fi_FI", "et_EE", "lv_LV", "lt_LT", "cs_CZ", "sk_SK",
        "sl_SI", "hr_HR", "hu_HU", "ro_RO", "tr_TR", "az_AZ", "id_ID", "vi_VN", "fil_PH",
        "en_IE", "ga_IE", "en_NG", "yo_NG", "ig_NG", "zu_ZA", "en_IN", "is_IS", "sq_AL"]
DRAW: dict[str, Callable[[Faker], str]] = {
    "first": lambda f: f.first_name(),
    "last": lambda f: f.last_name(),
    "street": lambda f: f.street_name(),
    "city": lambda f: f.city(),
    "country": lambda f: f.country(),
    "job": lambda f: f.job(),
    "company": lambda f: f.company(),
    "domain": lambda f: f.domain_name(),
    "word": lambda f: f.word(),
}
# the shape of build_instruct_data.pseudo_word: 2-3 consonant-vowel syllables, maybe n/r/s
PSEUDO = re.compile(r"([bcdfghklmnprstvz][aeiou]){2,3}[nrs]?")
CLEAN = re.compile(r"[^\s\"\\{}\[\]:]([^\"\\{}\[\]:\n]{0,38}[^\s\"\\{}\[\]:])?")


def draw(locales: list[str], per_locale: int, seed: int) -> dict[str, set[str]]:
    """Every kind's distinct values over the locales (a kind a locale lacks is skipped)."""
    from faker import Faker

    out: dict[str, set[str]] = {kind: set() for kind in KINDS}
    for i, locale in enumerate(locales):
        fake = Faker(locale)
        fake.seed_instance(seed * 1000 + i)
        for kind, fn in DRAW.items():
            try:
                got = {fn(fake).strip() for _ in range(per_locale)}
            except AttributeError:
                continue
            out[kind] |= {v for v in got if CLEAN.fullmatch(v)}
    return out


def shipped_values() -> set[str]:
    """Every value the shipped model's training generator can write, casefolded."""
    lists = [shipped.FIRST, shipped.LAST, shipped.STREETS, shipped.CITIES, shipped.COLORS,
             shipped.JOBS, ["France", "Germany", "Spain", "Italy", "Ireland"]]
    return {v.casefold() for values in lists for v in values}


def build(per_locale: int) -> dict[str, dict]:
    train = draw(TRAIN, per_locale, seed=0)
    for kind, values in (("first", shipped.FIRST), ("last", shipped.LAST),
                         ("street", shipped.STREETS), ("city", shipped.CITIES),
                         ("job", shipped.JOBS), ("word", shipped.COLORS)):
        train[kind] |= set(values)
    seen = shipped_values() | {v.casefold() for values in train.values() for v in values}
    # nor a word of a training value ("Hudson" of the company "Hudson, Hunt and Jarvis")
    seen |= {w for v in seen for w in re.findall(r"\w+", v)}
    evaluation = {kind: {v for v in values if v.casefold() not in seen
                         and not PSEUDO.fullmatch(v.casefold())}
                  for kind, values in draw(EVAL, per_locale, seed=1).items()}
    import faker

    meta = {"faker": faker.VERSION, "per_locale": per_locale}
    return {"train": {**meta, "locales": TRAIN, "values": sort(train)},
            "eval": {**meta, "locales": EVAL, "values": sort(evaluation)}}


def sort(lists: dict[str, set[str]]) -> dict[str, list[str]]:
    return {kind: sorted(values) for kind, values in lists.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=HERE, help="folder for train.json and eval.json")
    p.add_argument("--per-locale", type=int, default=120,
                   help="draws of each kind per locale (distinct values are kept)")
    a = p.parse_args()
    if os.environ.get("PYTHONHASHSEED") != "0":  # some of Faker's draws follow set order
        os.execve(sys.executable, [sys.executable, *sys.argv],
                  {**os.environ, "PYTHONHASHSEED": "0"})
    random.seed(0)  # Faker's module-level generator, for any provider that uses it
    for split, data in build(a.per_locale).items():
        path = a.out / f"{split}.json"
        path.write_text(json.dumps(data, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        print(split, {k: len(v) for k, v in data["values"].items()})


if __name__ == "__main__":
    main()
