"""`mixtral bench --json`: the stable keys external checks read (no timing asserts), and its
progress bar: on a terminal only, never beside --json."""

from __future__ import annotations

import io
import json
import sys

import pytest

from mixtral.bench import run, weight_bytes_per_token
from mixtral.cli import main
from mixtral.config import preset
from mixtral.default_model import random_tiny

KEYS = {"model", "quant", "device", "threads", "batch", "prompt_len", "gen_len", "prefill_tok_s",
        "decode_tok_s", "ttft_s", "peak_rss_gib", "weight_bytes_per_token", "repeats",
        "decode_disk_read_bytes_per_token", "decode_expert_hit_rate",
        "decode_prefetch_precision", "memory_limit", "cache_policy", "prefetch"}


@pytest.mark.parametrize("quant,batch", [("bf16", 1), ("int8", 2), ("int4", 1), ("fp32", 2)])
def test_bench_json(capsys, quant, batch):
    assert main(["bench", "--model", "tiny", "--quant", quant, "--prompt-len", "24",
                 "--gen-len", "5", "--batch", str(batch), "--repeats", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == KEYS
    assert (result["quant"], result["batch"], result["prompt_len"], result["gen_len"]) == \
        (quant, batch, 24, 5)
    for key in ("prefill_tok_s", "decode_tok_s", "ttft_s", "peak_rss_gib"):
        assert result[key] > 0
    assert result["decode_disk_read_bytes_per_token"] >= 0  # /proc/self/io on Linux
    assert result["decode_expert_hit_rate"] is None is result["decode_prefetch_precision"]
    assert result["memory_limit"] is None  # nothing offloaded: nothing confined
    assert result["cache_policy"] is None is result["prefetch"]


@pytest.fixture(scope="module")
def int4_checkpoint(tmp_path_factory):
    import torch

    from mixtral.checkpoint import quantize_checkpoint, save
    from mixtral.config import ModelArgs
    from mixtral.model import Transformer

    args = ModelArgs(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32, hidden_dim=256,
                     vocab_size=32000, max_seq_len=256)
    d = tmp_path_factory.mktemp("bench-offload")
    model = Transformer(args)
    model.init_weights(std=0.05, generator=torch.Generator().manual_seed(0))
    save(model.to(torch.bfloat16).state_dict(), args, d / "float")
    quantize_checkpoint(d / "float", d / "q4", 4)
    return d / "q4"


@pytest.mark.parametrize("policy,prefetch", [("lfu", "--prefetch"), ("lru", "--no-prefetch")])
def test_offloaded_bench_reports_its_cache_and_its_confinement(int4_checkpoint, capsys,
                                                                monkeypatch, tmp_path, policy,
                                                                prefetch):
    """No cgroup hierarchy (mocked): the run goes on, says on stderr and in memory_limit that
    its figures are not honest; the expert cache's hit rate is over the decode tokens, and
    its policy and read-ahead are the ones asked for (the predictor's precision with it)."""
    from mixtral import cgroup

    monkeypatch.setattr(cgroup, "V1_ROOT", tmp_path / "no-v1")
    monkeypatch.setattr(cgroup, "V2_ROOT", tmp_path / "no-v2")
    assert main(["bench", "--model", str(int4_checkpoint), "--quant", "int4", "--max-ram",
                 "1.1GiB", "--prompt-len", "12", "--gen-len", "6", "--repeats", "1",
                 "--cache-policy", policy, prefetch, "--json"]) == 0
    out, err = capsys.readouterr()
    result = json.loads(out)
    assert set(result) == KEYS | {"offload"}
    assert 0 <= result["decode_expert_hit_rate"] <= 1
    assert (result["cache_policy"], result["prefetch"]) == (policy, prefetch == "--prefetch")
    if result["prefetch"]:
        assert 0 <= result["decode_prefetch_precision"] <= 1
    else:
        assert result["decode_prefetch_precision"] is None
    limit = result["memory_limit"]
    assert limit["honest"] is False and "no memory cgroup hierarchy" in limit["reason"]
    assert limit["limit_bytes"] == int(1.1 * 2**30) + 512 * 2**20
    assert "not confined to --max-ram, so its disk figures are not honest" in err


def test_bytes_per_token_match_the_anchor_count():
    # shared/reference/anchors-cpu.md: 229,984,256 weights read per decode token on "bench"
    assert weight_bytes_per_token(preset("bench"), "fp32") == 229_984_256 * 4
    assert weight_bytes_per_token(preset("bench"), "bf16") == 229_984_256 * 2


class Terminal(io.StringIO):
    """stderr as a terminal: where progress bars are drawn."""

    def isatty(self) -> bool:
        return True


def test_progress_counts_every_measured_token():
    seen: list[int] = []
    run(random_tiny(), prompt_len=12, gen_len=3, batch=2, repeats=2, progress=seen.append)
    assert sum(seen) == 2 * (12 + 2 * 3)  # the warm-up is not counted


def test_the_bar_shows_on_a_terminal_but_never_beside_json(capsys, monkeypatch):
    argv = ["bench", "--model", "tiny", "--prompt-len", "8", "--gen-len", "2", "--repeats", "1"]
    for extra, shown in (([], True), (["--json"], False)):
        terminal = Terminal()
        monkeypatch.setattr(sys, "stderr", terminal)
        assert main([*argv, *extra]) == 0
        assert ("bench: 100%" in terminal.getvalue()) == shown, terminal.getvalue()
        assert "10/10" in terminal.getvalue() or not shown  # 8 prompt + 2 generated tokens
    monkeypatch.undo()
    assert main(argv) == 0  # stderr not a terminal: no bar
    assert "bench:" not in capsys.readouterr().err


def test_offloaded_bench_runs_inside_a_real_cgroup_where_it_can(int4_checkpoint, capsys):
    import os

    from mixtral.cgroup import V1_ROOT

    if not os.access(V1_ROOT / "memory.limit_in_bytes", os.W_OK):
        pytest.skip("needs root and a cgroup v1 memory hierarchy")
    assert main(["bench", "--model", str(int4_checkpoint), "--quant", "int4", "--max-ram",
                 "1.1GiB", "--prompt-len", "12", "--gen-len", "6", "--repeats", "1",
                 "--json"]) == 0
    out, err = capsys.readouterr()
    limit = json.loads(out)["memory_limit"]
    assert (limit["honest"], limit["cgroup"], limit["reason"]) == (True, "v1", None)
    assert 0 < limit["peak_bytes"] <= limit["limit_bytes"] and "not honest" not in err
    assert not list(V1_ROOT.glob(f"mixtral-bench-{os.getpid()}"))  # left and removed
