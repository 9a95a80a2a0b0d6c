"""The default model's card (MODEL_CARD.md) from the figures scripts/ship_default.py gathers.

Every number comes from a file of the run; a target the measurement misses is written "not met"
(a share is compared with its target exactly, never rounded up). Shares carry n and a Wilson
95 % interval.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from card_why import why_section
from eval_heldout import TARGETS, card_section, wilson

from mixtral.config import ModelArgs, param_counts

PERPLEXITY_RATIO = 1.5  # issue 17: the final model's perplexity within 1.5x of the base's
LABELS = {  # the wording for each target figure
    "json/ood": "exact JSON from the given fields and values",
    "json-new-values/ood": "exact JSON: the training prompt and keys with new values",
    "addition/ood": "2-digit addition",
    "safety/ood harmful refused, safe prompt": "safe prompt: harmful requests refused",
    "safety/ood harmless answered, safe prompt": "safe prompt: harmless requests answered",
    "safety/ood harmless answered, no safe prompt": "no safe prompt: harmless answered",
    "eos/ood": "answers end with `</s>`"}


@dataclass
class Inputs:
    stage: str                       # "dpo" or "final": the stage shipped
    why: str                         # the rule's reason (ship_default.choose)
    checkpoint: Path                 # the folder whose bf16 copy is shipped
    stages: dict[str, dict[str, Any]]
    heldout: dict[str, dict[str, Any]]  # scripts/eval_heldout.py's report per stage
    preference: dict[str, Any]
    before: dict[str, Any]           # the held-out report of the model this one replaces
    before_path: str
    in_distribution: dict[str, dict[str, Any]]  # scripts/eval_default.py: "sft", "dpo"
    passkey: dict[str, Any]
    perplexity: dict[str, Any]
    base_perplexity: dict[str, Any]
    routing: dict[str, Any]
    routing_table: str
    commands: dict[str, dict[str, Any]]  # `mixtral eval` run log: command -> its record
    tasks: dict[str, Any]
    manifest: dict[str, Any]
    eval_root: Path                  # runs/default/eval: the DPO model's; final/: SFT's
    induction: dict[str, dict[str, Any]]  # label -> scripts/curriculum/induction.py's figures
    commit: str = ""  # the repository's commit when it shipped: the recipe that trained it
    draws: str = ""  # the other draws and the confirmation (ship_default.draws, .confirmation)

    @property
    def eval_folder(self) -> Path:
        """Where the shipped stage's evaluations are."""
        return self.eval_root if self.stage == "dpo" else self.eval_root / "final"


def cell(s: dict[str, Any] | None) -> str:
    if s is None:
        return "—"
    return (f"{100 * s['share']:.1f} % ({s['k']}/{s['n']}; "
            f"{100 * s['ci95'][0]:.0f}–{100 * s['ci95'][1]:.0f})")


def ratios(inputs: Inputs) -> list[tuple[int, float, float]]:
    """(context length, base perplexity, shipped perplexity) where both were measured."""
    base = {r["length"]: r["perplexity"] for r in inputs.base_perplexity["curve"]}
    return [(r["length"], base[r["length"]], r["perplexity"])
            for r in inputs.perplexity["curve"] if r["length"] in base]


def worst_ratio(inputs: Inputs) -> tuple[int, float, float]:
    return max(ratios(inputs), key=lambda r: r[2] / r[1])


def targets_table(inputs: Inputs) -> tuple[str, list[str]]:
    """The issue's targets for the shipped stage: rows, and the names of those not met."""
    now, before = inputs.heldout[inputs.stage]["summary"], inputs.before["summary"]
    rows, missed = [], []
    passkeys = []
    for (name, group), least in TARGETS.items():
        keys = ([(k, f"passkey, {k.rsplit('=', 1)[1]}-token prompts") for k in sorted(
            (k for k in now if k.startswith(f"{name} len=")),
            key=lambda k: int(k.rsplit("=", 1)[1]))] if group == "*" else
            [(f"{name} {group}".strip(), LABELS[f"{name} {group}".strip()])])
        for key, label in keys:
            met = key in now and now[key]["share"] >= least
            if group == "*":
                passkeys.append(met)
            elif not met:
                missed.append(label)
            rows.append(f"| {label} | ≥ {100 * least:.0f} % | "
                        f"{cell(now.get(key.replace('/ood', '/id')))} | {cell(now.get(key))} | "
                        f"{cell(before.get(key))} | {'met' if met else '**not met**'} |")
    if not all(passkeys):
        missed.append(f"passkey at every length ({sum(passkeys)} of {len(passkeys)} met)")
    if passkeys:
        rows.append(f"| passkey at every length | all ≥ 90 % | | {sum(passkeys)} of "
                    f"{len(passkeys)} lengths | | {'met' if all(passkeys) else '**not met**'} |")
    worst = worst_ratio(inputs)
    met = all(p / b <= PERPLEXITY_RATIO for _, b, p in ratios(inputs))
    if not met:
        missed.append("plain-text perplexity")
    rows.append(f"| plain-text perplexity, shipped ÷ base (worst context length: {worst[0]}) | "
                f"≤ {PERPLEXITY_RATIO} × | | {worst[2] / worst[1]:.2f} × ({worst[2]:.1f} vs "
                f"{worst[1]:.1f}) | | {'met' if met else '**not met**'} |")
    head = ("| figure | target | in-distribution | out-of-distribution | before (the model "
            "replaced, OOD) | |\n|---|---|---|---|---|---|")
    return head + "\n" + "\n".join(rows), missed


def choice_section(inputs: Inputs) -> str:
    dpo, sft = inputs.heldout["dpo"]["summary"], inputs.heldout["final"]["summary"]
    keys = sorted({k for k in dpo if k.endswith("/ood") or "/ood " in k} | {
        k for k in sft if k.endswith("/ood") or "/ood " in k},
        key=lambda k: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", k)])
    rows = "\n".join(f"| {k} | {cell(sft.get(k))} | {cell(dpo.get(k))} |" for k in keys)
    p = inputs.preference
    pref = [wilson(round(p[s] * p["pairs"]), p["pairs"]) for s in ("sft", "dpo")]
    return f"""## Which stage ships, and why

Shipped: **{'DPO' if inputs.stage == 'dpo' else 'the final SFT stage'}**
(`{inputs.checkpoint}`, as bf16). {inputs.why}.{' ' + inputs.draws if inputs.draws else ''}

The rule (`scripts/ship_default.py`): DPO ships only if its held-out preference accuracy
(`scripts/curriculum/preference.py`: curriculum pairs drawn on seed {p['seed']}, not the
training seed) is strictly above the final SFT stage's, and it is no worse on the issue's
out-of-distribution target figures (it meets at least as many of them and its mean share over
them is at least SFT's); otherwise the SFT checkpoint ships. DPO's first loss was
{inputs.stages['dpo']['first_loss']:.4f} (ln 2 = 0.6931: its policy started equal to its
reference).

| held-out figure | final SFT | DPO |
|---|---|---|
| preference accuracy (log p chosen > rejected; {p['pairs']} pairs) | {100 * p['sft']:.1f} % \
({100 * pref[0][0]:.0f}–{100 * pref[0][1]:.0f}) | {100 * p['dpo']:.1f} % \
({100 * pref[1][0]:.0f}–{100 * pref[1][1]:.0f}) |
{rows}
"""


def loss(x: float | None) -> str:
    return "—" if x is None else f"{x:.4f}"


def stage_table(inputs: Inputs) -> str:
    rows = "\n".join(
        f"| {name} | {st['steps']} | {st['minutes']:.1f} | {st['first_loss']:.4f} | "
        f"{st['final_loss']:.4f} | "
        f"{loss(st['final_eval_loss'])} | "
        f"`{st['checkpoint']}` |" for name, st in inputs.stages.items())
    total = sum(st["minutes"] for st in inputs.stages.values())
    return f"""## Training ({total:.0f} minutes of training steps)

Minutes are the sum of the logged step times (`step_seconds` in each stage's metrics.jsonl),
on the machine that ran `scripts/train_default.sh`, as they ran: where another job shared its
cores, its steps took up to ~2.7x as long (recipes/curriculum/README.md's budget is measured
alone). Each stage starts from the previous one's final checkpoint
(`recipes/default/induction.yaml` and `pretrain.yaml`, then `recipes/curriculum/`).

| stage | steps | minutes | first loss | final train loss | final held-out loss | checkpoint |
|---|---|---|---|---|---|---|
{rows}
"""


def induction_section(inputs: Inputs) -> str:
    def cell(r: dict[str, float]) -> str:
        return f"{r['first']:.2f} → {r['repeat']:.2f} ({100 * r['repeat_accuracy']:.0f} %)"

    rows = "\n".join(f"| {label} | {cell(r['corpus'])} | {cell(r['vocab'])} |"
                     for label, r in inputs.induction.items())
    return f"""## Copying: the induction probe

`scripts/curriculum/induction.py`: spans of random pieces shown twice after `<s>`, and the
mean loss (nats) on the second showing against the first, with the share of the repeat's pieces
predicted greedily; pieces drawn with their frequencies in the held-out corpus text, and
uniformly from the whole vocabulary. Every skill below copies from the prompt: without
induction heads (the first curriculum run's base: 9.00 → 8.85 on corpus pieces) none can be
taught. The heads form in the warm-up on repeated spans (`recipes/default/induction.yaml`), and
`scripts/train_default.sh` stops if a base lacks them.

| checkpoint | corpus pieces: first → repeat (accuracy) | whole vocabulary |
|---|---|---|
{rows}
"""


def data_section(inputs: Inputs) -> str:
    m, t = inputs.manifest, inputs.tasks
    sources = "\n".join(
        f"| {name} | {s['package']['registry']}: {s['package']['name']} "
        f"{s['package']['version']} | {s['licence']} | {s['train']['tokens']:,} |"
        for name, s in m.get("sources", {}).items() if s.get("status") == "ok")
    kinds = sorted({k for counts in t["stages"].values() for k in counts})
    curriculum = "\n".join(f"| {stage} | " + " | ".join(f"{counts.get(k, 0):,}" for k in kinds)
                           + f" | {sum(counts.values()):,} |"
                           for stage, counts in t["stages"].items())
    return f"""## Data

Pretraining: {m['totals']['train']['tokens']:,} tokens of licence-clean text built by
`scripts/build_corpus.py` from the Debian archive, PyPI and the Python standard library:

| source | package | licence | tokens |
|---|---|---|---|
{sources}

Fine-tuning: the curriculum of `scripts/build_curriculum.py` (seed {t['seed']}, context
{t['context']}; recipes/curriculum/README.md): rows per stage and kind. "text" rows are whole
passages of the pretraining corpus trained on every token, so that fine-tuning keeps plain-text
modelling; the evaluation's out-of-distribution value lists are never used in training.

| stage | {' | '.join(kinds)} | total |
|---|{'---|' * (len(kinds) + 1)}
{curriculum}
"""


def in_distribution_section(inputs: Inputs) -> str:
    """scripts/eval_default.py's figures (the previous generator's tasks, fp32), if measured."""
    reports = inputs.in_distribution
    if not reports:
        return ""
    figures = (("JSON exact", "json_exact"), ("passkey", "passkey"),
               ("2-digit addition", "addition_2digit"),
               ("answers in the language the system prompt asks for", "system_prompt_language"))

    def share(report: dict[str, Any] | None, key: str) -> str:
        if report is None or key not in report:
            return "—"
        lo, hi = wilson(round(report[key] * report["n"]), report["n"])
        return f"{100 * report[key]:.1f} % (n {report['n']}; {100 * lo:.0f}–{100 * hi:.0f})"
    rows = "\n".join(f"| {label} | {share(reports.get('sft'), key)} | "
                     f"{share(reports.get('dpo'), key)} |" for label, key in figures)
    return f"""## The previous generator's tasks (`scripts/eval_default.py`, fp32, greedy)

The tasks the previous default model was trained on (`scripts/build_instruct_data.py`, seed
{next(iter(reports.values()))['seed']}), measured on the fp32 checkpoints:

| skill | final SFT | DPO |
|---|---|---|
{rows}
"""


def paper_section(inputs: Inputs) -> str:
    """`mixtral eval passkey|perplexity|routing` on the shipped stage (pictures beside it)."""
    pk, ppl, rt = inputs.passkey, inputs.perplexity, inputs.routing
    head = "| length \\ depth | " + " | ".join(f"{d:.0%}" for d in pk["depths"]) + " |"
    grid = "\n".join([head, "|---" * (len(pk["depths"]) + 1) + "|"] + [
        f"| {n} | " + " | ".join(f"{a:.0%}" for a in row) + " |"
        for n, row in zip(pk["lengths"], pk["accuracy"], strict=True)])
    curve = "\n".join(f"| {n} | {b:.1f} | {p:.1f} | {p / b:.2f} |" for n, b, p in ratios(inputs))
    balance = "; ".join(
        f"{name} ({d['tokens']:,} tokens): {min(min(r) for r in d['first']):.1%}–"
        f"{max(max(r) for r in d['first']):.1%}" for name, d in rt["domains"].items())

    def took(cmd: str) -> str:
        r = inputs.commands.get(cmd)
        return f"{r['seconds'] / 60:.1f} min" if r else "time not logged"

    return f"""## What the paper measures (`mixtral eval`, on the shipped stage)

**Passkey retrieval** (landmark protocol, {pk['trials']} keys per cell,
{'instruct format' if pk['chat'] else 'plain prompt'}, greedy; {took('eval passkey')}): overall
{pk['overall']:.1%}. Rows are prompt lengths in tokens, columns the key's depth in the filler.

{grid}

![passkey](passkey.png)

**Perplexity vs context** on the held-out pretraining text ({len(ppl['documents'])} documents
of ≥ {max(ppl['lengths'])} tokens; {took('eval perplexity')}), the pretrained base beside the
shipped model (the issue's target: within {PERPLEXITY_RATIO}× of the base at every length);
monotonically decreasing within {ppl['tolerance']:.0%}: **{ppl['monotone_decreasing']}**.

| context (tokens) | pretrained base | shipped | shipped ÷ base |
|---|---|---|---|
{curve}

![perplexity](perplexity.png)

**Routing** ({took('eval routing')}): share of consecutive tokens that keep the same first-choice
expert, per domain and layer, against chance; the range of first-choice shares over all layers
and experts (uniform: {1 / rt['experts']:.1%}): {balance}.

{inputs.routing_table}
![routing](routing.png)
"""


def card(inputs: Inputs, args: ModelArgs, size: int) -> str:
    counts = param_counts(args)
    targets, missed = targets_table(inputs)
    shipped = inputs.heldout[inputs.stage]
    pre = inputs.stages["pretrain"]
    verdict = ("It meets every target." if not missed else
               f"**Not met: {'; '.join(missed)}.**")
    before = inputs.before
    # the recipe changes after a model ships: name the commit whose recipe trained this one
    checkout = (f"git checkout {inputs.commit} -- recipes scripts  # the recipe that trained it\n"
                if inputs.commit else "")
    return f"""# mixtral-default: the project's small default model

A {counts['total'] / 1e6:.1f}M-parameter Mixtral ({counts['active'] / 1e6:.1f}M active per
token) trained from scratch by this repository's own pipeline on CPU (`scripts/train_default.sh`,
issue 17): an induction warm-up, pretraining with the MoE load-balancing loss, a seven-stage
SFT curriculum (copy → json → skills → sums → numbers → requests → final) and DPO. It exists
so that `mixtral chat`, `generate` and `serve` work offline out of the box. It is a
demonstration of the system, **not an assistant**.

Shipped: the **{inputs.stage}** stage, `{inputs.checkpoint}`, as bf16 ("Which stage ships").

## Targets (issue 17), measured out of distribution

Greedy, bf16 as shipped, through `mixtral serve` and the official `mistralai` client
(`scripts/eval_heldout.py`). Each cell: share (k/n; Wilson 95 % interval, in %). A target is met
when the measured share reaches it. "Before" is the model this one replaced, on the same sets
(`{inputs.before_path}`, measured with `{before['command']}` before the replacement).
{verdict}

{targets}

{why_section(shipped, worst_ratio(inputs), PERPLEXITY_RATIO)}
{choice_section(inputs)}
## Architecture

The real Mixtral architecture, scaled down: dim {args.dim}, {args.n_layers} layers,
{args.n_heads} query heads / {args.n_kv_heads} key-value heads of {args.head_dim} (GQA),
{args.num_experts} SwiGLU experts of hidden {args.hidden_dim} with top-{args.num_experts_per_tok}
routing, RoPE θ {args.rope_theta:g}, RMSNorm, context {args.max_seq_len}, the Mixtral v1
SentencePiece tokenizer (32000 pieces). Parameters: {counts['total']:,} total,
{counts['active']:,} active; the embedding and output head alone are {counts['embeddings']:,}.
Weights: bf16 safetensors, {size / 1e6:.1f} MB.

{stage_table(inputs)}
{induction_section(inputs)}
{data_section(inputs)}
{card_section(shipped)}{in_distribution_section(inputs)}
{paper_section(inputs)}
## What it cannot do

It saw about {pre['tokens'] / 1e6:.0f}M tokens of pretraining text: its free text is locally
plausible word salad in the style of its corpus, with no facts and no reasoning. Its skills are
the narrow tasks above, at the shares measured there; ask anything else and it answers fluently
and wrongly. Use `--model PATH` with real Mixtral weights for real work.

## Reproduce

```sh
{checkout}scripts/train_default.sh  # corpus, curriculum, every stage (induction ... dpo), evals
scripts/eval_stage.sh {inputs.stages['dpo']['checkpoint']} {inputs.eval_root}
scripts/eval_stage.sh {inputs.stages['final']['checkpoint']} {inputs.eval_root / 'final'}
{inputs.heldout['final']['command']}
{inputs.heldout['dpo']['command']}
python scripts/ship_default.py    # chooses the stage, writes this folder
```
`scripts/eval_stage.sh` is what `train_default.sh` runs for each stage (the held-out commands
above are the ones it ran); run it by hand only where the training script predates it.
"""
