"""`mixtral` command line: chat, generate, info, convert. Thin: parse, call the library, print.

Nothing imports this module; it imports the rest lazily so `mixtral info` starts fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:

    from mixtral.generate import GenerationParams
    from mixtral.model import Transformer


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command == "train":  # KEY=VALUE overrides may follow --config
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        _check_device(getattr(args, "device", "cpu"))
        code = args.run(args)
        if getattr(args, "tp", 1) > 1 or getattr(args, "ep", 1) > 1:
            from mixtral.parallel import finish

            finish()  # every rank leaves together: none tears the group down under another
        return code
    except (ValueError, KeyError, FileNotFoundError) as e:  # CheckpointError, ChatError too
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"mixtral {args.command}: error: {message}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mixtral", description="Mixtral 8x7B: chat, generate, "
                                "inspect and convert checkpoints.")
    sub = p.add_subparsers(dest="command", required=True)

    def model_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--model", metavar="PATH", help="checkpoint folder or file (HF or "
                        "Mistral layout); default: the built-in default model")
        sp.add_argument("--dtype", help="bf16, fp16 or fp32 (default: the checkpoint's)")
        sp.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
        sp.add_argument("--reference", action="store_true", help="run the reference modules of "
                        "model.py instead of the fast paths (mixtral.fast)")
        sp.add_argument("--max-ram", help="keep experts on disk, paged in under this RAM budget "
                        "(e.g. 16GiB; a quantized checkpoint on the CPU)")
        sp.add_argument("--lora", metavar="ADAPTER", help="a LoRA adapter folder (from "
                        "mixtral train ... lora_rank=N), merged into the weights at load")
        sp.add_argument("--tp", type=int, default=1, help="tensor parallel over N processes "
                        "(launch with torchrun --nproc-per-node N -m mixtral ...)")
        sp.add_argument("--ep", type=int, default=1, help="expert parallel over N processes "
                        "(combinable with --tp over the same N)")

    def sampling_args(sp: argparse.ArgumentParser, max_tokens: int) -> None:
        sp.add_argument("--max-tokens", type=int, default=max_tokens)
        sp.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
        sp.add_argument("--top-p", type=float, default=1.0)
        sp.add_argument("--seed", type=int, help="same seed and prompt -> same output")
        sp.add_argument("--system", help="system prompt")
        sp.add_argument("--safe-prompt", action="store_true",
                        help="prepend Mistral's guardrail system prompt")

    sp = sub.add_parser("chat", help="interactive multi-turn chat, streamed")
    model_args(sp)
    sampling_args(sp, max_tokens=512)
    sp.set_defaults(run=_chat)

    sp = sub.add_parser("generate", help="complete one prompt")
    model_args(sp)
    sampling_args(sp, max_tokens=128)
    sp.add_argument("--prompt", required=True, help="the prompt text ('-' reads stdin)")
    sp.add_argument("--chat", action="store_true", help="send the prompt as a user message in "
                    "the instruct format (default: raw text after BOS)")
    sp.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    sp.add_argument("--json", action="store_true", help="print text, finish reason and usage")
    sp.set_defaults(run=_generate)

    sp = sub.add_parser("serve", help="serve the Mistral chat API and a web chat page")
    model_args(sp)
    sp.add_argument("--host", default="127.0.0.1")
    sp.add_argument("--port", type=int, default=8000)
    sp.add_argument("--api-key", help="require this bearer key on /v1/* (default: the "
                    "MIXTRAL_API_KEY environment variable; none: open)")
    sp.add_argument("--max-queue", type=int, default=16,
                    help="requests that may wait for the engine before 429 (default 16)")
    sp.add_argument("--max-batch", type=int, default=8,
                    help="sequences generated together (KV cache slots; default 8)")
    sp.add_argument("--max-seq-len", type=int, help="positions per sequence (default: the "
                    "model's context, at most 8192); the KV cache holds max-batch of them")
    sp.add_argument("--grace", type=int, default=10, help="seconds in-flight requests get "
                    "to finish on SIGTERM/Ctrl-C before they are cancelled (default 10)")
    sp.set_defaults(run=_serve)

    sp = sub.add_parser("train", help="pretrain, SFT or DPO from a recipe")
    sp.add_argument("stage", choices=["pretrain", "sft", "dpo"])
    sp.add_argument("--config", required=True, help="a recipe (YAML), e.g. recipes/*.yaml")
    sp.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                    help="override recipe settings, e.g. steps=200 lr=1e-3")
    sp.set_defaults(run=_train)

    ev = sub.add_parser("eval", help="passkey, perplexity vs context, routing, lm-eval tasks")
    evs = ev.add_subparsers(dest="eval_command", required=True)

    def eval_args(sp: argparse.ArgumentParser) -> None:
        model_args(sp)
        sp.add_argument("--out", default="mixtral-eval", help="folder for the JSON, figures "
                        "and the run log runs.jsonl (default mixtral-eval)")
        sp.add_argument("--limit", type=int, help="a quick run: at most this many "
                        "trials / documents / examples")
        sp.add_argument("--seed", type=int, default=0)
        sp.add_argument("--chunk", type=int, default=1024,
                        help="prefill chunk (tokens): bounds memory on long inputs")

    sp = evs.add_parser("passkey", help="passkey retrieval over prompt length x key depth")
    eval_args(sp)
    sp.add_argument("--lengths", help="prompt lengths in tokens, e.g. 1k,2k,4k,8k,16k,32k "
                    "(default: doubling from 256 to the model's context)")
    sp.add_argument("--depths", type=int, default=10, help="key depths from 0%% to 100%%")
    sp.add_argument("--trials", type=int, default=5, help="prompts per cell")
    sp.add_argument("--chat", action="store_true",
                    help="wrap each prompt as a user turn of the instruct format")
    sp.set_defaults(run=_eval_passkey)

    sp = evs.add_parser("perplexity", help="perplexity of the first L tokens, for a ladder of L")
    eval_args(sp)
    sp.add_argument("--data", required=True, help=".txt (one document each) or .jsonl "
                    "({\"text\": ...} per line) file, or a folder of them")
    sp.add_argument("--max-len", type=int, help="longest context; documents shorter than "
                    "this are skipped (default: the model's context, at most 32768)")
    sp.add_argument("--lengths", help="the ladder, e.g. 512,1k,2k (default: doubling from "
                    "128 to --max-len)")
    sp.add_argument("--tolerance", type=float, default=0.01, help="relative rise allowed "
                    "per step when judging the curve monotone (default 0.01)")
    sp.set_defaults(run=_eval_perplexity)

    sp = evs.add_parser("routing", help="expert shares and repetition per layer and domain")
    eval_args(sp)
    sp.add_argument("--data", required=True, help="a folder with one file or folder per "
                    "domain (.txt / .jsonl)")
    sp.add_argument("--max-len", type=int, help="window length in tokens (default: the "
                    "model's context, at most 4096)")
    sp.add_argument("--max-tokens", type=int, default=20000,
                    help="text tokens per domain (default 20000)")
    sp.add_argument("--html", metavar="TEXT_FILE", help="also write routing.html: this text "
                    "coloured by first-choice expert at the first, middle and last layer")
    sp.set_defaults(run=_eval_routing)

    sp = evs.add_parser("lm", help="EleutherAI lm-evaluation-harness tasks (extra: eval)")
    eval_args(sp)
    sp.add_argument("--tasks", required=True, help="comma-separated task names, e.g. "
                    "mixtral_mc_demo,mixtral_arith_demo or your own local tasks")
    sp.add_argument("--num-fewshot", type=int)
    sp.add_argument("--batch-size", type=int, default=8)
    sp.add_argument("--include-path", action="append", default=[],
                    help="a folder of your own task YAMLs (repeatable)")
    sp.add_argument("--chat", action="store_true", help="apply the instruct format to the "
                    "tasks' prompts (for instruct models)")
    sp.set_defaults(run=_eval_lm)

    sp = sub.add_parser("lora", help="LoRA adapters: merge one into its base model")
    sp.add_argument("action", choices=["merge"])
    sp.add_argument("base", help="the base checkpoint")
    sp.add_argument("adapter", help="the adapter folder (adapter.safetensors + config)")
    sp.add_argument("dst", help="where to write the merged checkpoint (HF layout)")
    sp.set_defaults(run=_lora)

    sp = sub.add_parser("bench", help="prefill and decode speed (random weights for a preset)")
    sp.add_argument("--model", default="bench", help="a preset (bench, tiny, mixtral-8x7b: "
                    "random weights) or a checkpoint path (default: bench)")
    sp.add_argument("--quant", default="bf16", choices=["fp32", "bf16", "int8", "int4"])
    sp.add_argument("--device", default="cpu")
    sp.add_argument("--prompt-len", type=int, default=512)
    sp.add_argument("--gen-len", type=int, default=128)
    sp.add_argument("--batch", type=int, default=1)
    sp.add_argument("--repeats", type=int, default=3, help="medians over this many runs")
    sp.add_argument("--tp", type=int, default=1, help="tensor parallel (under torchrun)")
    sp.add_argument("--ep", type=int, default=1, help="expert parallel (under torchrun)")
    sp.add_argument("--json", action="store_true", help="one JSON line (stable keys)")
    sp.add_argument("--reference", action="store_true",
                    help="measure the reference modules of model.py, without the fast paths")
    sp.add_argument("--max-ram", help="offload experts under this RAM budget (quantized "
                    "checkpoint path)")
    sp.set_defaults(run=_bench)

    sp = sub.add_parser("info", help="sizes of a preset or checkpoint, and a checkpoint's "
                        "layout; --system: this CPU and the paths it takes")
    sp.add_argument("target", nargs="?", help="a preset name (mixtral-8x7b, bench, tiny) or a path")
    sp.add_argument("--system", action="store_true",
                    help="the CPU tier (MIXTRAL_ISA caps it) and the paths chosen for it")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(run=_info)

    sp = sub.add_parser("quantize", help="write an int8 or int4 copy of a checkpoint that "
                        "mixtral.load reads directly")
    sp.add_argument("src")
    sp.add_argument("dst", help="an empty or new folder")
    sp.add_argument("--bits", type=int, required=True, choices=[8, 4])
    sp.add_argument("--group-size", type=int, help="int4 group size: 32, 64, 128 or 256 "
                    "(default: the largest of 128/64/32 that divides every input size)")
    sp.add_argument("--shard-size", default="5GB")
    sp.add_argument("--layout", default="portable", choices=["portable", "cpu64"],
                    help="portable (the only one written: the same bytes on every machine; "
                    "cpu64 files of mixtral 0.1 still load)")
    sp.set_defaults(run=_quantize)

    sp = sub.add_parser("convert", help="rewrite a checkpoint in the HF or Mistral layout")
    sp.add_argument("src")
    sp.add_argument("dst", help="an empty or new folder")
    sp.add_argument("--to", required=True, choices=["hf", "mistral"])
    sp.add_argument("--dtype", help="cast to bf16, fp16 or fp32 (default: keep)")
    sp.add_argument("--shard-size", default="5GB", help="largest HF shard, e.g. 5GB, 500MB")
    sp.set_defaults(run=_convert)
    return p


# --- running models ------------------------------------------------------------------------------

def _check_device(text: str) -> None:
    """--device: one that this machine and this build of PyTorch have (ValueError, so exit 2
    with one line, otherwise); PyTorch is imported only for devices other than the CPU."""
    if text == "cpu":
        return
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        raise ValueError(f"{text!r} is not a device; write cpu, cuda or "
                                         "cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            build = "this PyTorch has no CUDA" if torch.version.cuda is None else "no GPU found"
            raise ValueError(f"{text}: {build}; use --device cpu")
        if device.index is not None and device.index >= count:
            raise ValueError(f"{text}: there are {count} GPU(s), cuda:0 to "
                                             f"cuda:{count - 1}")
    elif device.type != "cpu" and device.type != "mps":
        raise ValueError(f"{text}: mixtral runs on cpu or cuda")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{text}: no MPS device here; use --device cpu")


def _load(args: argparse.Namespace) -> Transformer:
    from mixtral.assemble import from_args

    if args.command == "serve":  # the engine's cache: max-batch sequences
        return from_args(args, lambda m: args.max_batch * min(args.max_seq_len or 8192,
                                                              m.max_seq_len))
    return from_args(args)


def _params(args: argparse.Namespace) -> GenerationParams:
    from mixtral.generate import GenerationParams

    return GenerationParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            top_p=args.top_p, seed=args.seed)


def _system(args: argparse.Namespace) -> list[dict[str, Any]]:
    return [{"role": "system", "content": args.system}] if args.system else []


def _generate(args: argparse.Namespace) -> int:
    from mixtral import chat
    from mixtral.completion import stream
    from mixtral.tokenizer import default_tokenizer

    prompt_text = sys.stdin.read() if args.prompt == "-" else args.prompt
    tokenizer = default_tokenizer()
    if args.chat or args.system or args.safe_prompt:
        messages = [*_system(args), {"role": "user", "content": prompt_text}]
        prompt = chat.encode(messages, args.safe_prompt, tokenizer)
    else:
        prompt = tokenizer.encode(prompt_text, bos=True)
    model = _load(args)
    parts, last = [], None
    for last in stream(model, tokenizer, prompt, _params(args), tuple(args.stop)):
        parts.append(last.text)
        if not args.json:
            print(last.text, end="", flush=True)
    assert last is not None
    if args.json:
        print(json.dumps({"text": "".join(parts), "finish_reason": last.finish_reason,
                          "usage": {"prompt_tokens": last.prompt_tokens,
                                    "completion_tokens": last.completion_tokens}},
                         ensure_ascii=False))
    else:
        print()
    return 0


def _chat(args: argparse.Namespace) -> int:
    from mixtral import chat
    from mixtral.completion import stream
    from mixtral.tokenizer import default_tokenizer

    model = _load(args)
    tokenizer = default_tokenizer()
    messages = _system(args)
    interactive = sys.stdin.isatty()
    if interactive:
        print("Chat with Mixtral. /reset starts over, /exit quits.", file=sys.stderr)
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        if line.strip() in ("/exit", "/quit"):
            break
        if line.strip() == "/reset":
            messages = _system(args)
            print("[conversation reset]", file=sys.stderr)
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        try:
            prompt = chat.encode(messages, args.safe_prompt, tokenizer)
            room = model.args.max_seq_len - len(prompt)  # answer within what is left
            params = replace(_params(args), max_tokens=min(args.max_tokens, max(room, 1)))
            reply = []
            for delta in stream(model, tokenizer, prompt, params):
                reply.append(delta.text)
                print(delta.text, end="", flush=True)
            print()
            if reply_text := "".join(reply):  # an empty turn is invalid; the user turns merge
                messages.append({"role": "assistant", "content": reply_text})
        except KeyboardInterrupt:  # stop this answer, keep the conversation
            print("\n[interrupted]", file=sys.stderr)
            messages.pop()
        except ValueError as e:  # e.g. the conversation no longer fits the context
            print(f"[error: {e}; /reset to start over]", file=sys.stderr)
            messages.pop()
    return 0


def _serve(args: argparse.Namespace) -> int:
    import os

    from mixtral.server.app import Settings, json_constraints, serve

    if args.model is None:
        from mixtral.default_model import DESCRIPTION as description
        from mixtral.default_model import NAME as name
    else:
        path = Path(args.model)
        name = (path if path.is_dir() else path.parent).resolve().name
        description = "Mixtral 8x7B"
    settings = Settings(name=name, api_key=args.api_key or os.environ.get("MIXTRAL_API_KEY"),
                        max_queue=args.max_queue, description=description,
                        max_batch=args.max_batch, max_seq_len=args.max_seq_len or 8192)
    url = f"http://{args.host}:{args.port}"
    if os.environ.get("RANK", "0") == "0":
        print(f"[mixtral] serving {name}: web chat at {url}/ , API at {url}/v1"
              + (" (bearer key required)" if settings.api_key else ""), file=sys.stderr)
    if args.tp > 1 or args.ep > 1:  # under torchrun: rank 0 serves, the others follow it
        import signal

        from mixtral import parallel

        model = _load(args)
        if parallel.dist.get_rank() != 0:
            for sig in (signal.SIGINT, signal.SIGTERM):  # rank 0 drains, then releases us
                signal.signal(sig, signal.SIG_IGN)
            parallel.follow(model, settings.max_batch, settings.max_seq_len or 8192)
            return 0
        leader = parallel.Leader(model, settings.max_batch)
        try:  # the engine runs the leader as it would the model: same calls, same results
            return serve(lambda: leader, settings, args.host, args.port, args.grace,
                         json_constraints())
        finally:
            leader.stop()
    return serve(lambda: _load(args), settings, args.host, args.port, args.grace,
                 json_constraints())


# --- inspecting and converting -------------------------------------------------------------------

def _info(args: argparse.Namespace) -> int:
    from mixtral.config import PRESETS, kv_cache_bytes_per_token, param_counts, weight_bytes

    if args.system:
        from mixtral.fast import describe_paths

        system = describe_paths()
        print(json.dumps(system, indent=2) if args.json else
              "\n".join(f"{k:<13} {v}" for k, v in system.items()))
        if args.target is None:
            return 0
    if args.target is None:
        raise ValueError("name a preset (mixtral-8x7b, bench, tiny) or a checkpoint path, or "
                         "pass --system")
    report: dict[str, Any] = {"target": args.target}
    if args.target in PRESETS and not Path(args.target).exists():
        margs = PRESETS[args.target]
        report["source"] = "preset"
    else:
        from mixtral.checkpoint import inspect
        from mixtral.formats import dtype_name

        ckpt = inspect(args.target)
        margs = ckpt.args
        report["source"] = "checkpoint"
        report["checkpoint"] = {
            "layout": ckpt.layout.name, "layout_description": ckpt.layout.description,
            "dtype": dtype_name(ckpt.dtype), "config": str(ckpt.config_file),
            "files": [str(f) for f in ckpt.weight_files], "tensors": len(ckpt.entries),
            "bytes": ckpt.nbytes, "quantization": ckpt.quantization}
    counts = param_counts(margs)
    kv = kv_cache_bytes_per_token(margs)
    report.update({
        "args": margs.to_dict(),
        "params": {"total": counts["total"], "active": counts["active"]},
        "weight_bytes": {"bf16": weight_bytes(margs, 16), "int8": weight_bytes(margs, 8),
                         "int4": weight_bytes(margs, 4)},
        "kv_cache_bytes": {"per_token_bf16": kv, "full_context_bf16": kv * margs.max_seq_len},
    })
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    a = margs
    print(f"{args.target} ({report['source']})")
    print(f"  architecture  dim {a.dim}, {a.n_layers} layers, {a.n_heads} heads / {a.n_kv_heads} "
          f"kv heads x {a.head_dim}, {a.num_experts} experts (top-{a.num_experts_per_tok}) of "
          f"hidden {a.hidden_dim}, vocab {a.vocab_size}")
    print(f"                rope_theta {a.rope_theta:g}, norm_eps {a.norm_eps:g}, context "
          f"{a.max_seq_len}, sliding window {a.sliding_window or 'none'}")
    print(f"  parameters    {_count(counts['total'])} total / {_count(counts['active'])} active "
          f"per token ({counts['total']:,} / {counts['active']:,})")
    wb = report["weight_bytes"]
    print(f"  weights       bf16 {_bytes(wb['bf16'])} | int8 {_bytes(wb['int8'])} | "
          f"int4 {_bytes(wb['int4'])} (int8/int4: matmul weights quantized, per-row / "
          f"group-128 scales; embeddings, norms, router bf16)")
    print(f"  KV cache      {_bytes(kv)} per token (bf16), {_bytes(kv * a.max_seq_len)} per "
          f"{a.max_seq_len}-token sequence")
    if "checkpoint" in report:
        c = report["checkpoint"]
        quant = f", {c['quantization']['bits']}-bit weights" if c["quantization"] else ""
        print(f"  checkpoint    layout {c['layout']} ({c['layout_description']}){quant}")
        print(f"                dtype {c['dtype']}, {c['tensors']} tensors, {_bytes(c['bytes'])} "
              f"in {len(c['files'])} file(s); config {Path(c['config']).name}")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from mixtral.checkpoint import convert

    files = convert(args.src, args.dst, args.to, args.dtype, _parse_size(args.shard_size))
    for f in files:
        print(f)
    return 0


def _bench(args: argparse.Namespace) -> int:
    import torch

    from mixtral import bench
    from mixtral.assemble import assemble, is_preset

    float_dtype = torch.float32 if args.quant == "fp32" else torch.bfloat16
    plan = None
    if args.tp > 1 or args.ep > 1:  # every rank runs the same benchmark on its shard
        from mixtral import parallel

        if args.quant in ("int8", "int4") or args.max_ram:
            raise parallel.ParallelError("--tp/--ep benchmark float weights (fp32, bf16): "
                                         "drop --quant int8/int4 and --max-ram")
        plan, args.device = parallel.join(args.tp, args.ep, args.device)
    bits = int(args.quant[3:]) if args.quant in ("int8", "int4") else None
    offloaded = args.max_ram and not is_preset(args.model)  # experts keep the file's dtype
    model = assemble(args.model, dtype=None if offloaded else float_dtype,
                     device=args.device, max_ram=args.max_ram, quantize=bits, plan=plan,
                     fast=not args.reference, presets=True)
    result = bench.run(model, prompt_len=args.prompt_len, gen_len=args.gen_len,
                       batch=args.batch, repeats=args.repeats, quant=args.quant,
                       model_name=args.model)
    if plan is not None:
        result["parallel"] = {"tp": plan.tp, "ep": plan.ep, "world": plan.world}
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>24}  {value}")
    return 0


def _train(args: argparse.Namespace) -> int:
    import yaml

    from mixtral.train.run import TrainConfig, TrainingError, train

    try:
        recipe = yaml.safe_load(Path(args.config).read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{args.config}: not valid YAML ({e})") from None
    if not isinstance(recipe, dict):
        raise ValueError(f"{args.config}: expected a mapping of settings")
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r}: write KEY=VALUE")
        recipe[key] = yaml.safe_load(value)
    recipe["stage"] = args.stage
    try:
        final = train(TrainConfig.from_dict(recipe, args.config))
    except TrainingError as e:  # a diverged run, a refused checkpoint: one line, status 2
        raise ValueError(str(e)) from None
    print(final)
    return 0


# --- evaluation ----------------------------------------------------------------------------------

def _eval_start(args: argparse.Namespace) -> tuple[Transformer, str, Path, float]:
    import os
    import time

    from mixtral.default_model import NAME

    model = _load(args)
    if (args.tp > 1 or args.ep > 1) and os.environ.get("RANK", "0") != "0":
        import atexit
        import shutil
        import tempfile

        args.out = tempfile.mkdtemp(prefix="mixtral-eval-follower-")  # rank 0 writes the results
        atexit.register(shutil.rmtree, args.out, True)
    label = args.model or f"default ({NAME})"
    return model, label, Path(args.out), time.perf_counter()


def _eval_finish(args: argparse.Namespace, label: str, t0: float, result: dict[str, Any],
                 files: list[Path], summary: dict[str, Any]) -> int:
    import time

    from mixtral.eval.report import append_run

    settings = {k: v for k, v in vars(args).items() if k not in ("run", "command", "model")
                and not callable(v)}
    seconds = time.perf_counter() - t0
    result["seconds"] = round(seconds, 2)
    append_run(Path(args.out) / "runs.jsonl", f"eval {args.eval_command}", label, settings,
               summary, seconds, files)
    print(json.dumps({"model": label, **summary, "seconds": round(seconds, 1),
                      "outputs": [str(f) for f in files]}, ensure_ascii=False))
    return 0


def _progress(total: int, desc: str) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="item", file=sys.stderr, dynamic_ncols=True)


def _eval_passkey(args: argparse.Namespace) -> int:
    from mixtral.eval import figures, passkey
    from mixtral.eval.report import write_json
    from mixtral.tokenizer import default_tokenizer

    model, label, out, t0 = _eval_start(args)
    context = model.args.max_seq_len - passkey.ANSWER_TOKENS
    if args.lengths:
        lengths = passkey.parse_lengths(args.lengths)
    else:
        lengths = [n for n in (256 * 2**i for i in range(20)) if n < context] + [context]
    trials = min(args.trials, args.limit) if args.limit else args.trials
    with _progress(len(lengths) * args.depths * trials, "passkey") as bar:
        result = passkey.run(model, default_tokenizer(), lengths, args.depths, trials,
                             args.seed, args.chat, args.chunk, bar.update)
    result["model"] = label
    files = [out / "passkey.json", out / "passkey.png"]
    figures.passkey_heatmap(result, files[1], f"passkey retrieval: {label}")
    write_json(files[0], result)
    return _eval_finish(args, label, t0, result, files,
                        {"overall": result["overall"], "overall_exact": result["overall_exact"],
                         "lengths": lengths, "trials": trials})


def _eval_perplexity(args: argparse.Namespace) -> int:
    from mixtral.eval import figures, perplexity
    from mixtral.eval.passkey import parse_lengths
    from mixtral.eval.report import write_json
    from mixtral.tokenizer import default_tokenizer

    documents = perplexity.read_documents(args.data)  # bad data fails before the model loads
    model, label, out, t0 = _eval_start(args)
    max_len = args.max_len or min(model.args.max_seq_len, 32768)
    lengths = parse_lengths(args.lengths) if args.lengths else perplexity.ladder(max_len)
    docs = perplexity.select(default_tokenizer(), documents, max(lengths), args.limit)
    with _progress(len(docs), "perplexity") as bar:
        rows = perplexity.curve(model, docs, lengths, args.chunk, bar.update)
    ok = perplexity.monotone(rows, args.tolerance)
    result = {"model": label, "data": args.data, "documents": [n for n, _ in docs],
              "lengths": lengths, "curve": rows, "tolerance": args.tolerance,
              "monotone_decreasing": ok}
    files = [out / "perplexity.json", out / "perplexity.png"]
    figures.perplexity_curve(rows, files[1], f"perplexity vs context: {label}")
    write_json(files[0], result)
    return _eval_finish(args, label, t0, result, files, {
        "documents": len(docs), "monotone_decreasing": ok,
        "perplexity": {str(r["length"]): round(r["perplexity"], 3) for r in rows}})


def _eval_routing(args: argparse.Namespace) -> int:
    from mixtral.eval import figures, routing
    from mixtral.eval.report import write_json, write_text
    from mixtral.tokenizer import default_tokenizer

    data = routing.domains(args.data)
    if args.limit:
        data = {name: docs[:args.limit] for name, docs in data.items()}
    model, label, out, t0 = _eval_start(args)
    tokenizer = default_tokenizer()
    max_len = args.max_len or min(model.args.max_seq_len, 4096)
    with _progress(len(data), "routing") as bar:
        result = routing.run(model, tokenizer, data, max_len, args.max_tokens, args.chunk,
                             bar.update)
    result["model"] = label
    files = [out / "routing.json", out / "routing.md", out / "routing.png",
             out / "routing_repetition.png"]
    write_json(files[0], result)
    write_text(files[1], routing.table(result))
    figures.routing_bars(result, files[2], f"expert shares: {label}")
    figures.repetition(result, files[3], f"consecutive-token repetition: {label}")
    if args.html:
        files.append(out / "routing.html")
        write_text(files[-1], routing.html_view(model, tokenizer,
                                                Path(args.html).read_text(encoding="utf-8"),
                                                args.chunk))
    print(routing.table(result), file=sys.stderr)
    layers = result["table_layers"]
    return _eval_finish(args, label, t0, result, files, {
        "domains": list(result["domains"]), "table_layers": layers,
        "repeat_first": {n: [round(d["repeat_first"][i], 4) for i in layers]
                         for n, d in result["domains"].items()},
        "repeat_either": {n: [round(d["repeat_either"][i], 4) for i in layers]
                          for n, d in result["domains"].items()}})


def _eval_lm(args: argparse.Namespace) -> int:
    import time

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
    return _eval_finish(args, label, t0, result, files, {"results": result.get("results", {})})


def _lora(args: argparse.Namespace) -> int:
    from mixtral.assemble import assemble
    from mixtral.checkpoint import save

    model = assemble(args.base, lora=args.adapter, fast=False)  # as stored, adapter merged
    for f in save({k: v.detach() for k, v in model.state_dict().items()}, model.args, args.dst):
        print(f)
    return 0


def _quantize(args: argparse.Namespace) -> int:
    from mixtral.checkpoint import quantize_checkpoint

    if args.layout != "portable":
        raise ValueError("--layout cpu64 is no longer written: it was PyTorch's AVX-512 packing, "
                         "which other CPUs read as garbage; files now hold one layout on every "
                         "machine and each CPU packs it at load (old cpu64 files still load)")
    for f in quantize_checkpoint(args.src, args.dst, args.bits, args.group_size,
                                 _parse_size(args.shard_size)):
        print(f)
    return 0


def _count(n: int) -> str:
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def _parse_size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30,
             "B": 1}
    t = text.strip().upper()
    for unit in sorted(units, key=len, reverse=True):
        if t.endswith(unit) and t[: -len(unit)].strip().replace(".", "", 1).isdigit():
            return int(float(t[: -len(unit)]) * units[unit])
    if t.isdigit():
        return int(t)
    raise ValueError(f"--shard-size {text!r}: use a size like 5GB, 500MB or 2GiB")
