"""`mixtral bench --json`: the stable keys external checks read (no timing asserts)."""

from __future__ import annotations

import json

import pytest

from mixtral.bench import weight_bytes_per_token
from mixtral.cli import main
from mixtral.config import preset

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
