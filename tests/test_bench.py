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
        "decode_tok_s", "ttft_s", "peak_rss_gib", "weight_bytes_per_token", "repeats"}


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
