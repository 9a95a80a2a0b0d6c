"""`convert` and `save` stream: the same bytes as the whole-model path, one tensor in memory.

Oracles: safetensors' own `save_file` (our streamed writer must write its bytes, for every
dtype), the old whole-model conversion (every tensor read into one dict, then written), and a
memory cgroup several times smaller than the checkpoint, in which the whole-model path is
killed and the streamed one finishes.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import write_layout
from safetensors.torch import save_file

from mixtral.cgroup import remove_left
from mixtral.checkfile import ST_DTYPES
from mixtral.checkpoint import convert, inspect, read_state_dict, save, write_checkpoint
from mixtral.config import ModelArgs
from mixtral.formats import LAYOUTS, canonical_shapes, write_canonical

ROOT = Path(__file__).parent.parent


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_streamed_safetensors_are_save_files_bytes(tmp_path):
    """Every dtype safetensors and we know, names whose order by dtype and by name differ from
    the arrival order, a scalar and an empty tensor: the file is byte for byte save_file's."""
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for i, (name, dtype) in enumerate(sorted(ST_DTYPES.items(), reverse=True)):
        raw = torch.randint(0, 2 if dtype == torch.bool else 256, (3, (5 + i) * dtype.itemsize),
                            generator=g, dtype=torch.uint8)
        tensors[f"t{9 - i}.{name}"] = raw.view(dtype)  # any bytes: only bytes are compared
    tensors["layers.10.x"] = torch.randn((), generator=g)
    tensors["layers.2.x"] = torch.zeros(0, 4, dtype=torch.bfloat16)
    tensors["a"] = torch.randn(4, 6, generator=g).t()  # not contiguous: written in row order
    entries = {k: (tuple(t.shape), t.dtype) for k, t in tensors.items()}
    write_checkpoint(tmp_path / "ours", {}, entries, iter(tensors.items()))
    save_file({k: t.contiguous() for k, t in tensors.items()}, tmp_path / "theirs.safetensors",
              metadata={"format": "pt"})
    assert (tmp_path / "ours" / "model.safetensors").read_bytes() == \
        (tmp_path / "theirs.safetensors").read_bytes()


def test_streamed_writer_refuses_what_it_was_not_told(tmp_path):
    entries = {"a": ((2,), torch.float32), "b": ((3,), torch.float32)}
    wrong = iter([("a", torch.zeros(2)), ("b", torch.zeros(4))])
    with pytest.raises(RuntimeError, match=r"expected b \[3\] torch.float32, got b \[4\]"):
        write_checkpoint(tmp_path / "x", {}, entries, wrong)
    with pytest.raises(RuntimeError, match="ran out before b"):
        write_checkpoint(tmp_path / "y", {}, entries, iter([("a", torch.zeros(2))]))
    assert not list((tmp_path / "y").glob("*.safetensors*"))  # nothing half-written stays


def whole_model(src: Path, dst: Path, to: str, dtype: torch.dtype | None) -> None:
    """The conversion before it streamed: every canonical tensor in one dict, then written by
    safetensors in one file (`write_canonical` is that path's layout table)."""
    info = inspect(src)
    state = dict(read_state_dict(info, dtype))
    dst.mkdir()
    name = "consolidated.safetensors" if to == "mistral" else "model.safetensors"
    save_file(dict(write_canonical(LAYOUTS[to], info.args, state)), dst / name,
              metadata={"format": "pt"})


@pytest.mark.parametrize("source", ["hf-sharded", "hf-fused", "mistral-fused-pt", "mistral-pth"])
@pytest.mark.parametrize("to", ["hf", "mistral"])
def test_convert_writes_the_whole_model_paths_bytes(hf_tiny, tmp_path, source, to):
    """From layouts that keep experts apart and ones that fuse them, in each dtype asked:
    every weights file is the old path's, and sharded output is the full `save`'s."""
    src = write_layout(hf_tiny, source, tmp_path / "src")
    for dtype in (None, torch.bfloat16):
        tag = str(dtype)
        convert(src, tmp_path / f"ours-{tag}", to, dtype)
        whole_model(src, tmp_path / f"old-{tag}", to, dtype)
        ours, old = digests(tmp_path / f"ours-{tag}"), digests(tmp_path / f"old-{tag}")
        assert {k: v for k, v in ours.items() if k.endswith(".safetensors")} == old
        info = inspect(src)
        state = dict(read_state_dict(info, dtype))
        save(state, info.args, tmp_path / f"saved-{tag}", to)
        assert ours == digests(tmp_path / f"saved-{tag}")  # config/params too
    if to == "hf":  # shards and their index, as the full model's save writes them
        convert(src, tmp_path / "shards", to, max_shard_bytes=60_000)
        save(dict(read_state_dict(inspect(src))), inspect(src).args, tmp_path / "saved-shards",
             to, max_shard_bytes=60_000)
        assert len(digests(tmp_path / "shards")) > 3
        assert digests(tmp_path / "shards") == digests(tmp_path / "saved-shards")


def test_save_refuses_mixed_dtypes(tmp_path):
    args = ModelArgs(dim=8, n_layers=1, head_dim=4, hidden_dim=16, n_heads=2, n_kv_heads=1,
                     vocab_size=16, num_experts=2, num_experts_per_tok=1)
    state = {k: torch.zeros(s) for k, s in canonical_shapes(args).items()}
    state["norm.weight"] = state["norm.weight"].bfloat16()
    with pytest.raises(ValueError, match="one dtype, got torch.bfloat16, torch.float32"):
        save(state, args, tmp_path / "x")


# --- memory --------------------------------------------------------------------------------------

# ~200 MB of fp32 weights, each file tensor of the target layouts ~2 MB, under a 64 MB limit
BIG = dict(dim=256, n_layers=4, head_dim=32, hidden_dim=2048, n_heads=8, n_kv_heads=2,
           vocab_size=1024, num_experts=8, num_experts_per_tok=2)
BUDGET, ALLOWANCE = 48 * 2**20, 16 * 2**20

CONFINED = textwrap.dedent("""
    import json, sys
    import torch
    from mixtral.cgroup import confine
    from mixtral.checkpoint import convert, inspect, read_state_dict, save
    src, dst, to, how, budget, allowance = sys.argv[1:7]
    info = inspect(src)
    torch.empty(8 * 2**20).fill_(1)  # the allocator's first arenas, charged outside the limit
    with confine(int(budget), int(allowance)) as c:
        if not c.honest:
            print(json.dumps({"skip": c.reason}))
            sys.exit(0)
        if how == "stream":
            convert(src, dst, to)
        else:  # the whole model in memory, then written
            save(dict(read_state_dict(info)), info.args, dst, to)
        print(json.dumps(c.report()))
""")


def confined(src: Path, dst: Path, to: str, how: str) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of one conversion in its own process and cgroup."""
    proc = subprocess.Popen([sys.executable, "-c", CONFINED, str(src), str(dst), to, how,
                             str(BUDGET), str(ALLOWANCE)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)
    out, err = proc.communicate(timeout=1800)
    remove_left(proc.pid)  # an OOM kill skips confine's own clean-up
    return proc.returncode, out, err


@pytest.fixture(scope="module")
def big_hf(tmp_path_factory) -> Path:
    args = ModelArgs(**BIG)
    g = torch.Generator().manual_seed(1)
    state = {k: torch.randn(s, generator=g) for k, s in canonical_shapes(args).items()}
    folder = tmp_path_factory.mktemp("big") / "hf"
    save(state, args, folder, "hf", max_shard_bytes=40 * 2**20)
    return folder


def test_convert_runs_in_a_memory_limit_a_third_of_the_model(big_hf, tmp_path):
    """Under a memory cgroup (page cache included) of 64 MB, a 200 MB checkpoint converts both
    ways; the whole-model path, the control that shows the limit bites, is killed in it."""
    size = inspect(big_hf).nbytes
    assert size > 3 * (BUDGET + ALLOWANCE)
    status, out, err = confined(big_hf, tmp_path / "control", "mistral", "whole")
    if status == 0 and "skip" in json.loads(out.splitlines()[-1]):
        pytest.skip(f"no memory cgroup to run in: {json.loads(out.splitlines()[-1])['skip']}")
    assert status != 0, f"the whole model fitted, the limit does not bind: {out}"
    status, out, err = confined(big_hf, tmp_path / "mistral", "mistral", "stream")
    assert status == 0, err[-2000:]
    status, out, err = confined(tmp_path / "mistral", tmp_path / "hf", "hf", "stream")
    assert status == 0, err[-2000:]
    assert inspect(tmp_path / "mistral").nbytes == size
    went, came = read_state_dict(inspect(big_hf)), read_state_dict(inspect(tmp_path / "hf"))
    for (name, a), (back, b) in zip(went, came, strict=True):  # what came back is what went
        assert name == back and torch.equal(a, b), name
