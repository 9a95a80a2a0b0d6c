"""The layout's rules, checked on every module's imports (lazy ones inside functions too).

Each rule is an arrow that must never exist, stated as the design intends it rather than as a
list of today's edges: a new module needs no entry here, and a wrong new arrow fails."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parent.parent / "mixtral"
COMMANDS = ("terminal", "files", "server.launch", "train.recipe", "eval.commands")


def module(path: Path) -> str:
    """mixtral/server/app.py -> "server.app"; a package's __init__ -> its name."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


MODULES = {module(p): p for p in PACKAGE.rglob("*.py")}


def imports(path: Path) -> tuple[set[str], set[str]]:
    """(package modules, other top-level packages) that `path` imports anywhere in it."""
    ours, others = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            if name == "mixtral" or name.startswith("mixtral."):
                inner = name.removeprefix("mixtral").removeprefix(".")
                if inner in MODULES:  # `from mixtral.x import y`: y only where it is a module
                    ours.add(inner)
            else:
                others.add(name.split(".")[0])
    return ours, others


GRAPH = {name: imports(path) for name, path in MODULES.items()}


def within(*roots: str) -> Callable[[str], bool]:
    return lambda m: any(m == r or m.startswith(r + ".") for r in roots)


def anything(m: str) -> bool:
    return True


# (the rule, the modules it binds, the modules they must never import)
NEVER: list[tuple[str, Callable[[str], bool], Callable[[str], bool]]] = [
    ("the model is the spec: no I/O, sampling, quantization or parallelism, only its config "
     "and cache", within("model"), lambda m: m not in ("config", "cache")),
    ("the loaders read files into models and apply no swaps",
     within("checkpoint", "formats", "default_model"),
     within("fast", "projections", "lora", "offload", "expert_store", "parallel",
            "assemble")),
    ("the engine and the token loop deal in ids, never in text",
     within("engine", "reuse", "prefix_cache", "generate", "prefill", "sampling", "cache",
            "model"),
     within("tokenizer", "chat", "completion", "grammar", "server")),
    ("nothing imports the CLI (`python -m mixtral` runs it)",
     lambda m: m != "__main__", within("cli")),
    ("commands are leaves: only the CLI reaches them, by name",
     anything, within(*COMMANDS)),
    ("evaluation and training never import the server", within("eval", "train"),
     within("server")),
    ("serving never imports training (LoRA is an inference swap: mixtral.lora)",
     within("server", "engine", "reuse", "prefill", "completion", "generate", "assemble", "lora",
            "parallel"),
     within("train")),
    ("the swaps and loaders never reach up to commands, serving, evaluation or training",
     within("model", "config", "cache", "checkpoint", "formats", "quant", "fast",
            "projections", "lora", "offload", "expert_store", "parallel", "kernels", "cpu"),
     within("command", "server", "eval", "train", "bench", "assemble", "terminal", "files")),
    ("the shared helpers (atomic writes, sizes) are leaves that any layer may use",
     within("atomic", "sizes"), anything),
]
# third-party imports that would break a layer's purity
FORBIDDEN_EXTERNAL = {
    "model": {"os", "json", "pathlib", "safetensors", "mistral_common", "sentencepiece"},
    "config": {"torch"},
    "tokenizer": {"torch"},
    "sizes": {"torch"},  # the command line parses sizes before it loads PyTorch
}


@pytest.mark.parametrize("rule, binds, forbidden", NEVER, ids=[r[0][:40] for r in NEVER])
def test_no_forbidden_arrow(rule, binds, forbidden):
    wrong = sorted(f"{name} -> {target}" for name, (ours, _) in GRAPH.items() if binds(name)
                   for target in ours if target != name and forbidden(target))
    assert not wrong, f"{rule}: {wrong}"


def test_layers_keep_their_third_party_imports_out():
    for name, banned in FORBIDDEN_EXTERNAL.items():
        bad = GRAPH[name][1] & banned
        assert not bad, f"{name} must not import {bad}"


def test_the_rules_see_the_package():  # a rule that binds nothing proves nothing
    for rule, binds, _ in NEVER:
        assert any(binds(name) for name in MODULES), rule
    assert {"model", "engine", "cli", "assemble", *COMMANDS} <= set(MODULES)


def test_the_command_line_starts_without_torch():
    """`mixtral info` and `mixtral --help` start fast: the CLI, the runner and every command
    module import PyTorch only inside the functions that need it."""
    names = ", ".join(f"mixtral.{m}" for m in ("cli", "command", "assemble", *COMMANDS))
    code = f"import sys, {names}; sys.exit('torch' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": str(PACKAGE.parent)}
    assert subprocess.run([sys.executable, "-c", code], env=env).returncode == 0
