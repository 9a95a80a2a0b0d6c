"""mixtral.atomic: a write either lands whole or leaves the old file, and leaves no debris."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from mixtral.atomic import atomic_write, atomic_write_text


def test_replaces_the_file_and_leaves_nothing_beside_it(tmp_path):
    target = tmp_path / "result.json"
    target.write_text("old")
    atomic_write_text(target, "new é\n")
    assert target.read_text(encoding="utf-8") == "new é\n"
    assert os.listdir(tmp_path) == ["result.json"]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "model.safetensors"
    target.write_text("old")

    def half(tmp: Path) -> None:
        tmp.write_text("half of a fi")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, half)
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["model.safetensors"]


def test_the_writer_sees_the_suffix_and_the_file_gets_the_usual_mode(tmp_path):
    seen = []
    atomic_write(tmp_path / "loss.png", lambda tmp: (seen.append(tmp), tmp.write_bytes(b"x")))
    assert seen[0].suffix == ".png" and seen[0].parent == tmp_path
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "loss.png").stat().st_mode) == 0o666 & ~umask


def test_a_writer_that_replaces_the_file_does_not_change_its_mode(tmp_path):
    """safetensors writes its own temporary file (mode 0600) and renames it over ours."""
    import torch
    from safetensors.torch import save_file

    atomic_write(tmp_path / "model.safetensors", lambda tmp: save_file({"x": torch.ones(2)}, tmp))
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "model.safetensors").stat().st_mode) == 0o666 & ~umask
