"""Every Python block of README.md runs as written, so the README cannot drift from the API:
the client examples against a live server (the tiny random default, JSON mode on) at the
address they name, the library example with the shipped default model standing in for the
checkpoint folder it loads."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from serving import LiveServer

from mixtral.default_model import HAS_SHIPPED, SHIPPED

README = Path(__file__).parent.parent / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(), re.S | re.M)
ADDRESS = "http://127.0.0.1:8000"  # where the README's examples expect `mixtral serve`


@pytest.fixture(scope="module")
def server():
    from mixtral.server.app import json_constraints

    s = LiveServer(json_constraint=json_constraints())
    yield s
    s.stop()


def test_the_readme_has_python_examples():
    assert len(BLOCKS) >= 2


def _param(i: int, code: str) -> object:  # the client examples stream to the context's end
    marks = [pytest.mark.slow] if ADDRESS in code else []
    return pytest.param(code, id=f"block{i + 1}", marks=marks)


@pytest.mark.parametrize("code", [_param(i, code) for i, code in enumerate(BLOCKS)])
def test_readme_python_block_runs(code, request, tmp_path, monkeypatch):
    folders = set(re.findall(r"mixtral\.load\(\"([^\"]+)\"", code))
    if folders and not HAS_SHIPPED:
        pytest.skip("no shipped default model in this build to stand in for a checkpoint")
    for folder in folders:  # the checkpoint folder the example loads
        (tmp_path / folder.rstrip("/")).symlink_to(SHIPPED, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    if ADDRESS in code:  # the server only for the examples that talk to one
        code = code.replace(ADDRESS, request.getfixturevalue("server").url)
    exec(compile(code, str(README), "exec"), {})
