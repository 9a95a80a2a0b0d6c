#!/usr/bin/env python3
"""Grammar-constrained decoding benchmark: llguidance vs xgrammar vs outlines-core
on Mixtral's v1 SentencePiece vocabulary (32000 pieces, byte_fallback).

Usage (in a venv with torch==2.13.0, mistral-common[sentencepiece], jsonschema and the three
libraries: pip install llguidance xgrammar outlines-core):
        python benchmarks/grammar_engines.py [--runs 50] [--timing-runs 20] [--budget 300]
        [--libs llguidance,xgrammar,outlines-core] [--out results.json]

Per decode step we time (a) mask computation into an int32 bitmask [1, 1000] and
(b) advancing the matcher with the sampled token ("engine overhead"), and separately
(c) applying the bitmask to the logits + sampling (same pure-torch code for all libs).
The libraries' adapters and the vocabulary they are given are in grammar_adapters.py.
"""
import argparse
import gc
import json
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import jsonschema
import sentencepiece as spm
import torch
from grammar_adapters import ENGINES, EOS, Engine, V, load_sp_vocab, sp_encode_no_prefix

from mixtral.command import positive

torch.set_num_threads(1)

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
# same schema with bounded strings/arrays so random-logit decoding terminates
SCHEMA_BOUNDED = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 3},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
ANY_OBJECT = {"type": "object"}

GRAMMARS: dict[str, tuple[str, dict[str, Any]]] = {
    # name: (kind, schema used for validation)
    "json_object": ("object", ANY_OBJECT),
    "schema": ("schema", SCHEMA),
    "schema_bounded": ("schema", SCHEMA_BOUNDED),
    # schema_bounded + an optional single leading space before '{' (lets the model emit
    # the SentencePiece-canonical '▁{' / '▁{"' first token)
    "schema_bounded_lead": ("schema_lead", SCHEMA_BOUNDED),
}


# --------------------------------------------------------------------------- helpers
_SHIFTS = torch.arange(32, dtype=torch.int32)


def apply_bitmask_(logits: torch.Tensor, bm: torch.Tensor) -> torch.Tensor:
    """bm: int32 [1, ceil(V/32)], bit j of word w => token 32*w+j allowed."""
    allowed = ((bm[0].unsqueeze(-1) >> _SHIFTS) & 1).bool().view(-1)[: logits.shape[-1]]
    logits.masked_fill_(~allowed, float("-inf"))
    return allowed


def allowed_ids(bm: torch.Tensor) -> list[int]:
    return ((bm[0].unsqueeze(-1) >> _SHIFTS) & 1).bool().view(-1)[:V].nonzero().flatten().tolist()


def pct(xs: Sequence[float], p: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * p / 100
    f = int(k)
    c = min(f + 1, len(xs) - 1)
    return xs[f] + (xs[c] - xs[f]) * (k - f)


def decode(toks: list[bytes | None], ids: list[int]) -> bytes:
    return b"".join(cast(bytes, toks[i]) for i in ids if toks[i] is not None)


def run_one(eng: Engine, compiled: Any, toks: list[bytes | None], seed: int, budget: int
            ) -> tuple[list[int], str, list[int], list[int]]:
    g = torch.Generator().manual_seed(seed)
    m = eng.matcher(compiled)
    bm = torch.full((1, (V + 31) // 32), -1, dtype=torch.int32)
    out: list[int] = []
    t_eng: list[int] = []
    t_apply: list[int] = []
    status = "budget"
    for _ in range(budget):
        if eng.done(m):
            status = "stopped"
            break
        logits = torch.randn(V, generator=g)
        t0 = time.perf_counter_ns()
        eng.fill(m, bm)
        t1 = time.perf_counter_ns()
        apply_bitmask_(logits, bm)
        probs = torch.softmax(logits, -1)
        tok = int(torch.multinomial(probs, 1, generator=g))
        t2 = time.perf_counter_ns()
        ok = eng.advance(m, tok)
        t3 = time.perf_counter_ns()
        t_eng.append((t1 - t0) + (t3 - t2))
        t_apply.append(t2 - t1)
        if not ok:
            status = "reject"
            break
        if tok == EOS:
            status = "eos"
            break
        out.append(tok)
    return out, status, t_eng, t_apply


def leading_space_probe(eng: Engine, compiled: Any, sp: spm.SentencePieceProcessor,
                        toks: list[bytes | None]) -> dict[str, Any]:
    """Which first tokens are allowed, and does the grammar accept the canonical
    SentencePiece tokenization (with dummy-prefix '▁') of a valid document?"""
    m = eng.matcher(compiled)
    bm = torch.full((1, (V + 31) // 32), -1, dtype=torch.int32)
    eng.fill(m, bm)
    first = allowed_ids(bm)
    first_strs = sorted({cast(bytes, toks[i]).decode("utf-8", "replace") if toks[i] is not None
                         else sp.id_to_piece(i) for i in first})
    doc = '{"name": "Bob", "age": 42, "tags": ["x"]}'
    res: dict[str, dict[str, Any]] = {}
    for label, ids in (("sp.encode (▁ prefix)", sp.encode(doc)),
                       ("no ▁ prefix", sp_encode_no_prefix(sp, doc))):
        m = eng.matcher(compiled)
        n = 0
        for t in ids + [EOS]:
            eng.fill(m, bm)
            if not ((int(bm[0, t // 32]) >> (t % 32)) & 1):
                break
            if not eng.advance(m, t):
                break
            n += 1
        res[label] = {"first_piece": sp.id_to_piece(ids[0]), "accepted_tokens": n,
                      "total_tokens": len(ids) + 1, "full_accept": n == len(ids) + 1}
    return {"n_first_allowed": len(first), "first_allowed_sample": first_strs[:12],
            "space_first_allowed": any(toks[i] is not None and cast(bytes, toks[i])[:1].isspace()
                                       for i in first),
            "tokenization": res}


def validate(text: str, schema: dict[str, Any]) -> tuple[bool, bool, str]:
    try:
        obj = json.loads(text)
    except Exception as e:
        return False, False, f"json: {e}"[:80]
    try:
        jsonschema.validate(obj, schema)
        return True, True, ""
    except jsonschema.ValidationError as e:
        return True, False, f"schema: {e.message}"[:80]


def bench_apply_kernels(n: int = 200) -> dict[str, dict[str, object]]:
    """Cost of applying a 32000-token bitmask to fp32 logits on CPU (1 thread)."""
    g = torch.Generator().manual_seed(0)
    bm = torch.randint(-2**31, 2**31 - 1, (1, (V + 31) // 32), dtype=torch.int32, generator=g)
    base = torch.randn(1, V, generator=g)
    cands: dict[str, Callable[[torch.Tensor], object]] = {
        "generic torch (bench.py apply_bitmask_)": lambda x: apply_bitmask_(x[0], bm)}
    try:
        import xgrammar as xgr
        cands["xgrammar.apply_token_bitmask_inplace (cpu)"] = (
            lambda x: xgr.apply_token_bitmask_inplace(x, bm))
    except Exception:
        pass
    try:
        import llguidance.torch as llt
        cands["llguidance.torch.apply_token_bitmask_inplace (torch.compile)"] = (
            lambda x: llt.apply_token_bitmask_inplace(x, bm))
    except Exception:
        pass
    ref = base.clone()
    apply_bitmask_(ref[0], bm)
    out: dict[str, dict[str, object]] = {}
    for k, f in cands.items():
        try:
            logits = base.clone()
            t0 = time.perf_counter()
            f(logits)
            first = time.perf_counter() - t0
            assert torch.equal(logits, ref), "mismatch"
            ts = []
            for _ in range(n):
                logits = base.clone()
                t0 = time.perf_counter_ns()
                f(logits)
                ts.append(time.perf_counter_ns() - t0)
            out[k] = {"median_us": statistics.median(ts) / 1e3, "first_call_ms": first * 1e3}
        except Exception as e:
            out[k] = {"error": repr(e)[:200]}
    return out


# --------------------------------------------------------------------------- main
def bench_lib(lib: str, sp: spm.SentencePieceProcessor, toks: list[bytes | None],
              args: argparse.Namespace, flexible_ws: bool) -> dict[str, Any]:
    eng = ENGINES[lib](sp, toks, flexible_ws=flexible_ws)
    r: dict[str, Any] = {"tokenizer_build_s": eng.tok_build_s, "grammars": {}}
    for gname, (kind, schema) in GRAMMARS.items():
        gr: dict[str, Any] = {}
        # compile time (median of N fresh compiles) + first mask latency
        ct = []
        for _ in range(args.compile_reps):
            gc.collect()
            t0 = time.perf_counter()
            compiled = eng.compile(kind, schema)
            ct.append(time.perf_counter() - t0)
        m = eng.matcher(compiled)
        bm = torch.full((1, (V + 31) // 32), -1, dtype=torch.int32)
        t0 = time.perf_counter()
        eng.fill(m, bm)
        gr["first_mask_ms"] = (time.perf_counter() - t0) * 1e3
        gr["compile_ms_median"] = statistics.median(ct) * 1e3
        gr["compile_ms_first"] = ct[0] * 1e3
        gr["leading_space"] = leading_space_probe(eng, compiled, sp, toks)

        statuses: dict[str, int]
        eng_all, app_all, tot_ns, ntoks = [], [], 0, 0
        statuses, parse_ok, schema_ok, errs, lens = {}, 0, 0, [], []
        for seed in range(args.runs):
            out, status, te, ta = run_one(eng, compiled, toks, seed, args.budget)
            if seed < args.timing_runs:
                eng_all += te
                app_all += ta
                tot_ns += sum(te)
                ntoks += len(te)
            statuses[status] = statuses.get(status, 0) + 1
            lens.append(len(out))
            if status in ("eos", "stopped"):
                try:
                    text = decode(toks, out).decode("utf-8")
                except UnicodeDecodeError as exc:
                    errs.append(f"utf8: {exc}"[:80])
                    continue
                p, s, e = validate(text, schema)
                parse_ok += p
                schema_ok += s
                if e:
                    errs.append(e + " :: " + text[:60])
                if seed == 0 or "example" not in gr:
                    gr["example"] = text[:200]
        gr.update({
            "engine_us_per_token_median": pct(eng_all, 50) / 1e3,
            "engine_us_per_token_p90": pct(eng_all, 90) / 1e3,
            "engine_us_per_token_max": max(eng_all) / 1e3 if eng_all else None,
            "engine_us_per_token_mean": (tot_ns / ntoks / 1e3) if ntoks else None,
            "apply_sample_us_median": pct(app_all, 50) / 1e3,
            "timed_tokens": ntoks,
            "runs": args.runs, "statuses": statuses,
            "finished": sum(v for k, v in statuses.items() if k in ("eos", "stopped")),
            "parse_ok": parse_ok, "schema_ok": schema_ok,
            "median_len_tokens": statistics.median(lens),
            "errors": errs[:5],
        })
        r["grammars"][gname] = gr
        print(f"  {lib:14s} ws={'flex' if flexible_ws else 'compact'} {gname:15s} "
              f"compile={gr['compile_ms_median']:.1f}ms first_mask={gr['first_mask_ms']:.2f}ms "
              f"eng med={gr['engine_us_per_token_median']:.1f}us "
              f"p90={gr['engine_us_per_token_p90']:.1f}us "
              f"apply+sample={gr['apply_sample_us_median']:.1f}us "
              f"fin={gr['finished']}/{args.runs} json={gr['parse_ok']} "
              f"schema={gr['schema_ok']} st={statuses} "
              f"lead_ws={gr['leading_space']['space_first_allowed']}", flush=True)
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=positive, default=50)
    ap.add_argument("--timing-runs", type=positive, default=20)
    ap.add_argument("--budget", type=positive, default=300)
    ap.add_argument("--compile-reps", type=positive, default=5)
    ap.add_argument("--libs", default="llguidance,xgrammar,outlines-core")
    ap.add_argument("--ws", default="flex,compact")
    ap.add_argument("--out", default=str(Path(__file__).with_name("results.json")))
    args = ap.parse_args()

    sp, toks = load_sp_vocab()
    results: dict[str, Any] = {"versions": {}, "torch": torch.__version__, "args": vars(args),
                               "libs": {}}
    from importlib.metadata import version
    for lib in args.libs.split(","):
        try:
            results["versions"][lib] = version(lib)
        except Exception:
            pass
        # outlines-core has a single (compact-ish, "[ ]?") whitespace default
        for ws in (["default"] if lib == "outlines-core" else args.ws.split(",")):
            print(f"== {lib} ({ws} whitespace)", flush=True)
            try:
                results["libs"][f"{lib}/{ws}"] = bench_lib(lib, sp, toks, args, ws != "compact")
            except Exception as e:  # report and move on
                import traceback
                traceback.print_exc()
                results["libs"][f"{lib}/{ws}"] = {"error": repr(e)}
    results["apply_kernels_us"] = bench_apply_kernels()
    print("apply kernels (us, median of 200):", results["apply_kernels_us"])
    Path(args.out).write_text(json.dumps(results, indent=1, default=str))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
