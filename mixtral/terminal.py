"""Text generation at the terminal: `mixtral chat` (an interactive conversation, streamed) and
`mixtral generate` (one prompt, printed as it comes or as JSON). Both run the model through
mixtral.completion, the text layer over the token loop.

    python -m mixtral.terminal chat [--model PATH] ...
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from mixtral import assemble
from mixtral.command import Arguments, standalone

if TYPE_CHECKING:
    from mixtral.generate import GenerationParams


def chat_arguments(p: argparse.ArgumentParser) -> None:
    assemble.add_arguments(p)
    _sampling_arguments(p, max_tokens=512)
    p.set_defaults(run=run_chat)


def generate_arguments(p: argparse.ArgumentParser) -> None:
    assemble.add_arguments(p)
    _sampling_arguments(p, max_tokens=128)
    p.add_argument("--prompt", required=True, help="the prompt text ('-' reads stdin)")
    p.add_argument("--chat", action="store_true", help="send the prompt as a user message in "
                   "the instruct format (default: raw text after BOS)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--json", action="store_true", help="print text, finish reason and usage")
    p.set_defaults(run=run_generate)


COMMANDS: dict[str, Arguments] = {"chat": chat_arguments, "generate": generate_arguments}


def _sampling_arguments(p: argparse.ArgumentParser, max_tokens: int) -> None:
    p.add_argument("--max-tokens", type=int, default=max_tokens)
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, help="same seed and prompt -> same output")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--safe-prompt", action="store_true",
                   help="prepend Mistral's guardrail system prompt")


def _params(args: argparse.Namespace) -> GenerationParams:
    from mixtral.generate import GenerationParams

    return GenerationParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            top_p=args.top_p, seed=args.seed)


def _system(args: argparse.Namespace) -> list[dict[str, Any]]:
    return [{"role": "system", "content": args.system}] if args.system else []


def run_generate(args: argparse.Namespace) -> int:
    from mixtral import chat
    from mixtral.completion import stream
    from mixtral.parallel import is_leader
    from mixtral.tokenizer import default_tokenizer

    prompt_text = sys.stdin.read() if args.prompt == "-" else args.prompt
    tokenizer = default_tokenizer()
    if args.chat or args.system or args.safe_prompt:
        messages = [*_system(args), {"role": "user", "content": prompt_text}]
        prompt = chat.encode(messages, args.safe_prompt, tokenizer)
    else:
        prompt = tokenizer.encode(prompt_text, bos=True)
    model = assemble.from_args(args)
    speak = is_leader()  # under --tp/--ep every rank decodes the same tokens; rank 0 prints
    parts, last = [], None
    for last in stream(model, tokenizer, prompt, _params(args), tuple(args.stop)):
        parts.append(last.text)
        if speak and not args.json:
            print(last.text, end="", flush=True)
    assert last is not None
    if not speak:
        return 0
    if args.json:
        print(json.dumps({"text": "".join(parts), "finish_reason": last.finish_reason,
                          "usage": {"prompt_tokens": last.prompt_tokens,
                                    "completion_tokens": last.completion_tokens}},
                         ensure_ascii=False))
    else:
        print()
    return 0


def run_chat(args: argparse.Namespace) -> int:
    from mixtral import chat
    from mixtral.completion import stream
    from mixtral.parallel import is_leader
    from mixtral.tokenizer import default_tokenizer

    model = assemble.from_args(args)
    speak = is_leader()  # under --tp/--ep rank 0 prints; a follower's errors still show
    tokenizer = default_tokenizer()
    messages = _system(args)
    interactive = sys.stdin.isatty()
    if interactive and speak:
        print("Chat with Mixtral. /reset starts over, /exit quits.", file=sys.stderr)
    while True:
        try:
            line = input("> " if interactive and speak else "")
        except EOFError:
            break
        if line.strip() in ("/exit", "/quit"):
            break
        if line.strip() == "/reset":
            messages = _system(args)
            if speak:
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
                if speak:
                    print(delta.text, end="", flush=True)
            if speak:
                print()
            if reply_text := "".join(reply):  # an empty turn is invalid; the user turns merge
                messages.append({"role": "assistant", "content": reply_text})
        except KeyboardInterrupt:  # stop this answer, keep the conversation
            if speak:
                print("\n[interrupted]", file=sys.stderr)
            messages.pop()
        except ValueError as e:  # e.g. the conversation no longer fits the context
            print(f"[error: {e}; /reset to start over]", file=sys.stderr)
            messages.pop()
    return 0


if __name__ == "__main__":
    sys.exit(standalone("python -m mixtral.terminal", COMMANDS))
