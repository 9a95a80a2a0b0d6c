"""Every `mixtral` command, walked with bad input: each answer is exit status 2 and one line
`mixtral <command>: error: ...` naming what was wrong, never a traceback; and every option of
every command says in --help what it is.

The walk runs in this process (`mixtral.cli.main`, as the console script calls it), except
where a command starts a server; a few real processes check the console script's own path.
A case marked xfail is a defect known in code that another change owns: its reason names it,
and strict=True makes the case fail once the defect is gone, so that the mark goes too.
"""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from mixtral import __version__, command
from mixtral.cli import COMMANDS, main
from mixtral.command import Parser

BIN = Path(sys.executable).parent / "mixtral"
RECIPE = Path(__file__).parent.parent / "recipes" / "default" / "sft.yaml"


@pytest.fixture(scope="module")
def paths(tmp_path_factory, hf_tiny_dir) -> dict[str, str]:
    root = tmp_path_factory.mktemp("cli_errors")
    (root / "notes").mkdir()
    (root / "notes" / "readme.txt").write_text("not a checkpoint\n")
    (root / "fake.gguf").write_text("not a GGUF file\n")
    (root / "pictures").mkdir()
    (root / "pictures" / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff")
    return {"gguf": str(root / "fake.gguf"), "missing": str(root / "missing"),
            "notckpt": str(root / "notes"),
            "text": str(root / "notes" / "readme.txt"), "ckpt": str(hf_tiny_dir),
            "out": str(root / "out"), "recipe": str(RECIPE), "binary": str(root / "pictures")}


def defect(reason: str) -> pytest.MarkDecorator:
    return pytest.mark.xfail(strict=True, reason=reason)


# (argv with {placeholders} from `paths`, what the error line must say)
CASES = [
    (["--bogus"], "required: COMMAND"),
    (["nosuch"], "invalid choice: 'nosuch'"),
    (["info", "{missing}"], "{missing}: no such file or directory"),
    (["info", "{notckpt}"], "{notckpt}: no weights found"),
    (["info", "{text}"], "not a weights file we read (.safetensors, .pth, .pt, or a GGUF file)"),
    (["info", "{gguf}"], "not a GGUF file: it does not start with GGUF's magic bytes"),
    (["chat", "--model", "nobody/no-such-model"], "nobody/no-such-model: no such file or "
     "directory, and not in the Hugging Face cache"),
    (["info", "--bogus"], "mixtral info: error: unrecognized arguments: --bogus"),
    (["generate"], "the following arguments are required: --prompt"),
    (["generate", "--prompt", "x", "--model", "{missing}"], "no such file or directory"),
    (["generate", "--prompt", "x", "--model", "{notckpt}"], "no weights found"),
    (["generate", "--prompt", "x", "--max-tokens", "-3"],
     "--max-tokens: expected a whole number, 0 or more, got '-3'"),
    (["generate", "--prompt", "x", "--max-tokens", "abc"], "got 'abc'"),
    (["generate", "--prompt", "x", "--temperature", "-1"], "--temperature: expected a number"),
    (["generate", "--prompt", "x", "--top-p", "2"], "--top-p: expected a number above 0"),
    (["generate", "--prompt", "x", "--dtype", "int3"], "unknown dtype 'int3'"),
    (["generate", "--prompt", "x", "--device", "tpu"], "'tpu' is not a device"),
    (["generate", "--prompt", "x", "--lora", "{missing}"], "no such file or directory"),
    (["chat", "--model", "{notckpt}"], "no weights found"),
    (["chat", "--max-tokens", "0"], "--max-tokens: expected a whole number above 0, got '0'"),
    (["chat", "--seed", "abc"], "--seed: invalid int value: 'abc'"),
    (["serve", "--port", "abc"], "--port: expected a TCP port, 0 to 65535, got 'abc'"),
    (["serve", "--max-batch", "x"], "--max-batch: invalid int value: 'x'"),
    (["serve", "--port", "-1"], "--port: expected a TCP port, 0 to 65535, got '-1'"),
    (["serve", "--port", "70000"], "--port: expected a TCP port, 0 to 65535, got '70000'"),
    (["bench", "--model", "{missing}"], "no such file or directory"),
    (["bench", "--quant", "int3"], "--quant: invalid choice: 'int3'"),
    (["bench", "--prompt-len", "-3"], "--prompt-len: expected a whole number above 0"),
    (["bench", "--gen-len", "abc"], "--gen-len: expected a whole number above 0, got 'abc'"),
    (["convert", "{missing}", "{out}", "--to", "hf"], "no such file or directory"),
    (["convert", "{notckpt}", "{out}", "--to", "hf"], "no weights found"),
    (["convert", "{ckpt}", "{out}", "--to", "gguf"], "--to: invalid choice: 'gguf'"),
    (["convert", "{ckpt}", "{out}", "--to", "hf", "--shard-size", "lots"], "'lots'"),
    (["convert", "{ckpt}", "{ckpt}", "--to", "hf"], "already holds a checkpoint"),
    (["quantize", "{missing}", "{out}", "--bits", "4"], "no such file or directory"),
    (["quantize", "{notckpt}", "{out}", "--bits", "8"], "no weights found"),
    (["quantize", "{ckpt}", "{out}", "--bits", "3"], "--bits: invalid choice: 3"),
    (["quantize", "{ckpt}", "{out}", "--bits", "abc"], "--bits: invalid int value: 'abc'"),
    (["quantize", "{ckpt}", "{out}", "--bits", "4", "--group-size", "-3"],
     "group size must be one of"),
    (["lora", "split", "{ckpt}", "{missing}", "{out}"], "invalid choice: 'split'"),
    (["lora", "merge", "{missing}", "{missing}", "{out}"], "no such file or directory"),
    (["lora", "merge", "{notckpt}", "{notckpt}", "{out}"], "no weights found"),
    (["train", "finetune", "--config", "{recipe}"], "invalid choice: 'finetune'"),
    (["train", "sft", "--config", "{missing}"], "{missing}: no such file or directory"),
    (["train", "sft", "--config", "{text}"], "expected a mapping of settings"),
    (["train", "sft", "--config", "{recipe}", "steps=abc"], "steps: expected an integer"),
    (["train", "sft", "--config", "{recipe}", "nosuch=1"], "unknown setting 'nosuch'"),
    (["train", "sft", "--config", "{recipe}", "init={missing}", "out={out}"],
     "{missing}: no such file or directory"),
    (["eval"], "required: eval_command"),
    (["eval", "bogus"], "invalid choice: 'bogus'"),
    (["eval", "passkey", "--trials", "abc"], "mixtral eval passkey: error: argument --trials"),
    (["eval", "passkey", "--model", "{missing}", "--out", "{out}"], "no such file or directory"),
    (["eval", "passkey", "--lengths", "zz", "--out", "{out}"], "bad length 'zz'"),
    (["eval", "passkey", "--trials", "-3", "--out", "{out}"], "--trials"),
    (["eval", "perplexity", "--data", "{missing}", "--out", "{out}"], "no such file or folder"),
    (["eval", "routing", "--data", "{missing}", "--out", "{out}"], "no such file or folder"),
    (["eval", "passkey", "--chat", "--plain"], "--plain: not allowed with argument --chat"),
    (["eval", "routing", "--data", "{binary}", "--out", "{out}"], "logo.png: not UTF-8 text"),
    (["eval", "perplexity", "--data", "{binary}", "--out", "{out}"], "logo.png: not UTF-8 text"),
    (["eval", "routing", "--data", "{notckpt}", "--html", "{missing}", "--out", "{out}"],
     "{missing}: no such file or directory"),  # before the model loads and the study runs
    (["eval", "lm", "--tasks", "x", "--batch-size", "abc"],
     "--batch-size: expected a whole number above 0"),
]


@pytest.mark.parametrize("argv, wanted", CASES, ids=lambda c: " ".join(c) if isinstance(
    c, list) else None)
def test_bad_input_is_one_line_and_status_2(argv, wanted, paths, capsys):
    argv = [a.format(**paths) for a in argv]
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's errors
        code = e.code
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert code == 2, err[-2000:]
    assert "Traceback" not in err
    command = f"mixtral {argv[0]}" if argv[0] in COMMANDS else "mixtral:"
    assert len(errors) == 1 and errors[0].startswith(command), err
    assert wanted.format(**paths) in errors[0]


def run(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN), *argv], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def test_version_and_the_console_scripts_errors():
    done = run("--version")
    assert (done.returncode, done.stdout) == (0, f"mixtral {__version__}\n")
    done = run("generate", "--prompt", "x", "--max-tokens", "abc")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr == ("mixtral generate: error: argument --max-tokens: expected a whole "
                           "number, 0 or more, got 'abc' (see mixtral generate --help)\n")


@pytest.mark.slow
@pytest.mark.parametrize("port", ["0"])
def test_serve_a_missing_model(port, paths):
    done = run("serve", "--model", paths["missing"], "--port", port)
    errors = [line for line in done.stderr.splitlines() if ": error: " in line]
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert len(errors) == 1 and "no such file or directory" in errors[0]
    assert "serving" not in done.stderr and "INFO" not in done.stderr  # before the port opens


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["--help"])
    out = capsys.readouterr().out
    assert exit.value.code == 0
    for name in COMMANDS:
        assert f"\n    {name} " in out
    assert "--version" in out


def parsers(name: str) -> list[argparse.ArgumentParser]:
    """The parser of command `name` and those of its subcommands (eval passkey, ...)."""
    parser = Parser(prog=f"mixtral {name}")
    importlib.import_module(COMMANDS[name][0]).COMMANDS[name](parser)
    found, i = [parser], 0
    while i < len(found):
        for action in found[i]._actions:
            if isinstance(action, argparse._SubParsersAction):
                found.extend(action.choices.values())
        i += 1
    return found


NO_HELP: dict[str, str] = {}  # a command: the options without help (a known defect)


@pytest.mark.parametrize("name", [pytest.param(n, marks=defect(NO_HELP[n])) if n in NO_HELP
                                  else n for n in COMMANDS])
def test_every_option_has_help(name):
    bare = [f"{p.prog} {'/'.join(a.option_strings) or a.dest}" for p in parsers(name)
            for a in p._actions if not a.help and not isinstance(a, argparse._SubParsersAction)]
    assert not bare, f"no help for: {', '.join(bare)}"


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["chat", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: 512)" in out and "(default: 0.7)" in out and "(default: 1)" in out
    assert "(default: None)" not in out and "(default: False)" not in out


def test_ctrl_c_ends_a_command_quietly(capsys):
    """Ctrl-C while a command runs (loading a model, converting): status 130, no traceback."""
    def interrupted(args: argparse.Namespace) -> int:
        raise KeyboardInterrupt

    parser = Parser(prog="mixtral")
    parser.set_defaults(run=interrupted, command="convert")
    assert command.run(parser, []) == 130
    assert "Traceback" not in capsys.readouterr().err
