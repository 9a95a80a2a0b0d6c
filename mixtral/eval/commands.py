"""`mixtral eval passkey | perplexity | routing | lm`: each loads the model, runs its study
(passkey.py, perplexity.py, routing.py, harness/), writes JSON and figures under --out,
appends the run to runs.jsonl and prints a one-line JSON summary.

    python -m mixtral.eval.commands passkey --lengths 1k,2k --out mixtral-eval
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mixtral import assemble
from mixtral.command import Arguments, natural, positive, standalone

if TYPE_CHECKING:
    from mixtral.model import Transformer


def arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="eval_command", required=True)

    sp = sub.add_parser("passkey", help="passkey retrieval over prompt length x key depth")
    _common(sp)
    sp.add_argument("--lengths", help="prompt lengths in tokens, e.g. 1k,2k,4k,8k,16k,32k "
                    "(default: doubling from 256 to the model's context)")
    sp.add_argument("--depths", type=positive, default=10, help="key depths from 0%% to 100%%")
    sp.add_argument("--trials", type=positive, default=5, help="prompts per cell")
    form = sp.add_mutually_exclusive_group()
    form.add_argument("--chat", action="store_const", const=True, dest="chat",
                      help="wrap each prompt as a user turn of the instruct format (default: "
                      "when the model is an instruct model, see mixtral/eval/instruct.py)")
    form.add_argument("--plain", action="store_const", const=False, dest="chat",
                      help="raw prompts after BOS, even for an instruct model")
    sp.set_defaults(run=passkey)

    sp = sub.add_parser("perplexity", help="perplexity of the first L tokens, for a ladder of L")
    _common(sp)
    sp.add_argument("--data", required=True, help="a text file (one document: .txt, .md, "
                    ".py, ...), a .jsonl file ({\"text\": ...} per line), or a folder of them")
    sp.add_argument("--max-len", type=positive, help="longest context; documents shorter than "
                    "this are skipped (default: the model's context, at most 32768)")
    sp.add_argument("--lengths", help="the ladder, e.g. 512,1k,2k (default: doubling from "
                    "128 to --max-len)")
    sp.add_argument("--tolerance", type=float, default=0.01, help="relative rise allowed "
                    "per step when judging the curve monotone (default 0.01)")
    sp.set_defaults(run=perplexity)

    sp = sub.add_parser("routing", help="expert shares and repetition per layer and domain")
    _common(sp)
    sp.add_argument("--data", required=True, help="a folder with one file (any text, or "
                    ".jsonl) or folder of them per domain, named by its stem: domains/code.py "
                    "is domain 'code'")
    sp.add_argument("--max-len", type=positive, help="window length in tokens (default: the "
                    "model's context, at most 4096)")
    sp.add_argument("--max-tokens", type=positive, default=20000,
                    help="text tokens per domain (default 20000)")
    sp.add_argument("--html", metavar="TEXT_FILE", help="also write routing.html: this text "
                    "coloured by first-choice expert at the first, middle and last layer")
    sp.set_defaults(run=routing)

    sp = sub.add_parser("lm", help="EleutherAI lm-evaluation-harness tasks (extra: eval)")
    _common(sp)
    sp.add_argument("--tasks", required=True, help="comma-separated task names, e.g. "
                    "mixtral_mc_demo,mixtral_arith_demo or your own local tasks")
    sp.add_argument("--num-fewshot", type=natural,
                    help="examples before each question (default: each task's own)")
    sp.add_argument("--batch-size", type=positive, default=8,
                    help="requests the engine runs at once")
    sp.add_argument("--include-path", action="append", default=[],
                    help="a folder of your own task YAMLs (repeatable)")
    sp.add_argument("--chat", action="store_true", help="apply the instruct format to the "
                    "tasks' prompts (for instruct models)")
    sp.set_defaults(run=lm)


COMMANDS: dict[str, Arguments] = {"eval": arguments}


def _common(p: argparse.ArgumentParser) -> None:
    assemble.add_arguments(p)
    p.add_argument("--out", default="mixtral-eval", help="folder for the JSON, figures "
                   "and the run log runs.jsonl (default mixtral-eval)")
    p.add_argument("--limit", type=positive, help="a quick run: at most this many "
                   "trials / documents / examples")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the generated prompts and of sampling")
    p.add_argument("--chunk", type=positive, default=1024,
                   help="prefill chunk (tokens): bounds memory on long inputs")


# --- the bookkeeping every study shares ----------------------------------------------------------

def _start(args: argparse.Namespace) -> tuple[Transformer, str, Path, float]:
    from mixtral.default_model import NAME

    model = assemble.from_args(args)
    if not _leader():  # a follower under --tp/--ep runs the study on its shard, silently
        import atexit
        import shutil
        import tempfile

        args.out = tempfile.mkdtemp(prefix="mixtral-eval-follower-")  # rank 0 writes the results
        atexit.register(shutil.rmtree, args.out, True)
    label = args.model or f"default ({NAME})"
    return model, label, Path(args.out), time.perf_counter()


def _finish(args: argparse.Namespace, label: str, t0: float, result: dict[str, Any],
            files: list[Path], summary: dict[str, Any]) -> int:
    from mixtral.eval.report import append_run

    settings = {k: v for k, v in vars(args).items() if k not in ("run", "command", "model")
                and not callable(v)}
    seconds = time.perf_counter() - t0
    result["seconds"] = round(seconds, 2)
    append_run(Path(args.out) / "runs.jsonl", f"eval {args.eval_command}", label, settings,
               summary, seconds, files)
    if _leader():
        print(json.dumps({"model": label, **summary, "seconds": round(seconds, 1),
                          "outputs": [str(f) for f in files]}, ensure_ascii=False))
    return 0


def _progress(total: int, desc: str) -> Any:
    from mixtral.progress import bar

    # drawn on rank 0 even into a log file: a study's log shows how far it got
    return bar(total, desc, "item", shown=_leader())


def _leader() -> bool:
    """Under --tp/--ep only rank 0 speaks; outside a launch, the one process does."""
    from mixtral.parallel import is_leader

    return is_leader()


# --- the studies ---------------------------------------------------------------------------------

def passkey(args: argparse.Namespace) -> int:
    from mixtral.eval import figures
    from mixtral.eval import passkey as study
    from mixtral.eval.instruct import prompt_format
    from mixtral.eval.report import write_json
    from mixtral.tokenizer import default_tokenizer

    if args.chat is None:
        args.chat, reason = prompt_format(args.model)
        flag = "--plain for raw prompts" if args.chat else "--chat for the instruct format"
    else:
        reason, flag = ("--chat" if args.chat else "--plain"), ""
    if _leader():
        form = "the instruct format" if args.chat else "plain prompts"
        print(f"[mixtral] passkey: {form}: {reason}" + (f" ({flag})" if flag else ""),
              file=sys.stderr)
    model, label, out, t0 = _start(args)
    context = model.args.max_seq_len - study.ANSWER_TOKENS
    if args.lengths:
        lengths = study.parse_lengths(args.lengths)
    else:
        lengths = [n for n in (256 * 2**i for i in range(20)) if n < context] + [context]
    trials = min(args.trials, args.limit) if args.limit else args.trials
    with _progress(len(lengths) * args.depths * trials, "passkey") as bar:
        result = study.run(model, default_tokenizer(), lengths, args.depths, trials,
                           args.seed, args.chat, args.chunk, bar.update)
    result["model"], result["chat_reason"] = label, reason
    files = [out / "passkey.json", out / "passkey.png"]
    figures.passkey_heatmap(result, files[1], f"passkey retrieval: {label}")
    write_json(files[0], result)
    return _finish(args, label, t0, result, files, {
        "overall": result["overall"],
        "overall_starts_with_key_tokens": result["overall_starts_with_key_tokens"],
        "chat": args.chat, "chat_reason": reason, "lengths": lengths, "trials": trials})


def perplexity(args: argparse.Namespace) -> int:
    from mixtral.eval import figures
    from mixtral.eval import perplexity as study
    from mixtral.eval.passkey import parse_lengths
    from mixtral.eval.report import write_json
    from mixtral.tokenizer import default_tokenizer

    documents = study.read_documents(args.data)  # bad data fails before the model loads
    model, label, out, t0 = _start(args)
    max_len = args.max_len or min(model.args.max_seq_len, 32768)
    lengths = parse_lengths(args.lengths) if args.lengths else study.ladder(max_len)
    docs = study.select(default_tokenizer(), documents, max(lengths), args.limit)
    with _progress(len(docs), "perplexity") as bar:
        rows = study.curve(model, docs, lengths, args.chunk, bar.update)
    ok = study.monotone(rows, args.tolerance)
    result = {"model": label, "data": args.data, "documents": [n for n, _ in docs],
              "lengths": lengths, "curve": rows, "tolerance": args.tolerance,
              "monotone_decreasing": ok}
    files = [out / "perplexity.json", out / "perplexity.png"]
    figures.perplexity_curve(rows, files[1], f"perplexity vs context: {label}")
    write_json(files[0], result)
    return _finish(args, label, t0, result, files, {
        "documents": len(docs), "monotone_decreasing": ok,
        "perplexity": {str(r["length"]): round(r["perplexity"], 3) for r in rows}})


def routing(args: argparse.Namespace) -> int:
    from mixtral.eval import figures
    from mixtral.eval import routing as study
    from mixtral.eval.perplexity import read_text
    from mixtral.eval.report import write_json, write_text
    from mixtral.tokenizer import default_tokenizer

    data = study.domains(args.data)  # bad data fails before the model loads
    if args.limit:
        data = {name: docs[:args.limit] for name, docs in data.items()}
    shown = read_text(args.html) if args.html else None
    model, label, out, t0 = _start(args)
    tokenizer = default_tokenizer()
    max_len = args.max_len or min(model.args.max_seq_len, 4096)
    with _progress(len(data), "routing") as bar:
        result = study.run(model, tokenizer, data, max_len, args.max_tokens, args.chunk,
                           bar.update)
    result["model"] = label
    files = [out / "routing.json", out / "routing.md", out / "routing.png",
             out / "routing_repetition.png"]
    write_json(files[0], result)
    write_text(files[1], study.table(result))
    figures.routing_bars(result, files[2], f"expert shares: {label}")
    figures.repetition(result, files[3], f"consecutive-token repetition: {label}")
    if shown is not None:
        files.append(out / "routing.html")
        write_text(files[-1], study.html_view(model, tokenizer, shown, args.chunk))
    if _leader():
        print(study.table(result), file=sys.stderr)
    layers = result["table_layers"]
    return _finish(args, label, t0, result, files, {
        "domains": list(result["domains"]), "table_layers": layers,
        "repeat_first": {n: [round(d["repeat_first"][i], 4) for i in layers]
                         for n, d in result["domains"].items()},
        "repeat_either": {n: [round(d["repeat_either"][i], 4) for i in layers]
                          for n, d in result["domains"].items()}})


def lm(args: argparse.Namespace) -> int:
    try:
        from mixtral.eval import harness
    except ImportError as e:
        raise ValueError(f"lm-eval is not installed ({e}): pip install 'mixtral[eval]'") \
            from None
    from mixtral.eval.report import write_json

    t0 = time.perf_counter()
    label = args.model or "default"
    result = harness.evaluate(args.model, [t for t in args.tasks.split(",") if t],
                              limit=args.limit, num_fewshot=args.num_fewshot,
                              batch_size=args.batch_size, seed=args.seed, device=args.device,
                              dtype=args.dtype, include_path=args.include_path or None,
                              apply_chat_template=args.chat)
    files = [Path(args.out) / "lm_eval.json"]
    write_json(files[0], result)
    return _finish(args, label, t0, result, files, {"results": result.get("results", {})})


if __name__ == "__main__":
    sys.exit(standalone("python -m mixtral.eval.commands", COMMANDS))
