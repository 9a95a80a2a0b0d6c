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
    "formats": {"config"},
    "checkpoint": {"config", "formats", "model"},
    "default_model": {"config", "model"},
    "tokenizer": set(),
    "chat": {"tokenizer"},
    "completion": {"generate", "model", "tokenizer"},
    "__init__": {"checkpoint", "model"},
    "__main__": {"cli"},
    "cli": {"chat", "checkpoint", "completion", "config", "default_model", "formats", "model",
            "tokenizer"},
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


def test_every_module_has_a_rule():
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    assert modules == set(ALLOWED), "add the new module to ALLOWED with its permitted imports"


def test_imports_follow_the_data_flow():
    for path in PACKAGE.glob("*.py"):
        found = imports(path)
        ours = {n.split(".")[1] for n in found if n.startswith("mixtral.")}
        assert ours <= ALLOWED[path.stem], f"{path.name} imports {ours - ALLOWED[path.stem]}"
        external = {n.split(".")[0] for n in found}
        bad = external & FORBIDDEN_EXTERNAL.get(path.stem, set())
        assert not bad, f"{path.name} must not import {bad}"


def test_nothing_imports_the_cli():
    for path in PACKAGE.glob("*.py"):
        if path.stem not in ("cli", "__main__"):
            assert "mixtral.cli" not in imports(path), path.name
