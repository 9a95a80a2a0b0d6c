"""Helpers for the hostile-file tests: a small checkpoint written by our own `save`, safetensors
headers taken apart and put back, and loading under guards that catch an allocation sized by
a lie in the file (a tensor bigger than the files, or Python objects by the gigabyte)."""

from __future__ import annotations

import contextlib
import io
import json
import struct
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import torch

import mixtral
from mixtral.checkpoint import CheckpointError, save
from mixtral.config import ModelArgs, preset
from mixtral.model import Transformer

ARGS: ModelArgs = preset("tiny").with_(vocab_size=320, n_layers=2, num_experts=4)
PYTHON_BOUND = 64 * 2**20  # Python allocations while refusing a file: headers are kilobytes


def checkpoint(folder: Path, args: ModelArgs = ARGS, layout: str = "hf") -> Path:
    """A random bf16 checkpoint (config.json + model.safetensors, or the Mistral layout)."""
    with torch.device("meta"):
        model = Transformer(args)
    model.to_empty(device="cpu")
    model.init_weights(generator=torch.Generator().manual_seed(0))
    state = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    save(state, args, folder, layout)
    return folder


def header_of(path: Path) -> tuple[int, dict, bytes]:
    """-> (header length, header, the tensors' bytes) of a safetensors file."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return n, json.loads(raw[8:8 + n]), raw[8 + n:]


def write_header(header: dict, body: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + body


@contextlib.contextmanager
def allocation_guard(limit: int) -> Iterator[dict[str, int]]:
    """Record the biggest tensor torch.empty makes and the Python heap's peak; fail if either
    exceeds what the files could justify."""
    seen = {"tensor": 0}
    empty = torch.empty

    def recording_empty(*args: object, **kwargs: object) -> torch.Tensor:
        t = empty(*args, **kwargs)  # type: ignore[call-overload]
        if t.device.type != "meta":
            seen["tensor"] = max(seen["tensor"], t.numel() * t.element_size())
        return t

    torch.empty = recording_empty  # type: ignore[assignment]
    tracemalloc.start()
    try:
        yield seen
    finally:
        seen["python"] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        torch.empty = empty
    assert seen["tensor"] <= limit, f"a {seen['tensor']}-byte tensor from {limit} bytes of files"
    assert seen["python"] <= PYTHON_BOUND + 4 * limit, f"{seen['python']} bytes of Python objects"


def attempt(path: Path, strict: bool = False) -> str:
    """Load `path` under the guards: 'loaded', or the refusal's message (one line, short);
    with `strict` the refusal is raised. Any other exception fails the test."""
    files = [path] if path.is_file() else list(path.iterdir())
    with allocation_guard(sum(f.stat().st_size for f in files)):
        try:
            mixtral.load(path)
        except CheckpointError as e:
            message = str(e)
            assert "\n" not in message and len(message) < 1000, message[:2000]
            if strict:
                raise
            return message
    return "loaded"


def cli_refuses(argv: list[str]) -> str:
    """Run the CLI in this process: it must answer status 2 with one line, no traceback."""
    from mixtral.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(argv)
    lines = err.getvalue().strip().splitlines()
    assert code == 2, err.getvalue()[-2000:]
    assert len(lines) == 1 and lines[0].startswith(f"mixtral {argv[0]}: error: "), lines[:3]
    return lines[0]
