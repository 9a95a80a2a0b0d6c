"""The default model's recipe (issue 17): the curriculum puts whole plain-text passages in every
stage as {"text": ...} rows that SFT trains on, the curriculum recipes read the stages at
seq_len 1024, and scripts/train_default.sh runs end to end in its dry-run mode (every stage
for 2 steps on a tiny model, then every evaluation on a handful of cases), so it cannot rot;
scripts/ship_default.py then packages the dry run (one run serves both: a module fixture)."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import mixtral
from mixtral.tokenizer import default_tokenizer
from mixtral.train.data import sft_examples

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from build_curriculum import STAGES  # noqa: E402
from build_curriculum import build as build_curriculum  # noqa: E402
from curriculum import ORDER, SFT_STAGES  # noqa: E402
from default_card import cell  # noqa: E402
from ship_default import UNCONFIRMED  # noqa: E402

PARAGRAPH = ("It was a bright cold day in April, and the clocks were striking thirteen. Winston "
             "Smith slipped quickly through the glass doors of Victory Mansions. ")


def fake_corpus(root: Path) -> Path:
    """scripts/build_corpus.py's layout, with a few paragraphs of prose in each split."""
    for split, name in (("train", "prose.txt"), ("val", "austen.txt"), ("val", "bible_web.txt")):
        folder = root / "pretrain" / split
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text("\n\n".join(f"{i}. {PARAGRAPH * 3}" for i in range(30)))
    source = {"status": "ok", "licence": "public domain", "train": {"tokens": 2000},
              "package": {"registry": "pypi", "name": "prose", "version": "1.0"}}
    (root / "manifest.json").write_text(json.dumps(  # its fields that the model card reads
        {"sources": {"prose": source}, "totals": {"train": {"tokens": 2000}}}))
    return root


def test_every_stage_trains_on_whole_passages_of_plain_text(tmp_path):
    corpus = fake_corpus(tmp_path / "corpus")
    # 600 rows a stage: at 300, one draw gave the numbers stage (text 1 row in 12.5) 16
    summary = build_curriculum(tmp_path / "out", corpus, n=600, seed=1, context=1024,
                               induction=200)
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


    assert summary["induction"] == {"train": 200, "val": 8}
    rows = sft_examples([tmp_path / "out" / "induction" / "train.jsonl"], tok, 64)
    assert len(rows) == 200 and all(len(ids) == 65 and ids[0] == 1 for ids, _ in rows)
    lengths = set()
    for ids, mask in rows:  # the loss is on the span's repeat, and only there
        n = sum(mask)
        lengths.add(n)
        assert mask == [0] * (n + 1) + [1] * n + [0] * (64 - 2 * n)
        assert ids[1:n + 1] == ids[n + 1:2 * n + 1] and min(ids[1:]) >= 3
    assert min(lengths) == 16 and max(lengths) == 31  # every span length of 16..31
    pieces = {i for ids, _ in rows for i in ids[1:]}
    assert len(pieces) > 5000 and max(pieces) > 31000  # the whole vocabulary


def test_passkeys_fill_short_fillers_and_the_whole_context_and_the_safe_prompt_is_no_refusal(
        tmp_path):
    """The numbers stage hides keys of 5-8 digits in short fillers; the final stage's passkeys
    reach the context's end without passing it (the answer included: they are never asked
    under the safe prompt); in the stages after JSON, other tasks are asked under the safe
    prompt too, and answered."""
    from build_curriculum import SAFE_SHARE
    from build_instruct_data import SAFE_PROMPT

    summary = build_curriculum(tmp_path / "out", fake_corpus(tmp_path / "corpus"), n=400,
                               seed=2, context=1024, induction=8)
    tok = default_tokenizer()
    rows = {stage: [json.loads(line) for line in
                    (tmp_path / "out" / stage / "sft.jsonl").read_text().splitlines()]
            for stage in STAGES}
    short = [r for r in rows["numbers"] if r["task"] == "passkey_short"]
    assert len(short) == summary["stages"]["numbers"]["passkey_short"] > 40
    assert all(5 <= len(r["messages"][-1]["content"]) <= 8 for r in short)
    # about half the keys go on into other punctuation and words, not a full stop: the answer
    # is still the key alone, so a copy must stop where the key ends
    after = [r["messages"][-2]["content"].split(r["messages"][-1]["content"], 1)[1][:1]
             for r in short]
    assert 0.3 < sum(c != "." for c in after) / len(short) < 0.7
    assert {c for c in after if c != "."} >= {",", ";", ":", "!"}
    from curriculum.tasks import KEY_LINES, QUESTIONS, VARIED_LINES
    assert all("{key}." in line for line in KEY_LINES + VARIED_LINES)  # what the tails replace
    # from the numbers stage on the keys are asked in many phrasings, in the skills stage in 3
    questions = {stage: {r["messages"][-2]["content"].rsplit("\n", 1)[1] for r in stage_rows
                         if r["task"].startswith("passkey")} for stage, stage_rows in rows.items()}
    assert questions["skills"] <= set(QUESTIONS) and len(questions["numbers"]) > 20
    trained = sft_examples([tmp_path / "out" / "final" / "sft.jsonl"], tok, 1024)
    for task in ("passkey_full", "passkey_long"):  # keys of 1-7 digits, and of 5-8
        full = [r for r in rows["final"] if r["task"] == task]
        ends = [len(ids) for r, (ids, _) in zip(rows["final"], trained, strict=True)
                if r["task"] == task]
        assert len(full) > 20 and max(ends) <= 1025 and max(ends) > 960  # the answer never cut
        assert all(r["messages"][0]["role"] == "user" for r in full)
        keys = [r["messages"][-1]["content"] for r in full]
        assert max(map(len, keys)) <= 8 and (min(map(len, keys)) >= 5) == (task == "passkey_long")
    # half the long keys from 2-4 digits: 3 or fewer distinct in ~48 % of them (uniform: ~11 %)
    assert sum(len(set(k)) <= 3 for k in keys) / len(keys) > 0.3
    for stage, stage_rows in rows.items():
        asked = [r for r in stage_rows if r["task"] not in ("safety", "harm", "acts", "text") and
                 r["messages"][0] == {"role": "system", "content": SAFE_PROMPT}]
        if stage not in SAFE_SHARE:
            assert not asked, stage
            continue
        assert 0.1 < len(asked) / sum(r["task"] not in ("safety", "harm", "acts", "text", "example")
                                      for r in stage_rows) < 0.3, stage
        assert not any("sorry" in r["messages"][-1]["content"] for r in asked)


def test_a_change_to_one_task_redraws_only_that_tasks_rows(tmp_path, monkeypatch):
    """Each task draws from its own random stream: a JSON generator that draws more (as new
    instructions did in runs/d26) leaves every other task's rows, and which task each row is,
    as they were; so a chain with the change differs from the last only where it was made."""
    import curriculum.tasks

    corpus = fake_corpus(tmp_path / "corpus")

    def rows(out: Path) -> dict[str, list[dict]]:
        build_curriculum(out, corpus, n=300, seed=4, context=1024, repeats=20, induction=8)
        files = {s: out / s / "sft.jsonl" for s in STAGES} | {"dpo": out / "dpo.jsonl"} | {
            s: out / s / "train.jsonl" for s in ("induction", "repeats")}
        return {s: [json.loads(line) for line in f.read_text().splitlines()]
                for s, f in files.items()}

    before = rows(tmp_path / "a")
    original = curriculum.tasks.json_object

    def json_object(r):  # draws one number more, and asks otherwise
        r.random()
        messages, answer, rejects = original(r)
        messages[-1]["content"] = "Changed. " + messages[-1]["content"]
        return messages, answer, rejects

    monkeypatch.setattr(curriculum.tasks, "json_object", json_object)
    after = rows(tmp_path / "b")
    changed = 0
    for stage in before:
        assert [r.get("task") for r in before[stage]] == [r.get("task") for r in after[stage]]
        for a, b in zip(before[stage], after[stage], strict=True):
            if a.get("task") in ("json", "example"):
                changed += a != b
            else:
                assert a == b, (stage, a.get("task"))
    assert changed > 300  # the JSON rows did change: this test can tell


def test_train_default_trains_the_stages_in_their_one_order():
    script = (ROOT / "scripts" / "train_default.sh").read_text()
    assert tuple(re.findall(r"recipes/(?:default|curriculum)/(\w+)\.yaml", script)) == ORDER
    assert list(STAGES) == list(SFT_STAGES)  # each SFT stage has its mix, none more


def test_the_curriculum_recipes_chain_at_the_full_context():
    stages = list(SFT_STAGES)
    recipes = {s: yaml.safe_load((ROOT / "recipes" / "curriculum" / f"{s}.yaml").read_text())
               for s in [*stages, "dpo"]}
    assert recipes["copy"]["init"] == "runs/default/pretrain/step-001500"  # the base, not SFT
    for before, stage in zip(stages, [*stages[1:], "dpo"], strict=False):
        r = recipes[stage]
        assert r["init"] == f"runs/default/{before}/step-{recipes[before]['steps']:06d}"
    for stage in stages:
        assert recipes[stage]["data"] == [f"data/curriculum/{stage}/sft.jsonl"]
    # the full context, but for the JSON, sums, numbers and requests stages, whose rows are
    # short (<= 260, 40, 240 and 240 tokens)
    short = ("json", "sums", "numbers", "requests")
    assert all(r["seq_len"] == 1024 for s, r in recipes.items() if s not in short)
    assert recipes["json"]["seq_len"] >= 260
    assert recipes["numbers"]["seq_len"] >= 240 and recipes["requests"]["seq_len"] >= 240
    assert recipes["sums"]["seq_len"] >= 40


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """scripts/train_default.sh --dry-run, once for this module: (its process, its folder)."""
    tmp = tmp_path_factory.mktemp("dry-run")
    env = {**os.environ, "CORPUS": str(fake_corpus(tmp / "corpus")), "RUNS": str(tmp / "runs"),
           "DATA": str(tmp / "d"), "PY": sys.executable}  # this interpreter, wherever it is
    done = subprocess.run(["bash", str(ROOT / "scripts" / "train_default.sh"), "--dry-run"],
                          env=env, capture_output=True, text=True, timeout=1800)
    return done, tmp


@pytest.mark.slow
def test_train_default_dry_run_runs_every_stage(dry_run):
    done, tmp = dry_run
    runs = tmp / "runs"
    assert done.returncode == 0, done.stderr[-3000:]
    assert "DPO starts at ln 2" in done.stdout
    for stage in ORDER[1:]:  # all but the warm-up, whose name may carry a retry's seed
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


@pytest.mark.slow
def test_ship_default_packages_the_dry_run(dry_run):
    done, tmp = dry_run
    assert done.returncode == 0, done.stderr[-3000:]
    runs, env = tmp / "runs", {**os.environ, "CORPUS": str(tmp / "corpus"), "PY": sys.executable}
    if not (runs / "eval" / "final" / "heldout.json").exists():  # train_default.sh predating it
        sft = runs / "final" / (runs / "final" / "latest").read_text().strip()
        evaluated = subprocess.run(
            ["bash", str(ROOT / "scripts" / "eval_stage.sh"), "--dry-run", str(sft),
             str(runs / "eval" / "final")], env=env, capture_output=True, text=True,
            timeout=1800)
        assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    out = tmp / "shipped"
    shipped = subprocess.run(
        [sys.executable, "scripts/ship_default.py", "--runs", str(runs), "--corpus",
         str(tmp / "corpus"), "--curriculum", str(tmp / "d" / "curriculum"), "--dst", str(out),
         "--other-draw", str(runs / "eval" / "heldout.json")],  # stands in for another seed
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert shipped.returncode == 0, shipped.stderr[-3000:]
    stage, checkpoint = re.match(r"shipped (dpo|final): (\S+) -> ", shipped.stdout).groups()
    assert Path(checkpoint) == runs / stage / "step-000002"
    card = (out / "MODEL_CARD.md").read_text()
    assert f"Shipped: the **{stage}** stage, `{checkpoint}`" in card
    assert "This stage is the best of 2 draws of its recipe" in card
    assert UNCONFIRMED in card  # no --confirm: the card says the replacement was not confirmed
    for name in ORDER[1:]:  # stages
        assert re.search(rf"^\| {name} \| 2 \| \d+\.\d \| ", card, re.M), name
    # the targets: in- and out-of-distribution shares with k/n and a Wilson interval, and the
    # replaced model's figure (scripts/heldout/results-shipped.json, --before's default)
    share = r"\d+\.\d % \(\d+/\d+; \d+–\d+\)"
    row = re.search(r"^\| exact JSON from the given fields and values \| ≥ 95 % \| (.*)$",
                    card, re.M)
    before = json.loads((ROOT / "scripts/heldout/results-shipped.json").read_text())
    replaced = cell(before["summary"]["json/ood"])
    assert re.fullmatch(r"\d+\.\d % \(\d+/100; \d+–\d+\)", replaced)
    assert row and re.fullmatch(rf"{share} \| {share} \| {re.escape(replaced)} \| "
                                r"(met|\*\*not met\*\*) \|", row.group(1)), row
    # the full held-out table, in and out of distribution (scripts/eval_heldout.py's)
    assert re.search(r"^\| addition \| \d+ % \(\d+/\d+; \d+–\d+\) \| \d+ % \(\d+/\d+; "
                     r"\d+–\d+\) \| ≥ 80 % \|$", card, re.M)
    assert "## Which stage ships, and why" in card and "python scripts/ship_default.py" in card
    # the recipe changes after a model ships: the card names the commit whose recipe trained it
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                          capture_output=True, check=True).stdout.strip()
    assert f"git checkout {head} -- recipes scripts" in card
    # the induction probe of the warm-up, the base and the shipped stage, from their files
    probe = r"\d+\.\d\d → \d+\.\d\d \(\d+ %\)"
    for label in ("warm-up", "pretrained base", f"shipped \\({stage}\\)"):
        assert re.search(rf"^\| {label} \| {probe} \| {probe} \|$", card, re.M), label
    needles = ("total", "active", "JSON from", "passkey", "2-digit addition", "safe prompt",
               "</s>", "preference accuracy", "Perplexity vs context", "Routing",
               "What it cannot do", "scripts/train_default.sh", "out-of-distribution",
               "scripts/eval_heldout.py")  # what tests/test_default_model.py asks of the card
    assert [n for n in needles if n not in card] == []
    # the weights: the bf16 copy of the checkpoint it names, read by mixtral.load
    model, source = mixtral.load(out), mixtral.load(checkpoint, dtype="bf16")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    state = source.state_dict()
    assert all(torch.equal(t, state[k]) for k, t in model.state_dict().items())
    tokens = torch.randint(0, 32000, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(tokens), source(tokens))
