"""Text generation at the terminal: `mixtral chat` (an interactive conversation, streamed:
terminal_chat.py holds the conversation, terminal_input.py what is typed) and `mixtral
generate` (one prompt, printed as it comes or as JSON). Both run the model through
mixtral.completion, the text layer over the token loop.

    python -m mixtral.terminal chat [--model PATH] ...
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from mixtral import assemble
from mixtral.command import Arguments, natural, nonnegative, positive, probability, standalone

if TYPE_CHECKING:
    from mixtral.generate import GenerationParams


def chat_arguments(p: argparse.ArgumentParser) -> None:
    assemble.add_arguments(p)
    _sampling_arguments(p, max_tokens=512, at_least=positive)
    p.epilog = ('In the chat: a paste is one message; """ alone on a line starts and ends a '
                "message of several lines; Ctrl-C stops an answer; /help lists the commands "
                "(/save and /load a conversation, /reset, /exit).")
    p.set_defaults(run=run_chat)


def generate_arguments(p: argparse.ArgumentParser) -> None:
    assemble.add_arguments(p)
    _sampling_arguments(p, max_tokens=128, at_least=natural)
    p.add_argument("--prompt", required=True, help="the prompt text ('-' reads stdin)")
    p.add_argument("--chat", action="store_true", help="send the prompt as a user message in "
                   "the instruct format (default: raw text after BOS)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--json", action="store_true",
                   help="print text, finish reason, usage and the CPU tier that ran")
    p.set_defaults(run=run_generate)


COMMANDS: dict[str, Arguments] = {"chat": chat_arguments, "generate": generate_arguments}


def _sampling_arguments(p: argparse.ArgumentParser, max_tokens: int,
                        at_least: Callable[[str], int]) -> None:
    p.add_argument("--max-tokens", type=at_least, default=max_tokens,
                   help="longest answer, in tokens (less where the context runs out)")
    p.add_argument("--temperature", type=nonnegative, default=0.7,
                   help="randomness of sampling; 0 = greedy")
    p.add_argument("--top-p", type=probability, default=1.0,
                   help="sample from the likeliest tokens that together have this probability")
    p.add_argument("--seed", type=int, help="same seed and prompt -> same output "
                   "(default: a new random answer each time)")
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
        from mixtral import cpu

        c = cpu.probe()  # which paths answered: what a script comparing machines needs
        print(json.dumps({"text": "".join(parts), "finish_reason": last.finish_reason,
                          "usage": {"prompt_tokens": last.prompt_tokens,
                                    "completion_tokens": last.completion_tokens},
                          "cpu": {"tier": c.tier, "pytorch": c.aten}},
                         ensure_ascii=False))
    else:
        print()
    return 0


def run_chat(args: argparse.Namespace) -> int:
    from mixtral.parallel import is_leader
    from mixtral.terminal_chat import Chat
    from mixtral.terminal_input import MessageReader, history_path
    from mixtral.tokenizer import default_tokenizer

    model = assemble.from_args(args)
    Chat(model, default_tokenizer(), _params(args), _system(args), args.safe_prompt,
         speak=is_leader()).run(MessageReader(history_path()))
    return 0


if __name__ == "__main__":
    sys.exit(standalone("python -m mixtral.terminal", COMMANDS))
