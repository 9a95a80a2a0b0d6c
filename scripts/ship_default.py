"""Package the trained default model into mixtral/data/default/ (bf16 weights + model card).

    python scripts/ship_default.py [--runs runs/default] [--corpus data/corpus]
                                   [--instruct data/instruct] [--dst mixtral/data/default]

Reads the final DPO checkpoint, the three stages' metrics logs, the evaluation reports written
by scripts/train_default.sh and the data manifests, and writes config.json, model.safetensors
and MODEL_CARD.md with every figure taken from those files.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from eval_heldout import card_section

import mixtral
from mixtral.checkpoint import save
from mixtral.config import param_counts

MAX_BYTES = 80 * 10**6


def stage_summary(run: Path) -> dict[str, Any]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    state = torch.load(run / (run / "latest").read_text().strip() / "trainer_state.pt",
                       weights_only=False)
    cfg = state["config"]
    # logs written before "step_seconds" existed: tokens per step over the logged throughput
    tokens = cfg["batch_size"] * cfg["seq_len"] * cfg["grad_accum"] * (
        2 if cfg["stage"] == "dpo" else 1)
    seconds = sum(r.get("step_seconds", tokens / r["tokens_per_s"]) for r in rows)
    evals = [r for r in rows if "eval_loss" in r]
    return {"steps": rows[-1]["step"], "minutes": round(seconds / 60, 1),
            "final_loss": round(rows[-1]["loss"], 4),
            "final_eval_loss": round(evals[-1]["eval_loss"], 4) if evals else None,
            "last": {k: round(v, 4) for k, v in evals[-1].items() if k.startswith("eval_")}
            if evals else {}}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", default="runs/default")
    p.add_argument("--corpus", default="data/corpus")
    p.add_argument("--instruct", default="data/instruct")
    p.add_argument("--dst", default="mixtral/data/default")
    a = p.parse_args()
    runs, dst = Path(a.runs), Path(a.dst)
    final = runs / "dpo" / (runs / "dpo" / "latest").read_text().strip()
    model = mixtral.load(final, dtype="bf16")
    with tempfile.TemporaryDirectory() as tmp:
        files = save({k: v.detach() for k, v in model.state_dict().items()}, model.args,
                     Path(tmp) / "m")
        size = sum(f.stat().st_size for f in files)
        if size > MAX_BYTES:
            raise SystemExit(f"{size / 1e6:.1f} MB of weights exceed the {MAX_BYTES / 1e6:.0f} "
                             "MB budget for the repository")
        dst.mkdir(parents=True, exist_ok=True)
        for f in files:
            shutil.copyfile(f, dst / f.name)
    stages = {s: stage_summary(runs / s) for s in ("pretrain", "sft", "sft_copy", "sft_json",
                                                      "dpo")
              if (runs / s / "metrics.jsonl").exists()}
    evals = {s: json.loads((runs / "eval" / f"{s}.json").read_text()) for s in ("sft", "dpo")}
    manifest = json.loads((Path(a.corpus) / "manifest.json").read_text())
    tasks = json.loads((Path(a.instruct) / "tasks.json").read_text())
    for part in ("copy", "json"):
        extra = Path(f"{a.instruct}_{part}") / "tasks.json"
        if extra.exists():
            tasks[f"part_{part}"] = json.loads(extra.read_text())
    counts = param_counts(model.args)
    paper = paper_evals(runs / "eval", dst)
    text = card(model.args, counts, size, stages, evals, manifest, tasks)
    heldout = runs / "eval" / "heldout.json"  # scripts/eval_heldout.py on the shipped folder
    if heldout.exists():
        text = text.replace("## What it cannot do", card_section(json.loads(
            heldout.read_text())) + "## What it cannot do", 1)
    (dst / "MODEL_CARD.md").write_text(text + paper)
    print(f"{dst}: {size / 1e6:.1f} MB of weights, model card written")


def paper_evals(folder: Path, dst: Path) -> str:
    """The card's section from `mixtral eval passkey|perplexity|routing` (figures copied)."""
    for png in ("passkey.png", "perplexity.png", "routing.png", "routing_repetition.png"):
        shutil.copyfile(folder / png, dst / png)
    pk = json.loads((folder / "passkey.json").read_text())
    ppl = json.loads((folder / "perplexity.json").read_text())
    rt = json.loads((folder / "routing.json").read_text())
    runs = {}  # each command's wall time, from the run log it appends to
    for line in (folder / "runs.jsonl").read_text().splitlines():
        r = json.loads(line)
        runs[r["command"]] = r
    head = "| length \\ depth | " + " | ".join(f"{d:.0%}" for d in pk["depths"]) + " |"
    grid = "\n".join([head, "|---" * (len(pk["depths"]) + 1) + "|"] + [
        f"| {n} | " + " | ".join(f"{a:.0%}" for a in row) + " |"
        for n, row in zip(pk["lengths"], pk["accuracy"], strict=True)])
    base_file = folder / "base" / "perplexity.json"  # the pretrained model, before SFT
    base = {r["length"]: r["perplexity"] for r in json.loads(base_file.read_text())["curve"]} \
        if base_file.exists() else {}
    curve = "\n".join(f"| {r['length']} | {base.get(r['length'], float('nan')):.1f} | "
                      f"{r['perplexity']:.1f} |" for r in ppl["curve"])
    table = (folder / "routing.md").read_text()
    balance = "; ".join(  # load balance: the busiest and idlest expert over all layers
        f"{name} ({d['tokens']:,} tokens): {min(min(r) for r in d['first']):.1%}–"
        f"{max(max(r) for r in d['first']):.1%}" for name, d in rt["domains"].items())

    def took(cmd: str) -> str:
        return f"{runs[cmd]['seconds'] / 60:.1f} min" if cmd in runs else "?"

    return f"""
## What the paper measures (`mixtral eval`, see the README)

**Passkey retrieval** (landmark protocol, {pk['trials']} keys per cell,
{'instruct format' if pk['chat'] else 'plain prompt'}, greedy; {took('eval passkey')}): overall
{pk['overall']:.1%}. Rows are prompt lengths in tokens, columns the key's depth in the filler.

{grid}

![passkey](passkey.png)

**Perplexity vs context** on the held-out pretraining text ({len(ppl['documents'])} documents of
≥ {max(ppl['lengths'])} tokens, one forward pass each; {took('eval perplexity')}): monotonically
decreasing within {ppl['tolerance']:.0%}: **{ppl['monotone_decreasing']}**.

| context (tokens) | pretrained base | shipped (after SFT and DPO) |
|---|---|---|
{curve}

The base model was pretrained on 256-token sequences: its perplexity falls up to that length
and rises beyond it, where its positions were never trained (the paper's curve comes from a
model trained at 32k). Fine-tuning on short templated conversations cost the shipped model
most of its plain-text modelling; what it kept are the narrow skills above.

![perplexity](perplexity.png)

**Routing** ({took('eval routing')}): share of consecutive tokens that keep the same first-choice
expert (first) or share one of their two (first-or-second), per domain, at the first, middle
and last layers, against chance. Expert shares per layer and domain are in `routing.png`; the
range of first-choice shares over all layers and experts (uniform: {1 / rt['experts']:.1%}):
{balance}.

{table}
![routing](routing.png) ![repetition](routing_repetition.png)
"""


def copy_note(tasks: dict[str, Any]) -> str:
    notes = []
    for part, label in (("copy", "2b (`sft_copy`)"), ("json", "2c (`sft_json`)")):
        if f"part_{part}" in tasks:
            c = tasks[f"part_{part}"]
            notes.append(f"SFT part {label}: {c['conversations']:,} more conversations (seed "
                         f"{c['seed']}), {c.get('json', 0) + c.get('json_wide', 0):,} of them "
                         f"JSON tasks, {c.get('json_wide', 0):,} mostly with made-up values "
                         "that can only be copied.")
    return "\n" + "\n".join(notes) + "\n" if notes else ""


def pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def card(args: Any, counts: dict[str, int], size: int, stages: dict[str, dict],
         evals: dict[str, dict], manifest: dict[str, Any], tasks: dict[str, Any]) -> str:
    d, s = evals["dpo"], evals["sft"]
    total_minutes = sum(st["minutes"] for st in stages.values())
    sources = manifest.get("sources", {})
    source_rows = "\n".join(
        f"| {name} | {info['package']['registry']}: {info['package']['name']} "
        f"{info['package']['version']} | {info['licence']} | {info['train']['tokens']:,} |"
        for name, info in sources.items() if info.get("status") == "ok")
    refusal = d["refusal_rate"]
    stage_rows = "\n".join(
        f"| {name} | {st['steps']} | {st['minutes']} | {st['final_loss']} | "
        f"{st['final_eval_loss']} |" for name, st in stages.items())
    longest = max(int(k[2:]) for k in d["passkey_by_prompt_tokens"])
    skills = [
        ("JSON from \"field: value\" lines: parses with exactly those fields and values",
         "json_exact"),
        (f"passkey retrieval (prompts up to ~{longest} tokens)", "passkey"),
        ("2-digit addition", "addition_2digit"),
        ("answers in the language the system prompt asks for", "system_prompt_language"),
        ("ends its answer with `</s>` before max_tokens", "ends_with_eos")]
    skill_rows = "\n".join(f"| {label} | {pct(s[key])} | {pct(d[key])} |"
                            for label, key in skills)
    skill_rows += (f"\n| held-out preference accuracy (log p chosen > rejected) | "
                   f"{pct(d.get('preference_accuracy_sft', s['preference_accuracy']))} | "
                   f"{pct(d['preference_accuracy'])} |")
    return f"""# mixtral-default: the project's small default model

A {counts['total'] / 1e6:.1f}M-parameter Mixtral ({counts['active'] / 1e6:.1f}M active per
token) trained from scratch by this repository's own pipeline on 2 CPU cores: pretraining with
the MoE load-balancing loss, then SFT (in two parts), then DPO. It exists so that `mixtral
chat`, `generate` and `serve` work offline out of the box and so that the whole pipeline is
exercised end to end.
It is a demonstration of the system, **not an assistant**: see "What it cannot do".

## Architecture

The real Mixtral architecture, scaled down: dim {args.dim}, {args.n_layers} layers,
{args.n_heads} query heads / {args.n_kv_heads} key-value head of {args.head_dim} (GQA),
{args.num_experts} SwiGLU experts of hidden {args.hidden_dim} with top-{args.num_experts_per_tok}
routing, RoPE θ {args.rope_theta:g}, RMSNorm, context {args.max_seq_len}, the Mixtral v1
SentencePiece tokenizer (32000 pieces). Parameters: {counts['total']:,} total,
{counts['active']:,} active; the embedding and output head alone are
{counts['embeddings']:,}. Weights: bf16 safetensors, {size / 1e6:.1f} MB.

## Data

Pretraining: {manifest['totals']['train']['tokens']:,} tokens of licence-clean text built
by `scripts/build_corpus.py` from the Debian archive, PyPI and the Python standard library
(public domain or permissive licences only):

| source | package | licence | tokens |
|---|---|---|---|
{source_rows}

SFT and DPO: {tasks['conversations']:,} generated conversations
(`scripts/build_instruct_data.py`, seed {tasks['seed']}) covering the tasks of the user's source
document at this scale — JSON from "field: value" lines ({tasks.get('json', 0):,}), arithmetic
({tasks.get('arithmetic', 0):,}), passkey retrieval ({tasks.get('passkey', 0):,}), multi-turn
recall ({tasks.get('multiturn', 0):,}), translation ({tasks.get('translate', 0):,}), system
prompts ({tasks.get('system', 0):,}), the safe prompt ({tasks.get('safety', 0):,}) and word
definitions ({tasks.get('definition', 0):,}) — and preference pairs whose rejected answers are
a small model's realistic failures (invalid JSON, a wrong passkey or sum, the wrong language,
ignoring the system prompt, complying under the safe prompt, rambling without `</s>`).
{copy_note(tasks)}
## Training ({total_minutes:.0f} minutes on 2 CPU cores, {platform.processor() or 'x86_64'})

| stage | steps | minutes | final train loss | final held-out loss |
|---|---|---|---|---|
{stage_rows}

## Measured skills (held-out inputs, seed {d['seed']}, greedy; `scripts/eval_default.py`)

Measured on the fp32 checkpoints; the shipped file is their bf16 copy, on which
`tests/test_default_model.py` checks the source document's JSON prompt. "After SFT" is the
model after all three SFT parts, DPO's starting point.

| skill | after SFT | after DPO (shipped) |
|---|---|---|
{skill_rows}

Refusal rate (shipped model): mean requests {pct(refusal['mean_safe'])} with the safe prompt vs
{pct(refusal['mean_plain'])} without; harmless requests {pct(refusal['harmless_safe'])} with it
vs {pct(refusal['harmless_plain'])} without.

Passkey by prompt length: {json.dumps(d['passkey_by_prompt_tokens'])}.

## What it cannot do

It has seen ~{stages['pretrain']['steps'] * 16 * 256 / 1e6:.0f}M tokens of pretraining text: its
free text is locally plausible word salad in the style of the Bibles, Shakespeare and the Python
docs, with no facts and no reasoning. Its skills are the narrow, templated tasks above; ask
anything else and it will answer fluently and wrongly. Translations and definitions are
memorised fragments. Do not rely on it for anything; use `--model PATH` with real Mixtral
weights for real work.

## Reproduce

```sh
scripts/train_default.sh        # data, pretrain, SFT, DPO, evaluation (~{total_minutes:.0f} min)
python scripts/ship_default.py  # this folder
```
Recipes: `recipes/default/{{pretrain,sft,sft_copy,sft_json,dpo}}.yaml`. The shipped pretraining run
was planned for 2000 steps; a machine restart killed it at step 1002 and it was resumed from
step 1000 with the 1300-step schedule now in the recipe, to fit the session (so a rerun from
scratch follows a slightly different learning-rate curve). After the first SFT part the model
wrote well-formed JSON with the wrong values (0/20 exact): it recalled familiar names instead
of copying the prompt's, hence `sft_copy` (1/20 after it) and `sft_json`.
"""


if __name__ == "__main__":
    main()
