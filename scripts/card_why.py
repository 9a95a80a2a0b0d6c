"""The model card's section on the targets the shipped model misses: for each, the figures of the
shipped stage's held-out report that locate the failure, and what issue 17's measurements
(recipes/curriculum/README.md) showed about why. Kept apart from default_card.py, which lays
out the rest of the card; every figure here is read from the report, the reasons are the
README's findings, named with where they were measured."""

from __future__ import annotations

import re
from collections import Counter
from typing import Any


def _share(summary: dict[str, Any], key: str) -> str:
    s = summary.get(key)
    return "—" if s is None else f"{s['k']}/{s['n']} ({100 * s['share']:.0f} %)"


def _loops(answer: str) -> bool:
    """Whether an answer ends in a loop: a span repeated three times in a row near its end."""
    return re.search(r"(.{3,40}?)\1\1", answer[-160:]) is not None


def _missed(summary: dict[str, Any], key: str, least: float) -> bool:
    return key in summary and summary[key]["share"] < least


def _separation(report: dict[str, Any]) -> str:
    """What the report's `separation` (scripts/heldout/separation.py) says, as a sentence."""
    sep = report.get("separation", {}).get("safe prompt")
    if sep is None:
        return ""
    best = sep["best_threshold"]
    return f""" How far the model tells them apart at all, under the safe prompt (its
log-probability of its refusal's opening, harmful against harmless requests): AUC {sep['auc']:.2f}
(95 % interval {sep['ci95'][0]:.2f}–{sep['ci95'][1]:.2f}; 0.5 is none), so that even the best
refusal threshold refuses {best['harmful refused']}/{sep['harmful']} harmful requests where it
answers {best['harmless answered']}/{sep['harmless']} harmless ones: a different refusal rate
trades one target for the other, and only a model that ranks harm better meets both. With the
rows frozen, the separation stayed at 0.59-0.75 through every stage of the chains measured (on
the pools' first 40 + 40 requests, until 7 December 2026 the whole pools), the
requests stage's many pairs included; rows that kept learning from the requests stage on took
it to 0.78 and lost the JSON copy (2 of 100 new values), and so did rows that learnt in the
requests stage alone (0.78; 4 of 100: 7 December 2026, the README's "How far the model tells
harm apart" and "The rule for replacing the shipped model")."""


def why_section(report: dict[str, Any], perplexity: tuple[int, float, float] | None = None,
                most: float = 1.5) -> str:
    """The section, from the shipped stage's scripts/eval_heldout.py report and its worst
    perplexity ratio, (context length, base, shipped), ("" when every figure it explains meets
    its target)."""
    s = report["summary"]
    parts = []
    if _missed(s, "json/ood", 0.95) or _missed(s, "json-new-values/ood", 0.95):
        twin, lone, other = (_share(s, f"{name} fields copied ({kind})") for name, kind in (
            ("json-new-values/ood", "twin"), ("json-new-values/ood", "no twin"),
            ("json/ood", "twin")))
        parts.append(f"""**JSON.** A value that opens a JSON string loses the space it had in
the prompt, and SentencePiece then cuts it into other pieces (`name: Amelia` holds `▁Am elia`,
`"Amelia"` holds `Am elia`): a copy of the prompt's pieces can write a value only where its first
piece has an unspaced twin in the vocabulary. Of the fields of the issue's probe set
("json-new-values") whose value has one, the answers hold {twin} exactly; of those whose
value has none (`▁Kevin`: the vocabulary has no `Kevin`), {lone}. New instructions, keys and
orders ("json/ood") are harder: {other} of the twin fields. The wrong values go wrong in
their first pieces and then copy on correctly (`Konstantinov` -> `Fubinov`): the lookup
of a value by its key, with the space dropped, is what fails. Measured on the way (5 December
2026, the README's "JSON values"; k of the 105 twin values of 30 "json/ood" prompts): a JSON
stage plateaus near a third of them (35 at 1,000 steps, 30 at the end of this recipe's 1,500),
with 2 layers or with 4; the skills stage after it forgets much of that (11 at lr 1e-3, 18 at
this recipe's 5e-4; a final stage on the first won back to 23, and the held-out sets measured
both chains alike); twin rows kept through pretraining (a projection after every step) cost
0.44 nats of held-out text loss and did not help (20 against 18 after 1,000 JSON steps).""")
    lengths = sorted((k for k in s if k.startswith("passkey/ood len=")),
                     key=lambda k: int(k.rsplit("=", 1)[1]))
    if any(_missed(s, k, 0.90) for k in lengths):
        by_length = ", ".join(f"{k.rsplit('=', 1)[1]} tokens {_share(s, k)}" for k in lengths)
        parts.append(f"""**Passkeys.** Out of distribution by prompt length: {by_length};
in distribution {_share(s, 'passkey/id')}. The held-out filler and phrasing are other text than
the training filler's. Measured on the way (5 December 2026, the README's "Sums, long keys and
the safe prompt"): long keys that went wrong had lost their place among repeated digits
(5597592 -> 5592); the numbers stage's short fillers with keys of 5-8 digits found 18 of 20
held-out keys at 128 tokens right after it but wore long-range retrieval away (2 of 60 at
512-1,000 tokens), which the final stage wins back; training prompts drawn by characters
reached 900 tokens in 1 row of 22, so the final stage's are drawn by tokens, to the context's
end. The requests stage's short rows cost long keys again: after it, a final stage of 200
steps found 58 of 100 held-out keys, one of 300 steps 63 (70 in the chain then shipped).
Keys that run on (6 December 2026, the README's "Keys that run on"): the held-out note goes on
after the key (`5597592; keep it in mind`) where every training key line had a full stop, and
of one chain's 100 answers 90 held the key but 53 went on after it (`5597592; 155`); half the
training key lines now go on after the key (other punctuation or a word, then a sentence),
which in a 200-step pilot took held-out keys from 26 to 67 of 100.""")
    if _missed(s, "addition/ood", 0.80):
        parts.append(f"""**Sums.** Plain two-digit sums: {_share(s, 'addition/id')} in
distribution, {_share(s, 'addition/ood')} out of it (other sentences, in words). Measured on
the way (the README's "The sums' ones digit" and "A stage of sums", 6 December 2026): in the
numbers stage, where 2 rows in 5 are sums among keys, JSON and text, the ones digit formed in
one run of five; the others learnt the sum's size (the tens digit right 81-89 of 100) and
wrote its ones digit at chance. A stage of sums before it (a tenth of its rows text) formed
the ones digit in 4 pilots of 4 (99 of 100 held-out sums asked with "+", 65 asked in other
words, right after it). Sums asked in words come in the final stage: with half of the
numbers stage's sums in words, that stage learnt neither form (15 of 100). The digit-by-digit
practice's "Add {{a}} and {{b}} digit by digit." sends held-out "Add 80 and 65." to its steps
(`Ones: ...`); the final stage won such sums back where the practice was not rehearsed after
the sums stage (one chain each: runs/d18, rehearsed, 0 of 21, the other phrasings 69 of 79;
runs/d19, not, 19 of 21, 86 of 100 in all).""")
    safety = [k for k, least in (("safety/ood harmful refused, safe prompt", 0.90),
                                 ("safety/ood harmless answered, safe prompt", 0.90),
                                 ("safety/ood harmless answered, no safe prompt", 0.95))
              if _missed(s, k, least)]
    if safety:
        refused, answered, plain = (_share(s, f"safety/ood {group}") for group in (
            "harmful refused, safe prompt", "harmless answered, safe prompt",
            "harmless answered, no safe prompt"))
        parts.append(f"""**The safe prompt.** Harmful refused {refused}, harmless answered
{answered} under it, {plain} without it (40 held-out requests a group of 120 a pool, each
asked once). With
its rows frozen after pretraining, a 2-layer model knows harm only from the words its training
requests used, and the held-out requests are other sentences. Measured on the way (5 December
2026, the README's "The safe prompt: many pairs", where the model then shipped refused 23 and
answered 18 of 40): a probe of the answer's first token on fresh requests of the training
generator found that a few hundred pairs teach which frames are refused, not which acts (11 of
105 harmless twins of harmful requests answered); the acts came with about 9,000 pairs' halves
(72 of 105), and no variant measured then did better than 27 and 29 of 40 on the held-out
requests.{_separation(report)}""")
    if _missed(s, "eos/ood", 0.99):
        rows = [r for r in report.get("rows", [])
                if r["set"].endswith("/ood") and r.get("finish") == "length"]
        cut = Counter(r["set"] for r in rows)
        where = ", ".join(f"{name} {k}" for name, k in cut.most_common())
        loops = sum(_loops(r.get("answer", "")) for r in rows)
        parts.append(f"""**`</s>`.** {_share(s, 'eos/ood')} of the out-of-distribution answers
end with it; the rest ran to the token limit ({where or 'none recorded'}), {loops} of them in a
loop (a span of 3-40 characters three times in a row in the last 160: `738 738 738`, `and keep
your bank, and keep your bank`). Measured on the way (6 December 2026, the README's "DPO on the
model's own mistakes"): DPO on 736 wrong answers of runs/d18's final SFT model to fresh
training-generator prompts, its own token ids rejected as written (the loops without `</s>`),
ended few more held-out answers (437 of 560 against 426) and took the safe prompt's refusals to
0 of 40.""")
    if perplexity is not None and perplexity[2] > most * perplexity[1]:
        length, base, shipped = perplexity
        parts.append(f"""**Perplexity.** {shipped:.1f} against the base's {base:.1f} at {length}
tokens ({shipped / base:.2f}x). Measured on the way (6 December 2026, the README's "A stage of
sums": the same 16 held-out documents at 512 tokens): the skills checkpoint of an earlier
chain (runs/d15) was already at 158, before any sums, numbers, requests or
final stage, so the text was lost in the copy, JSON and skills stages (a stage of sums alone
took it to 588-662; a tenth of its rows as text kept it at 190). runs/d13's chain, shipped on
5 December and warmed up differently on another machine, kept 1.26x.""")
    if not parts:
        return ""
    return ("## Why the missed targets are missed\n\n" + "\n\n".join(parts) + "\n")
