"""JSON mode as the server runs it: validity and per-token cost of `mixtral.grammar` under
random logits (the worst case: a model that knows nothing about JSON).

    python benchmarks/json_mode.py [--runs 30]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jsonschema
import torch

from mixtral.grammar import json_constraint_factory
from mixtral.tokenizer import default_tokenizer

SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                           "tags": {"type": "array", "items": {"type": "string"}}},
          "required": ["name", "age"], "additionalProperties": False}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=30)
    a = p.parse_args()
    torch.set_num_threads(1)
    tok = default_tokenizer()
    t0 = time.perf_counter()
    make = json_constraint_factory(tok)
    print(f"vocabulary adapter + llguidance tokenizer: {1e3 * (time.perf_counter() - t0):.0f} ms")
    g = torch.Generator().manual_seed(0)
    for name, schema in (("json_object", None), ("json_schema", SCHEMA)):
        for budget in (40, 120, 300):
            ok, lengths, per_token, compile_ms = 0, [], [], []
            for _ in range(a.runs):
                t0 = time.perf_counter()
                c = make(schema)
                compile_ms.append(1e3 * (time.perf_counter() - t0))
                out = []
                for i in range(budget):
                    t0 = time.perf_counter()
                    mask = c.allowed(budget - i)
                    spent = time.perf_counter() - t0
                    logits = torch.randn(32000, generator=g).masked_fill(~mask, float("-inf"))
                    token = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=g))
                    t0 = time.perf_counter()
                    c.advance(token)
                    per_token.append(spent + time.perf_counter() - t0)
                    if token == tok.eos_id:
                        break
                    out.append(token)
                try:
                    value = json.loads(tok.decode(out))
                    if schema:
                        jsonschema.validate(value, schema)
                    ok += 1
                except (ValueError, jsonschema.ValidationError):
                    pass
                lengths.append(len(out))
            per_token.sort()
            print(json.dumps({
                "grammar": name, "max_tokens": budget, "valid": f"{ok}/{a.runs}",
                "median_tokens": statistics.median(lengths),
                "compile_ms_median": round(statistics.median(compile_ms), 2),
                "mask_plus_advance_us_median": round(1e6 * statistics.median(per_token), 1),
                "mask_plus_advance_us_p90": round(1e6 * per_token[int(0.9 * len(per_token))], 1),
            }))


if __name__ == "__main__":
    main()
