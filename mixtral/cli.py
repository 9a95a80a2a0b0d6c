"""The `mixtral` command: the table of its subcommands. Each command's flags and the code that
runs it live beside what it drives (the module named in the table, also runnable on its own as
`python -m <module>`); mixtral.command parses, runs and handles errors for all of them.

Nothing imports this module. It imports only the module of the command being run, so
`mixtral info` starts fast and `mixtral --help` loads nothing.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from mixtral import command, threads

# name: (the module holding it, its one-line help), in the order `mixtral --help` lists them
COMMANDS = {
    "chat": ("mixtral.terminal", "interactive multi-turn chat, streamed (line editing, "
             "history, multi-line messages, /save and /load)"),
    "generate": ("mixtral.terminal", "complete one prompt"),
    "serve": ("mixtral.server.launch", "serve the Mistral chat API and a web chat page"),
    "train": ("mixtral.train.recipe", "pretrain, SFT or DPO from a recipe"),
    "eval": ("mixtral.eval.commands", "passkey, perplexity vs context, routing, lm-eval tasks"),
    "lora": ("mixtral.files", "LoRA adapters: merge one into its base model"),
    "bench": ("mixtral.bench", "prefill and decode speed (random weights for a preset)"),
    "info": ("mixtral.files", "sizes of a preset or checkpoint, and a checkpoint's layout; "
             "--system: this CPU and the paths it takes"),
    "quantize": ("mixtral.files", "write an int8 or int4 copy of a checkpoint that "
                 "mixtral.load reads directly"),
    "convert": ("mixtral.files", "rewrite a checkpoint in the HF or Mistral layout"),
}


DESCRIPTION = """\
Mixtral 8x7B in PyTorch: chat and generate at the terminal, serve the Mistral chat API with a
web chat page, train (pretrain, SFT, DPO, LoRA) and evaluate, measure speed, and inspect,
convert and quantize checkpoints (Hugging Face or Mistral layout). Without --model, the
commands that run a model use the built-in default: a small demo model, not an assistant.
`mixtral COMMAND --help` shows a command's options."""


def _max_ram(arg: str) -> bool:
    """Whether arg is --max-ram as argparse reads it: whole, with =VALUE, or a prefix that
    no other --max-* flag shares (--max-r, --max-ra)."""
    flag = arg.split("=", 1)[0]
    return len(flag) > len("--max-") and "--max-ram".startswith(flag)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(_max_ram(a) for a in argv):
        threads.set_policy(paging=True)  # before a command's module starts torch
    parser = command.Parser(prog="mixtral", description=DESCRIPTION,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_version()
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help) in COMMANDS.items():
        sp = sub.add_parser(name, help=help, description=help)
        if argv and argv[0] == name:  # only the command being run needs its flags
            importlib.import_module(module).COMMANDS[name](sp)
    return command.run(parser, argv)
