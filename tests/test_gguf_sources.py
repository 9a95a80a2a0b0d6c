"""GGUF models from where people keep them: a hub repo of GGUF files named as llama.cpp's `-hf`
names it (`ORG/NAME:QUANT`), from a cache tree in huggingface_hub's layout and with the
download mocked at huggingface_hub's boundary; `mixtral serve --model x.gguf` answering the
openai client, its answers those of the checkpoint the file was made from."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from gguf_files import default_gguf, random_state, write_gguf
from serving import LiveServer, free_port, wait_healthy

from mixtral import hub
from mixtral.checkfile import CheckpointError
from mixtral.checkpoint import load
from mixtral.cli import main

DEFAULT = Path(__file__).parent.parent / "mixtral" / "data" / "default"
REPO = "TheBloke/Mixtral-8x7B-Instruct-v0.1-GGUF"
QUANTS = ("Q4_K_M", "Q4_K_S", "Q8_0")


def gguf_name(quant: str) -> str:
    return f"mixtral-8x7b-instruct-v0.1.{quant}.gguf"


def gguf_tree(cache: Path, source: Path, names: list[str], commit: str = "a" * 40) -> Path:
    """models--ORG--NAME as huggingface_hub leaves it after downloading `names` (each file a
    link into blobs/ holding `source`'s bytes); returns the snapshot."""
    folder = cache / f"models--{REPO.replace('/', '--')}"
    snap = folder / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    (folder / "blobs").mkdir(exist_ok=True)
    for name in names:
        blob = folder / "blobs" / f"{commit}-{name}"
        shutil.copyfile(source, blob)
        (snap / name).symlink_to(os.path.relpath(blob, snap))
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / "main").write_text(commit)
    return snap


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    return tmp_path / "hf" / "hub"


@pytest.fixture(scope="module")
def small_gguf(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "small.gguf"
    write_gguf(path, random_state())
    return path


def test_a_quant_tag_picks_one_gguf_file_of_a_cached_repo(cache, small_gguf, capsys):
    snap = gguf_tree(cache, small_gguf, [gguf_name(q) for q in QUANTS] + ["README.md"])
    assert hub.resolve(f"{REPO}:Q8_0") == snap / gguf_name("Q8_0")
    assert hub.resolve(f"{REPO}:q4_k_s") == snap / gguf_name("Q4_K_S")  # any case
    assert hub.resolve(REPO) == snap / gguf_name("Q4_K_M")  # llama.cpp's default
    assert hub.resolve(f"{REPO}:{gguf_name('Q8_0')}") == snap / gguf_name("Q8_0")  # by name
    assert hub.resolve(f"hf.co/{REPO}:Q8_0") == snap / gguf_name("Q8_0")  # as Ollama names it
    model = load(f"{REPO}:Q8_0")
    with torch.no_grad():
        torch.testing.assert_close(model(torch.tensor([[1, 5, 9]])),
                                   load(small_gguf)(torch.tensor([[1, 5, 9]])), atol=0, rtol=0)
    from mixtral.assemble import preflight

    assert preflight(f"{REPO}:Q8_0") == gguf_name("Q8_0").removesuffix(".gguf")  # served name
    assert main(["info", f"{REPO}:Q8_0", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["source"] == "gguf" and report["gguf"]["file"] == str(snap / gguf_name("Q8_0"))
    # Q4_K is a prefix of Q4_K_M and Q4_K_S, not their name: not in the cache, not downloaded
    with pytest.raises(CheckpointError, match=rf"{REPO}:Q4_K: the Hugging Face cache holds no "
                       r"such GGUF file of the repo \(it has .*Q4_K_M.gguf.*\); HF_HUB_OFFLINE "
                       "is set"):
        hub.resolve(f"{REPO}:Q4_K")
    with pytest.raises(CheckpointError, match=r"TheBloke/other-GGUF:Q8_0: no such file or "
                       r"directory, and not in the Hugging Face cache \(.*\); HF_HUB_OFFLINE"):
        hub.resolve("TheBloke/other-GGUF:Q8_0")
    with pytest.raises(CheckpointError, match="it is not a Hugging Face repo id, ORG/NAME or "
                       "ORG/NAME:QUANT"):
        hub.resolve(f"{REPO}:")


def test_choose_gguf_says_which_to_pick():
    names = ["README.md", *(gguf_name(q) for q in QUANTS), "mmproj-f16.gguf",
             "Q6_K/mixtral-Q6_K-00001-of-00002.gguf", "Q6_K/mixtral-Q6_K-00002-of-00002.gguf"]
    assert hub.choose_gguf(REPO, names, "") == gguf_name("Q4_K_M")
    assert hub.choose_gguf(REPO, names, "Q8_0") == gguf_name("Q8_0")
    with pytest.raises(CheckpointError, match=r"Q6_K is split in 2 files \(Q6_K/mixtral-Q6_K-"
                       r"00001-of-00002.gguf, ...\).*llama-gguf-split --merge"):
        hub.choose_gguf(REPO, names, "Q6_K")
    with pytest.raises(CheckpointError, match=rf"{REPO} holds no GGUF file of quantization IQ2_XS "
                       rf"\(it has .*\): pick one with {REPO}:QUANT"):
        hub.choose_gguf(REPO, names, "IQ2_XS")
    two = ["a.Q8_0.gguf", "b.Q8_0.gguf", "a.Q5_K_M.gguf"]
    with pytest.raises(CheckpointError, match=r"Q8_0 names several GGUF files \(a.Q8_0.gguf, "
                       rf"b.Q8_0.gguf\): name one, {REPO}:FILE.gguf"):
        hub.choose_gguf(REPO, two, "Q8_0")
    with pytest.raises(CheckpointError, match="several GGUF files and none is Q4_K_M"):
        hub.choose_gguf(REPO, two, "")
    assert hub.choose_gguf(REPO, ["only.Q5_K_M.gguf", "mmproj.gguf"], "") == "only.Q5_K_M.gguf"
    assert hub.choose_files(REPO, ["README.md", *two[:1]]) == ["a.Q8_0.gguf"]  # a bare id


def test_a_quant_tag_downloads_only_its_file(cache, small_gguf, monkeypatch):
    """The cache has Q4_K_M; :Q8_0 online asks the hub for the repo's list and downloads only
    that file (huggingface_hub mocked where it would reach the network)."""
    huggingface_hub = pytest.importorskip("huggingface_hub")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    gguf_tree(cache, small_gguf, [gguf_name("Q4_K_M")])
    siblings = [SimpleNamespace(rfilename=n) for n in
                ["README.md", "config.json", *(gguf_name(q) for q in QUANTS)]]
    calls = []

    def model_info(self, repo_id):
        return SimpleNamespace(siblings=siblings, sha="a" * 40)

    def snapshot_download(repo_id, allow_patterns, cache_dir):
        calls.append((repo_id, allow_patterns, Path(cache_dir)))
        return gguf_tree(Path(cache_dir), small_gguf, allow_patterns)

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    snap = cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / ("a" * 40)
    assert hub.resolve(REPO) == snap / gguf_name("Q4_K_M")  # cached: nothing fetched
    assert calls == []
    assert hub.resolve(f"{REPO}:Q8_0") == snap / gguf_name("Q8_0")
    assert calls == [(REPO, [gguf_name("Q8_0")], cache)]
    assert isinstance(load(f"{REPO}:Q8_0"), torch.nn.Module)
    assert len(calls) == 1  # now cached
    with pytest.raises(CheckpointError, match="no GGUF file of quantization Q2_K"):
        hub.resolve(f"{REPO}:Q2_K")  # the hub's list says no: nothing downloaded
    assert len(calls) == 1


# --- mixtral serve --model x.gguf -----------------------------------------------------------------

def test_serve_a_gguf_file_answers_the_openai_client(tmp_path):
    """`mixtral serve --model default.gguf` (the default model written as llama.cpp would,
    with Mixtral's own vocabulary): named for the file's stem, and its greedy answers those
    of the checkpoint it was made from, served the same way."""
    from openai import OpenAI

    from mixtral.assemble import assemble

    path = tmp_path / "default-f32.gguf"
    default_gguf(path)
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "mixtral", "serve", "--model", str(path),
                             "--port", str(port)], stderr=subprocess.PIPE, text=True, env=env)
    reference = LiveServer(lambda: assemble(DEFAULT, dtype="fp32"), name="default")
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, proc, 120)
        served = OpenAI(api_key="none", base_url=url + "/v1", max_retries=0)
        assert served.models.list().data[0].id == "default-f32"  # then the aliases clients send
        ours = OpenAI(api_key="none", base_url=reference.url + "/v1", max_retries=0)
        messages = [{"role": "user", "content": "What is the capital of France?"}]

        def greedy(client: OpenAI, name: str) -> tuple[str | None, int]:
            r = client.chat.completions.create(model=name, messages=messages, max_tokens=16,
                                               temperature=0)
            assert r.usage is not None
            return r.choices[0].message.content, r.usage.completion_tokens

        answer = greedy(served, "default-f32")
        assert answer[0] and answer == greedy(ours, "default")  # the F32 file is the checkpoint
    finally:
        reference.stop()
        proc.terminate()
        err = proc.communicate(timeout=30)[1]
    assert "serving default-f32" in err
    assert "default-f32.gguf: F32 x" in err and "-> float (exact)" in err  # what it did
