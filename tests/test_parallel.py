"""Tensor and expert parallelism (mixtral.parallel): 2 CPU processes on gloo, launched by
torchrun, against one process. Stated bound: fp32 logits agree to 2e-5 x max|logit| (the
all-reduce adds partial sums in another order); greedy tokens are identical."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import hf_mixtral, write_layout
from serving import wait_healthy

import mixtral
from mixtral.config import ModelArgs
from mixtral.generate import GenerationParams, generate
from mixtral.parallel import ParallelError, Plan

WORKER = Path(__file__).with_name("parallel_worker.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MIXTRAL_DIST_TIMEOUT": "20"}
BOUND = 2e-5

pytestmark = pytest.mark.slow  # most tests launch ranks under torchrun


def torchrun(*argv: str, n: int = 2, timeout: float = 180,
             logs: Path | None = None) -> subprocess.CompletedProcess:
    """logs: each rank's stdout and stderr go to its own files there (see `rank_output`)."""
    apart = ["--redirects", "3", "--log-dir", str(logs)] if logs else []
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node",
                           str(n), *apart, *argv], capture_output=True, text=True, env=ENV,
                          timeout=timeout)


def rank_output(logs: Path, rank: int) -> tuple[str, str]:
    """(stdout, stderr) of one rank of a `torchrun(..., logs=...)` launch."""
    [folder] = logs.glob(f"*/attempt_0/{rank}")
    return (folder / "stdout.log").read_text(), (folder / "stderr.log").read_text()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("parallel")
    gqa = hf_mixtral(seed=1)  # 4 query heads, 2 kv heads, 8 experts, F 96
    mqa = hf_mixtral(seed=2, num_key_value_heads=1)  # fewer kv heads than ranks
    return {"hf": write_layout(gqa, "hf", root / "hf"),
            "hf-fused": write_layout(gqa, "hf-fused", root / "hf-fused"),
            "mistral-fused-pt": write_layout(mqa, "mistral-fused-pt", root / "mqa"),
            "cli": write_layout(hf_mixtral(seed=3, vocab_size=32000), "hf", root / "cli")}


def single(ckpt: Path) -> tuple[torch.Tensor, list[int]]:
    model = mixtral.load(ckpt, torch.float32)
    tokens = torch.randint(3, model.args.vocab_size, (2, 9),
                           generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(tokens)
        greedy = list(generate(model, tokens[0].tolist(),
                               GenerationParams(max_tokens=12, stop_ids=())))
    return logits, greedy


@pytest.mark.parametrize("layout,tp,ep,fast", [
    ("hf", 2, 1, False),  # heads and each expert's hidden dim split
    ("hf", 1, 2, True),  # experts split by owner, per-expert tensors read selectively
    ("hf-fused", 2, 2, True),  # both; fused expert banks read whole, then cut
    ("mistral-fused-pt", 2, 1, True),  # one kv head, copied to both ranks
])
def test_two_processes_equal_one(checkpoints, tmp_path, layout, tp, ep, fast):
    ckpt = checkpoints[layout]
    out = tmp_path / "rank0.pt"
    argv = [str(WORKER), str(ckpt), str(out), "--tp", str(tp), "--ep", str(ep)]
    result = torchrun(*argv, *(["--fast"] if fast else []))
    assert result.returncode == 0, result.stderr[-3000:]
    got = torch.load(out)
    logits, greedy = single(ckpt)
    assert got["every"][0] == got["every"][1]  # both ranks decoded the same tokens
    assert got["greedy"] == greedy
    err = (got["logits"] - logits).abs().max().item()
    assert err <= BOUND * logits.abs().max().item(), err
    whole = sum(t.numel() for t in mixtral.load(ckpt).state_dict().values())
    assert got["params"] < 0.75 * whole  # a shard, not a copy of the model
    ref = mixtral.load(ckpt).args
    kv = max(1, ref.n_kv_heads // tp)
    assert got["heads"] == (ref.n_heads // tp, kv)  # the caller's cache is sized per rank


def test_cli_generate_under_torchrun_matches_one_process(checkpoints, capsys):
    from mixtral.cli import main

    ckpt = str(checkpoints["cli"])
    argv = ["generate", "--model", ckpt, "--prompt", "one two three", "--temperature", "0",
            "--max-tokens", "10", "--json"]
    assert main(argv) == 0
    alone = json.loads(capsys.readouterr().out)
    result = torchrun("-m", "mixtral", *argv, "--tp", "2", "--ep", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert lines == [alone]  # rank 0 printed it once; rank 1 stayed silent


@pytest.mark.parametrize("plan", [["--tp", "2"], ["--ep", "2"], ["--tp", "2", "--ep", "2"]])
def test_default_model_under_torchrun(capsys, plan):
    from mixtral.cli import main

    argv = ["generate", "--prompt", "Hello", "--temperature", "0", "--max-tokens", "8", "--json",
            "--dtype", "fp32"]  # the stated bound is for fp32; bf16 partial sums round apart
    assert main(argv) == 0
    alone = json.loads(capsys.readouterr().out)
    result = torchrun("-m", "mixtral", *argv, *plan)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == alone


@pytest.mark.parametrize("fail", ["exit", "hang"])
def test_a_rank_that_dies_or_hangs_ends_every_process(checkpoints, tmp_path, fail):
    t0 = time.monotonic()
    result = torchrun(str(WORKER), str(checkpoints["hf"]), str(tmp_path / "x.pt"), "--tp", "2",
                      "--fail-rank", "1", "--fail", fail, timeout=120)
    assert result.returncode != 0
    assert time.monotonic() - t0 < 90  # bounded by MIXTRAL_DIST_TIMEOUT (20 s), not a hang
    assert not (tmp_path / "x.pt").exists()


def test_plans_that_cannot_work_are_clear_errors():
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=96,
                     num_experts=8, vocab_size=320)
    with pytest.raises(ParallelError, match="--tp 3 does not divide the 4 attention heads"):
        Plan(tp=3).check(args)
    with pytest.raises(ParallelError, match="--ep 3 does not divide the 8 experts"):
        Plan(ep=3).check(args)
    with pytest.raises(ParallelError, match="must be equal"):
        Plan(tp=2, ep=4).check(args)
    with pytest.raises(ParallelError, match="hidden dimension 98"):
        Plan(tp=4, rank=0).check(ModelArgs(**{**vars(args), "n_kv_heads": 4, "hidden_dim": 98}))
    Plan(tp=2, ep=2).check(args)  # fits


def test_parallel_flags_outside_torchrun_and_bad_launches(checkpoints, capsys, monkeypatch):
    from mixtral.cli import main

    for name in ("WORLD_SIZE", "RANK"):
        monkeypatch.delenv(name, raising=False)
    assert main(["generate", "--model", str(checkpoints["hf"]), "--prompt", "x", "--tp",
                 "2"]) == 2
    assert "launch with torchrun --nproc-per-node 2" in capsys.readouterr().err
    result = torchrun("-m", "mixtral", "generate", "--model", str(checkpoints["hf"]),
                      "--prompt", "x", "--tp", "4")
    assert result.returncode != 0
    assert "the launch has 2 processes but --tp 4 --ep 1 needs 4" in result.stderr
    result = torchrun("-m", "mixtral", "generate", "--model", str(checkpoints["hf"]),
                      "--prompt", "x", "--ep", "2", "--max-ram", "1GiB")
    assert result.returncode != 0 and "--max-ram does not combine" in result.stderr


def test_serve_under_torchrun_answers_the_official_client(capsys):
    import socket

    import httpx

    from mixtral.cli import main
    from mixtral.default_model import NAME

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node",
                               "2", "-m", "mixtral", "serve", "--tp", "2", "--port", str(port),
                               "--dtype", "fp32"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=ENV)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, server, 120, poll=0.5)
        body = {"model": NAME, "messages": [{"role": "user", "content": "Hello"}],
                "temperature": 0, "max_tokens": 8}
        answer = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).json()
        text = answer["choices"][0]["message"]["content"]
        with httpx.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True},
                          timeout=60) as r:
            chunks = [json.loads(line[6:]) for line in r.iter_lines()
                      if line.startswith("data: {")]
        streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks
                           if c["choices"])
        from mistralai.client import Mistral  # the official client, as users call it

        client = Mistral(api_key="unused", server_url=url)
        official = client.chat.complete(model=NAME, messages=body["messages"], temperature=0,
                                        max_tokens=8).choices[0].message.content
        events = list(client.chat.stream(model=NAME, messages=body["messages"], temperature=0,
                                         max_tokens=8))
        official_streamed = "".join(e.data.choices[0].delta.content or "" for e in events)
    finally:
        server.terminate()  # torchrun passes SIGTERM on: rank 0 drains, then frees the others
        out, _ = server.communicate(timeout=90)
    assert main(["generate", "--chat", "--prompt", "Hello", "--temperature", "0",
                 "--max-tokens", "8", "--json", "--dtype", "fp32"]) == 0
    alone = json.loads(capsys.readouterr().out)["text"]
    assert text == streamed == official == official_streamed == alone, out[-3000:]


def test_eval_under_torchrun_matches_one_process(tmp_path, capsys):
    from mixtral.cli import main

    text = tmp_path / "doc.txt"
    text.write_text(" ".join(f"word{i % 37} and number {i}." for i in range(200)))
    argv = ["eval", "perplexity", "--data", str(text), "--max-len", "128", "--dtype", "fp32"]
    assert main([*argv, "--out", str(tmp_path / "one")]) == 0
    capsys.readouterr()
    logs = tmp_path / "logs"
    result = torchrun("-m", "mixtral", *argv, "--out", str(tmp_path / "two"), "--tp", "2",
                      logs=logs)
    (out0, err0), (out1, err1) = rank_output(logs, 0), rank_output(logs, 1)
    assert result.returncode == 0, err0[-3000:] + err1[-3000:]
    assert json.loads(out0)["documents"] == 1 and out1 == ""  # the summary: rank 0's alone
    for said in ("[mixtral] ", "perplexity: 100%"):  # the announcement, the progress bar
        assert said in err0 and said not in err1
    one, two = (json.loads((tmp_path / d / "perplexity.json").read_text())["curve"]
                for d in ("one", "two"))
    assert [r["length"] for r in one] == [r["length"] for r in two]
    for a, b in zip(one, two, strict=True):
        assert abs(a["perplexity"] - b["perplexity"]) <= 1e-4 * a["perplexity"]
    assert len((tmp_path / "two" / "runs.jsonl").read_text().splitlines()) == 1  # rank 0 only


def test_a_follower_is_quiet_but_its_errors_reach_stderr(checkpoints, tmp_path):
    logs = tmp_path / "logs"
    result = torchrun(str(WORKER), "follower-fails", "generate", "--model",
                      str(checkpoints["cli"]), "--prompt", "one two", "--temperature", "0",
                      "--max-tokens", "4", "--json", "--tp", "2", logs=logs)
    assert result.returncode != 0
    (_, err0), (out1, err1) = rank_output(logs, 0), rank_output(logs, 1)
    assert "mixtral generate: error: rank 1 failed on its own" in err1  # one line, no traceback
    assert "Traceback" not in err1
    assert "WARNING rank 1: a WARNING record" in err1
    assert "INFO rank 0: an INFO record" in err0  # logging at INFO is on: the leader's shows,
    assert "INFO rank 1" not in err1  # the follower's does not
    assert out1 == ""


def test_the_launch_is_read_in_one_place():
    """RANK, WORLD_SIZE and LOCAL_RANK: parallel.launching reads them, everything else asks it
    (training's data-parallel loop included)."""
    package = Path(mixtral.__file__).parent
    readers = sorted(str(f.relative_to(package)) for f in package.rglob("*.py")
                     if any(f'"{name}"' in f.read_text() for name in
                            ("RANK", "WORLD_SIZE", "LOCAL_RANK")))
    assert readers == ["parallel/launching.py"]


def test_a_malformed_launch_environment_is_a_clear_error(checkpoints, capsys, monkeypatch):
    from mixtral.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "one")
    assert main(["generate", "--model", str(checkpoints["hf"]), "--prompt", "x", "--tp",
                 "2"]) == 2
    err = capsys.readouterr().err
    assert "error: RANK='one' is not a whole number" in err and "Traceback" not in err


def test_quiet_drops_a_followers_info_and_keeps_its_warnings():
    import logging

    from mixtral.parallel import quiet

    log = logging.getLogger("mixtral.engine")
    log.setLevel(logging.DEBUG)  # a level set on the logger itself does not bring INFO back
    try:
        quiet()
        assert not log.isEnabledFor(logging.INFO)
        assert log.isEnabledFor(logging.WARNING) and log.isEnabledFor(logging.ERROR)
    finally:
        logging.disable(logging.NOTSET)
        log.setLevel(logging.NOTSET)
