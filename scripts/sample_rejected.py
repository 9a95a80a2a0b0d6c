"""Preference pairs whose rejected side is the SFT model's own failure, for DPO.

    python scripts/sample_rejected.py SFT_MODEL OUT.jsonl [--corpus data/corpus] [--n 3000]
                                      [--seed 2] [--temperature 0.8]
                                      [--mix data/instruct/dpo.jsonl --mix-n 3000]

Draws fresh prompts from the instruction tasks (seed 2: neither the training seed 0 nor the
evaluation seed 1), samples the SFT model once greedily and once at the given temperature, and
keeps every answer that differs from the reference answer as {"messages", "chosen": reference,
"rejected": what the model said}; an answer cut off by max_tokens gets "rejected_eos": false
(the model rambled without </s>). With --mix, that many pairs drawn at random from the
generated preference data are written too, so that DPO sees both kinds. Prints how many pairs
each task gave.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
from collections import Counter
from pathlib import Path

import torch

from mixtral import chat
from mixtral.assemble import assemble
from mixtral.completion import complete
from mixtral.generate import GenerationParams
from mixtral.tokenizer import default_tokenizer

_spec = importlib.util.spec_from_file_location(
    "build_instruct_data", Path(__file__).with_name("build_instruct_data.py"))
assert _spec and _spec.loader
tasks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tasks)


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("out")
    p.add_argument("--corpus", default="data/corpus")
    p.add_argument("--n", type=int, default=3000, help="prompts to try")
    p.add_argument("--seed", type=int, default=2)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--mix", help="generated preference pairs (JSONL) to draw from as well")
    p.add_argument("--mix-n", type=int, default=3000)
    a = p.parse_args()
    model = assemble(a.model)  # the decode path the CLI uses
    tok = default_tokenizer()
    r = random.Random(a.seed)
    parallel, definitions = tasks.load_corpus(Path(a.corpus))
    draw = {"json": lambda: tasks.task_json(r), "arithmetic": lambda: tasks.task_arithmetic(r),
            "passkey": lambda: tasks.task_passkey(r),
            "multiturn": lambda: tasks.task_multiturn(r),
            "translate": lambda: tasks.task_translate(r, parallel),
            "system": lambda: tasks.task_system(r, definitions),
            "safety": lambda: tasks.task_safety(r)}
    if definitions:
        draw["definition"] = lambda: tasks.task_definition(r, definitions)
    names = list(draw)
    tried: Counter[str] = Counter()
    kept: Counter[str] = Counter()
    tmp = Path(a.out).with_suffix(".tmp")
    with open(tmp, "w") as f:
        for i in range(a.n):
            name = names[i % len(names)]
            messages, answer, _ = draw[name]()
            prompt = chat.encode(messages, tokenizer=tok)
            seen = set()
            for temperature in (0.0, a.temperature):
                params = GenerationParams(max_tokens=a.max_tokens, temperature=temperature,
                                          seed=a.seed * 1_000_003 + i)
                got = complete(model, tok, prompt, params)
                text = got.text.strip()
                tried[name] += 1
                if text == answer or text in seen or not text:
                    continue
                seen.add(text)
                kept[name] += 1
                pair = {"task": name, "source": "sft-sample", "messages": messages,
                        "chosen": answer, "rejected": text}
                if got.finish_reason == "length":
                    pair["rejected_eos"] = False
                f.write(json.dumps(pair, ensure_ascii=False) + "\n")
        if a.mix:
            lines = Path(a.mix).read_text().splitlines()
            for line in random.Random(a.seed).sample(lines, min(a.mix_n, len(lines))):
                f.write(line + "\n")
    tmp.replace(a.out)
    print(json.dumps({"answers": sum(tried.values()), "pairs": sum(kept.values()),
                      "by_task": {k: f"{kept[k]}/{tried[k]}" for k in names}}))


if __name__ == "__main__":
    main()
