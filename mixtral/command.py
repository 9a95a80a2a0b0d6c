"""How a command runs: parse, check the device, run, and the one top-level error handler.

`mixtral <command>` (cli.py) and `python -m mixtral.<module>` both come here, so bad input
ends the same way wherever it is typed: one line on stderr, `<prog> <command>: error: ...`,
exit status 2, never a traceback. Each command module holds its commands as a mapping from
name to a function that adds the command's flags to its parser and sets `run` to the function
that runs it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Mapping

# adds a command's flags to its parser, and `run` (the function that runs it) to its defaults
Arguments = Callable[[argparse.ArgumentParser], None]


def run(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> int:
    """Parse `argv` with `parser` (subcommands under dest "command") and run what it names."""
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides"):  # train: KEY=VALUE overrides may follow --config
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        check_device(getattr(args, "device", "cpu"))
        code: int = args.run(args)
        if getattr(args, "tp", 1) > 1 or getattr(args, "ep", 1) > 1:
            from mixtral.parallel import finish

            finish()  # every rank leaves together: none tears the group down under another
        return code
    except (ValueError, KeyError, FileNotFoundError) as e:  # CheckpointError, ChatError too
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"{parser.prog} {args.command}: error: {message}", file=sys.stderr)
        return 2


def standalone(prog: str, commands: Mapping[str, Arguments],
               argv: list[str] | None = None) -> int:
    """`python -m mixtral.<module>`: the module's commands, as `mixtral` would run them (a
    module with one command takes its flags directly)."""
    parser = argparse.ArgumentParser(prog=prog)
    if len(commands) == 1:
        [(name, arguments)] = commands.items()
        arguments(parser)
        parser.set_defaults(command=name)
    else:
        sub = parser.add_subparsers(dest="command", required=True)
        for name, arguments in commands.items():
            arguments(sub.add_parser(name))
    return run(parser, argv)


def check_device(text: str) -> None:
    """--device: one that this machine and this build of PyTorch have (ValueError, so exit 2
    with one line, otherwise); PyTorch is imported only for devices other than the CPU."""
    if text == "cpu":
        return
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        raise ValueError(f"{text!r} is not a device; write cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            build = "this PyTorch has no CUDA" if torch.version.cuda is None else "no GPU found"
            raise ValueError(f"{text}: {build}; use --device cpu")
        if device.index is not None and device.index >= count:
            raise ValueError(f"{text}: there are {count} GPU(s), cuda:0 to cuda:{count - 1}")
    elif device.type != "cpu" and device.type != "mps":
        raise ValueError(f"{text}: mixtral runs on cpu or cuda")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{text}: no MPS device here; use --device cpu")
