"""Checkpoint fuzzing: truncated and bit-flipped safetensors headers and bodies, lying header
fields, pickles with payloads in every file type we load. Each must load (a flipped weight is
still a weight) or be refused with a CheckpointError naming what is wrong; never another
exception, never a tensor bigger than the file, never a payload run. Through the CLI: status 2
and one line. Configs that lie are in test_hostile_configs.py."""

from __future__ import annotations

import pickle
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hostile import attempt, checkpoint, cli_refuses, header_of, write_header
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mixtral.checkpoint import CheckpointError

FUZZ = settings(deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))
CASES: dict[str, int] = {}  # fuzz cases run, by test; printed at the end (pytest -s)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    yield checkpoint(tmp_path_factory.mktemp("ckpt"))
    print(f"\nhostile files: {CASES} ({sum(CASES.values())} fuzz cases)")


def mutate(ckpt: Path, work: Path, data: bytes, name: str) -> Path:
    """A copy of the checkpoint whose model.safetensors holds `data`."""
    work.mkdir(exist_ok=True)
    shutil.copyfile(ckpt / "config.json", work / "config.json")
    (work / "model.safetensors").write_bytes(data)
    CASES[name] = CASES.get(name, 0) + 1
    return work


# --- mutations of the bytes -----------------------------------------------------------------------

@FUZZ
@given(data=st.data())
def test_truncated_anywhere_is_refused(ckpt, tmp_path, data):
    raw = (ckpt / "model.safetensors").read_bytes()
    cut = data.draw(st.integers(0, len(raw) - 1))
    path = mutate(ckpt, tmp_path / "w", raw[:cut], "truncated")
    assert attempt(path) != "loaded"


@FUZZ
@given(data=st.data())
def test_bit_flips_in_the_header(ckpt, tmp_path, data):
    raw = bytearray((ckpt / "model.safetensors").read_bytes())
    n = header_of(ckpt / "model.safetensors")[0]
    for _ in range(data.draw(st.integers(1, 3))):
        raw[data.draw(st.integers(0, 8 + n - 1))] ^= 1 << data.draw(st.integers(0, 7))
    attempt(mutate(ckpt, tmp_path / "w", bytes(raw), "header bit flips"))


@settings(FUZZ, max_examples=25)
@given(data=st.data())
def test_bit_flips_in_the_body_still_load(ckpt, tmp_path, data):
    raw = bytearray((ckpt / "model.safetensors").read_bytes())
    n = header_of(ckpt / "model.safetensors")[0]
    raw[data.draw(st.integers(8 + n, len(raw) - 1))] ^= 1 << data.draw(st.integers(0, 7))
    assert attempt(mutate(ckpt, tmp_path / "w", bytes(raw), "body bit flips")) == "loaded"


@settings(FUZZ, max_examples=50)
@given(length=st.integers(0, 2**64 - 1))
def test_any_header_length(ckpt, tmp_path, length):
    raw = (ckpt / "model.safetensors").read_bytes()
    if length != header_of(ckpt / "model.safetensors")[0]:
        path = mutate(ckpt, tmp_path / "w", struct.pack("<Q", length) + raw[8:], "length field")
        assert attempt(path) != "loaded"


JUNK = st.one_of(st.integers(-2**70, 2**70), st.floats(), st.booleans(), st.none(),
                 st.text(max_size=8), st.lists(st.integers(-2**40, 2**40), max_size=4),
                 st.sampled_from(["F32", "BF16", "F16", "I8", "U8", "F8_E4M3", "bf16"]),
                 st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


@settings(FUZZ, max_examples=150)
@given(data=st.data())
def test_lying_header_fields(ckpt, tmp_path, data):
    """A header rewritten with one field of one tensor replaced (the length kept right)."""
    _, header, body = header_of(ckpt / "model.safetensors")
    names = sorted(k for k in header if k != "__metadata__")
    meta = header[data.draw(st.sampled_from(names))]
    field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
    meta[field] = data.draw(JUNK)
    attempt(mutate(ckpt, tmp_path / "w", write_header(header, body), "header fields"))


# --- named reasons ------------------------------------------------------------------------------

def _swap_offsets(header: dict) -> None:  # two tensors of one size trade places: still valid
    a, b = (header[k] for k in sorted(header) if k.endswith("input_layernorm.weight"))
    a["data_offsets"], b["data_offsets"] = b["data_offsets"], a["data_offsets"]


def _overlap(header: dict) -> None:
    a, b = (header[k] for k in sorted(header) if k.endswith("input_layernorm.weight"))
    b["data_offsets"] = a["data_offsets"]


def _set(name: str, field: str, value: object):
    def change(header: dict) -> None:
        header[name][field] = value
    return change


NORM = "model.norm.weight"  # bf16 [64]: 128 bytes


@pytest.mark.parametrize("change,reason", [
    (_overlap, "overlaps the tensor before it"),
    (_set(NORM, "dtype", "F32"), "needs 256 bytes"),
    (_set(NORM, "dtype", "F99"), "has dtype 'F99'"),
    (_set(NORM, "shape", [-8, -16]), r"has shape \[-8, -16\]; a shape is a list of non-negative"),
    (_set(NORM, "shape", [True, 128]), "has shape"),
    (_set(NORM, "shape", [64.0]), "has shape"),
    (_set(NORM, "data_offsets", [10, 2]), "expected \\[begin, end\\] with 0 <= begin <= end"),
    (_set(NORM, "data_offsets", [2**62, 2**62 + 128]), "the file is truncated"),
    (_set(NORM, "shape", [2**40, 2**40]), "needs"),
    (lambda h: h.update({"x" * 10**6: h.pop(NORM)}), r"x{59}\.\.\. \(1000002 characters\)"),
])
def test_lying_header_is_refused_by_name(ckpt, tmp_path, change, reason):
    _, header, body = header_of(ckpt / "model.safetensors")
    change(header)
    with pytest.raises(CheckpointError, match=reason) as e:
        attempt(mutate(ckpt, tmp_path / "w", write_header(header, body), "named"), strict=True)
    assert len(str(e.value)) < 1000


def test_reordered_tensors_still_load(ckpt, tmp_path):
    _, header, body = header_of(ckpt / "model.safetensors")
    _swap_offsets(header)
    assert attempt(mutate(ckpt, tmp_path / "w", write_header(header, body), "named")) == "loaded"


def _framed(header: bytes) -> bytes:
    return struct.pack("<Q", len(header)) + header


@pytest.mark.parametrize("data,reason", [
    (lambda raw, n: raw[:8 + n] + raw[8 + n + 1:], "the file is truncated"),
    (lambda raw, n: raw + b"\0" * 16, "trailing bytes"),
    (lambda raw, n: struct.pack("<Q", 2**64 - 1) + raw[8:], "header claims 18446744073709551615"),
    (lambda raw, n: _framed(b"[" * 100_000 + b"]" * 100_000), "JSON nested too deeply"),
    (lambda raw, n: _framed(b'{"a":' * 40_000 + b"1" + b"}" * 40_000), "JSON nested too deeply"),
    (lambda raw, n: _framed(b"\xff\xfe{}"), "not UTF-8"),
])
def test_broken_files_are_refused_by_name(ckpt, tmp_path, data, reason):
    raw = (ckpt / "model.safetensors").read_bytes()
    path = mutate(ckpt, tmp_path / "w", data(raw, header_of(ckpt / "model.safetensors")[0]),
                  "named")
    with pytest.raises(CheckpointError, match=reason):
        attempt(path, strict=True)


def test_deep_header_through_the_cli_is_status_2(ckpt, tmp_path):
    """The reported case: a RecursionError traceback and status 1 before."""
    raw = struct.pack("<Q", 200_000) + b"[" * 100_000 + b"]" * 100_000
    path = mutate(ckpt, tmp_path / "w", raw, "named")
    out = subprocess.run([sys.executable, "-m", "mixtral", "info", str(path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.count("\n") == 1 and "nested too deeply" in out.stderr
    assert "Traceback" not in out.stderr


# --- pickles ------------------------------------------------------------------------------------

class Payload:
    """Unpickling this creates the marker file: if it exists, the payload ran."""

    marker: Path

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _torch_pickle(state: dict, path: Path, legacy: bool = False) -> None:
    torch.save(state, path, _use_new_zipfile_serialization=not legacy)


@pytest.mark.parametrize("name,writer", [
    ("consolidated.00.pth", lambda obj, p: _torch_pickle(obj, p)),
    ("consolidated.00.pth", lambda obj, p: _torch_pickle(obj, p, legacy=True)),
    ("consolidated.00.pt", lambda obj, p: _torch_pickle(obj, p)),
    ("consolidated.00.pth", lambda obj, p: p.write_bytes(pickle.dumps(obj))),
    ("model.safetensors", lambda obj, p: p.write_bytes(pickle.dumps(obj))),
    ("consolidated.safetensors", lambda obj, p: p.write_bytes(pickle.dumps(obj))),
    ("config.json", lambda obj, p: p.write_bytes(pickle.dumps(obj))),
    ("params.json", lambda obj, p: p.write_bytes(pickle.dumps(obj))),
    ("model.safetensors.index.json", lambda obj, p: p.write_bytes(pickle.dumps(obj))),
])
def test_pickle_payloads_never_run(ckpt, tmp_path, name, writer):
    marker = tmp_path / "payload-ran"
    Payload.marker = marker
    folder = tmp_path / "m"
    folder.mkdir()
    mistral = name.startswith("consolidated") or name == "params.json"
    config = "params.json" if mistral else "config.json"
    if name != config:  # an HF-named params.json is read like config.json
        shutil.copyfile(ckpt / "config.json", folder / config)
    if name.endswith(".json"):  # the payload is in a JSON file: weights beside it
        weights = "consolidated.safetensors" if mistral else "model.safetensors"
        shutil.copyfile(ckpt / "model.safetensors", folder / weights)
    state = {"tok_embeddings.weight": torch.zeros(2), "payload": Payload()}
    writer(state, folder / name)
    CASES["pickles"] = CASES.get("pickles", 0) + 1
    with pytest.raises(CheckpointError):
        attempt(folder, strict=True)
    cli_refuses(["info", str(folder)])
    assert not marker.exists(), f"the payload in {name} ran"
