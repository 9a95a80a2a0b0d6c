"""How a command runs: parse, check the device, run, and the one top-level error handler.

`mixtral <command>` (cli.py) and `python -m mixtral.<module>` both come here, so bad input
ends the same way wherever it is typed: one line on stderr, `<prog> <command>: error: ...`,
exit status 2, never a traceback. Each command module holds its commands as a mapping from
name to a function that adds the command's flags to its parser and sets `run` to the function
that runs it.

Every parser is a `Parser`: --help shows each option's default, and a flag typed wrong is
answered in one line like any other bad input (the usage is a --help away). The flag types
below (`positive`, `natural`, ...) say in that line what a number must be.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Mapping
from typing import Any, NoReturn

from mixtral import __version__

# adds a command's flags to its parser, and `run` (the function that runs it) to its defaults
Arguments = Callable[[argparse.ArgumentParser], None]


class HelpFormatter(argparse.HelpFormatter):
    """Each option's help ends with its default, unless it has none or the help names it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        help, default = action.help or "", action.default
        if (not action.option_strings or default is None or default is False or default == []
                or default is argparse.SUPPRESS or "default" in help):
            return help
        return f"{help} (default: %(default)s)".lstrip()


class Parser(argparse.ArgumentParser):
    """argparse as every command uses it (its subcommands' parsers are Parsers too)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self.set_defaults(parser_prog=self.prog)  # the innermost parser's wins: error lines

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def add_version(self) -> None:
        self.add_argument("--version", action="version", version=f"mixtral {__version__}",
                          help="print the version and exit")


def positive(text: str) -> int:
    """A whole number above 0 (a count: tokens, sequences, repeats)."""
    return _checked(text, int, lambda v: v > 0, "a whole number above 0")


def natural(text: str) -> int:
    """A whole number, 0 or more."""
    return _checked(text, int, lambda v: v >= 0, "a whole number, 0 or more")


def nonnegative(text: str) -> float:
    """A number, 0 or more (a temperature)."""
    return _checked(text, float, lambda v: v >= 0, "a number, 0 or more")


def probability(text: str) -> float:
    """A number above 0, at most 1 (top-p)."""
    return _checked(text, float, lambda v: 0 < v <= 1, "a number above 0, at most 1")


def _checked(text: str, kind: Callable[[str], Any], ok: Callable[[Any], bool],
             wanted: str) -> Any:
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not ok(value) or value != value:  # value != value: nan
        raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}")
    return value


def run(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> int:
    """Parse `argv` with `parser` (subcommands under dest "command") and run what it names."""
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides"):  # train: KEY=VALUE overrides may follow --config
        args.overrides += extra
    elif extra:  # named by the command they were given to, as argparse's own errors are
        prog = args.parser_prog
        parser.exit(2, f"{prog}: error: unrecognized arguments: {' '.join(extra)} "
                       f"(see {prog} --help)\n")
    try:
        check_device(getattr(args, "device", "cpu"))
        code: int = args.run(args)
        if getattr(args, "tp", 1) > 1 or getattr(args, "ep", 1) > 1:
            from mixtral.parallel import finish

            finish()  # every rank leaves together: none tears the group down under another
        return code
    except (ValueError, KeyError, OSError) as e:  # CheckpointError, ChatError too
        print(f"{args.parser_prog}: error: {_message(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: the user knows why it stopped; no traceback
        print(file=sys.stderr)
        return 130


def _message(e: Exception) -> str:
    """One line about `e`: a missing file by its name, not by errno."""
    if isinstance(e, KeyError) and e.args:
        return str(e.args[0])
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        return f"{e.filename}: {e.strerror[:1].lower()}{e.strerror[1:]}"
    return str(e)


def standalone(prog: str, commands: Mapping[str, Arguments],
               argv: list[str] | None = None) -> int:
    """`python -m mixtral.<module>`: the module's commands, as `mixtral` would run them (a
    module with one command takes its flags directly)."""
    parser = Parser(prog=prog)
    parser.add_version()
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
