"""Data flows one way: tokenizer/chat -> engine -> model -> sampling; nothing imports the CLI.
Checked by reading every module's imports (including lazy ones inside functions)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).parent.parent / "mixtral"

# module -> the package modules it may import
ALLOWED: dict[str, set[str]] = {
    "config": set(),
    "cache": {"config"},
    "model": {"config", "cache"},
    "sampling": set(),
    "generate": {"model", "cache", "sampling"},
    "formats": {"config", "quant"},
    "checkfile": set(),
    "crosscheck": {"checkfile", "config", "formats"},
    "memory": {"checkfile"},
    "checkpoint": {"checkfile", "config", "crosscheck", "formats", "memory", "model", "quant"},
    "default_model": {"checkpoint", "config", "model"},
    "assemble": {"checkpoint", "config", "default_model", "fast", "formats", "lora", "model",
                 "offload", "parallel", "quant"},
    "tokenizer": set(),
    "chat": {"tokenizer"},
    "completion": {"generate", "model", "tokenizer"},
    "engine": {"cache", "generate", "model", "sampling"},
    "quant.__init__": {"model", "quant"},
    "quant.base": set(),
    "quant.int8": {"quant"},
    "quant.int4": {"quant"},
    "cpu": set(),
    "kernels": {"cpu"},
    "fast": {"cache", "cpu", "kernels", "model", "quant"},
    "parallel": {"cache", "checkpoint", "config", "formats", "model"},
    "offload": {"checkpoint", "formats", "memory", "model", "quant"},
    "bench": {"assemble", "cache", "command", "config", "engine", "generate", "model",
              "parallel"},
    "grammar": {"tokenizer"},
    "server.protocol": set(),
    "server.app": {"chat", "completion", "engine", "generate", "grammar", "model",
                   "server", "tokenizer"},
    "server.__init__": set(),
    "train.__init__": set(),
    "train.losses": set(),
    "train.data": {"chat", "tokenizer"},
    "lora": {"model"},
    "train.run": {"checkpoint", "config", "lora", "model", "quant", "tokenizer", "train"},
    "eval.__init__": set(),
    "eval.forward": {"cache", "model"},
    "eval.passkey": {"chat", "eval", "model", "tokenizer"},
    "eval.perplexity": {"eval", "model", "tokenizer"},
    "eval.routing": {"cache", "eval", "model", "tokenizer"},
    "eval.report": set(),
    "eval.figures": set(),
    "eval.harness": {"assemble", "chat", "completion", "engine", "generate", "model",
                     "tokenizer"},
    "eval.tasks.__init__": set(),
    "eval.tasks.offline_data": set(),
    "__init__": {"assemble", "cpu", "model"},
    "__main__": {"cli"},
    "command": {"parallel"},
    "terminal": {"assemble", "chat", "command", "completion", "generate", "tokenizer"},
    "files": {"assemble", "checkpoint", "command", "config", "fast", "formats"},
    "server.launch": {"assemble", "command", "config", "default_model", "parallel", "server"},
    "train.recipe": {"command", "train"},
    "eval.commands": {"assemble", "command", "default_model", "eval", "model", "tokenizer"},
    "cli": {"command"},  # and, by name, the module of the command being run

}
# third-party imports that would break a layer's purity
FORBIDDEN_EXTERNAL = {
    "model": {"os", "json", "pathlib", "safetensors", "mistral_common", "sentencepiece"},
    "config": {"torch"},
    "tokenizer": {"torch"},
}


def imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            if node.module == "mixtral":  # from mixtral import chat
                names.update(f"mixtral.{a.name}" for a in node.names)
    return names


def module(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE).with_suffix("").parts)


def test_every_module_has_a_rule():
    modules = {module(p) for p in PACKAGE.rglob("*.py")}
    assert modules == set(ALLOWED), "add the new module to ALLOWED with its permitted imports"


def test_imports_follow_the_data_flow():
    for path in PACKAGE.rglob("*.py"):
        name = module(path)
        found = imports(path)
        ours = {n.split(".")[1] for n in found if n.startswith("mixtral.")}
        assert ours <= ALLOWED[name], f"{name} imports {ours - ALLOWED[name]}"
        external = {n.split(".")[0] for n in found}
        bad = external & FORBIDDEN_EXTERNAL.get(name, set())
        assert not bad, f"{name} must not import {bad}"


def test_the_engine_knows_no_text_and_nothing_imports_the_cli():
    for path in PACKAGE.rglob("*.py"):
        found = imports(path)
        if module(path) not in ("cli", "__main__"):
            assert "mixtral.cli" not in found, path.name
        if module(path) in ("engine", "generate", "model", "sampling", "cache"):
            assert not found & {"mixtral.tokenizer", "mixtral.chat", "mixtral.server",
                                "mixtral.completion"}, path.name
