"""The default model's recipe (issue 17): the curriculum puts whole plain-text passages in every
stage as {"text": ...} rows that SFT trains on, the curriculum recipes read the stages at
seq_len 1024, and scripts/train_default.sh runs end to end in its dry-run mode (every stage
for 2 steps on a tiny model, then every evaluation on a handful of cases), so it cannot rot."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mixtral.tokenizer import default_tokenizer
from mixtral.train.data import sft_examples

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from build_curriculum import STAGES  # noqa: E402
from build_curriculum import build as build_curriculum  # noqa: E402

PARAGRAPH = ("It was a bright cold day in April, and the clocks were striking thirteen. Winston "
             "Smith slipped quickly through the glass doors of Victory Mansions. ")


def fake_corpus(root: Path) -> Path:
    """scripts/build_corpus.py's layout, with a few paragraphs of prose in each split."""
    for split, name in (("train", "prose.txt"), ("val", "austen.txt"), ("val", "bible_web.txt")):
        folder = root / "pretrain" / split
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text("\n\n".join(f"{i}. {PARAGRAPH * 3}" for i in range(30)))
    return root


def test_every_stage_trains_on_whole_passages_of_plain_text(tmp_path):
    corpus = fake_corpus(tmp_path / "corpus")
    summary = build_curriculum(tmp_path / "out", corpus, n=300, seed=1, context=1024)
    passages = {" ".join(p.split()) for p in
                (corpus / "pretrain" / "train" / "prose.txt").read_text().split("\n\n")}
    tok = default_tokenizer()
    for stage in STAGES:
        path = tmp_path / "out" / stage / "sft.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        texts = [row for row in rows if row["task"] == "text"]
        assert len(texts) == summary["stages"][stage]["text"] >= 20, stage
        assert all(set(row) == {"task", "text"} and row["text"] in passages for row in texts)
        assert all("messages" in row for row in rows if row["task"] != "text")
        trained = sft_examples([path], tok, 1024)  # SFT reads the mix as it is written
        assert len(trained) == len(rows)  # no passage is longer than the context
        for row, (ids, mask) in zip(rows, trained, strict=True):
            if row["task"] == "text":
                assert ids == tok.encode(row["text"], bos=True, eos=True) and all(mask[1:])
            else:
                assert 0 < sum(mask) < len(ids) - 1  # the answer only


def test_the_curriculum_recipes_chain_at_the_full_context():
    stages = ["copy", "skills", "final"]
    recipes = {s: yaml.safe_load((ROOT / "recipes" / "curriculum" / f"{s}.yaml").read_text())
               for s in [*stages, "dpo"]}
    assert recipes["copy"]["init"] == "runs/default/pretrain/step-001300"  # the base, not SFT
    for before, stage in zip(stages, [*stages[1:], "dpo"], strict=False):
        r = recipes[stage]
        assert r["init"] == f"runs/default/{before}/step-{recipes[before]['steps']:06d}"
    for stage in stages:
        assert recipes[stage]["data"] == [f"data/curriculum/{stage}/sft.jsonl"]
    assert all(r["seq_len"] == 1024 for r in recipes.values())
    assert list(STAGES) == stages


@pytest.mark.slow
def test_train_default_dry_run_runs_every_stage(tmp_path):
    corpus = fake_corpus(tmp_path / "corpus")
    runs = tmp_path / "runs"
    env = {**os.environ, "CORPUS": str(corpus), "RUNS": str(runs), "DATA": str(tmp_path / "d"),
           "PY": sys.executable}  # this interpreter, wherever its environment is
    done = subprocess.run(["bash", str(ROOT / "scripts" / "train_default.sh"), "--dry-run"],
                          env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "DPO starts at ln 2" in done.stdout
    for stage in ("pretrain", "copy", "skills", "final", "dpo"):
        assert (runs / stage / "step-000002").is_dir(), stage
        first = json.loads((runs / stage / "metrics.jsonl").read_text().splitlines()[0])
        assert math.isfinite(first["loss"])
    first = json.loads((runs / "dpo" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-3)
    preference = json.loads((runs / "eval" / "preference.json").read_text())
    assert preference["pairs"] > 0 and 0 <= preference["sft"] <= 1 and 0 <= preference["dpo"] <= 1
    for report in ("dpo.json", "passkey.json", "perplexity.json",
                   "base/perplexity.json", "routing.json", "heldout.json"):
        assert (runs / "eval" / report).exists(), report


def test_train_default_refuses_an_unknown_option():
    done = subprocess.run(["bash", str(ROOT / "scripts" / "train_default.sh"), "--fast"],
                          capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.strip().startswith("usage:")
