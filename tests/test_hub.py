"""`--model ORG/NAME` from the Hugging Face cache (a cache tree built here in huggingface_hub's
layout from the default model), the download path with huggingface_hub's functions mocked at
their boundary (this machine cannot reach the hub), and the errors that say what was tried."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mixtral import hub
from mixtral.checkfile import CheckpointError
from mixtral.checkpoint import inspect, load
from mixtral.cli import main

DEFAULT = Path(__file__).parent.parent / "mixtral" / "data" / "default"
REPO = "mistralai/Mixtral-8x7B-Instruct-v0.1"
TOKENS = torch.tensor([[1, 415, 2936, 9060, 285]])


def cache_tree(cache: Path, repo: str, commits: list[str], main: str | None) -> Path:
    """models--ORG--NAME/{blobs, snapshots/<commit>/* -> ../../blobs/<hash>, refs/main}, as
    huggingface_hub writes it; each snapshot holds the default model's files."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "blobs").mkdir(parents=True, exist_ok=True)
    for commit in commits:
        snap = folder / "snapshots" / commit
        snap.mkdir(parents=True)
        for f in ("config.json", "model.safetensors"):
            blob = folder / "blobs" / f"{commit}-{f}"
            shutil.copyfile(DEFAULT / f, blob)
            (snap / f).symlink_to(os.path.relpath(blob, snap))
        time.sleep(0.01)  # distinct mtimes: the newest snapshot is the last one made
    if main is not None:
        (folder / "refs").mkdir()
        (folder / "refs" / "main").write_text(main)
    return folder


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "hf"
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(root))
    return root / "hub"


def test_cache_dir_follows_huggingface_hubs_variables(monkeypatch, tmp_path):
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert hub.cache_dir() == tmp_path / ".cache" / "huggingface" / "hub"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hub.cache_dir() == tmp_path / "xdg" / "huggingface" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hub.cache_dir() == tmp_path / "home" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "c"))
    assert hub.cache_dir() == tmp_path / "c"


def test_a_repo_id_loads_the_snapshot_refs_main_names(cache):
    folder = cache_tree(cache, REPO, ["a" * 40, "b" * 40], main="a" * 40)
    assert hub.resolve(REPO) == folder / "snapshots" / ("a" * 40)
    (folder / "refs" / "main").unlink()  # no ref: the newest snapshot
    assert hub.resolve(REPO) == folder / "snapshots" / ("b" * 40)
    model = load(REPO, dtype="fp32")
    want = load(DEFAULT, dtype="fp32")
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS), want(TOKENS), atol=0, rtol=0)
    assert inspect(REPO).args == inspect(DEFAULT).args  # info, convert, quantize: the same


def test_every_command_reads_a_cached_repo(cache, capsys):
    cache_tree(cache, REPO, ["c" * 40], main="c" * 40)
    assert main(["info", REPO, "--json"]) == 0
    assert '"source": "checkpoint"' in capsys.readouterr().out
    assert main(["generate", "--model", REPO, "--prompt", "Hello", "--max-tokens", "2",
                 "--temperature", "0"]) == 0


def test_serve_names_a_repo_by_its_name_and_checks_it_before_serving(cache):
    from mixtral.assemble import preflight

    cache_tree(cache, REPO, ["f" * 40], main="f" * 40)
    assert preflight(REPO) == "Mixtral-8x7B-Instruct-v0.1"  # not the snapshot's commit
    assert preflight(DEFAULT) == "default"
    with pytest.raises(CheckpointError, match="HF_HUB_OFFLINE is set"):
        preflight("mistralai/not-cached")


def test_a_local_folder_wins_over_a_repo_id(cache, tmp_path, monkeypatch):
    cache_tree(cache, REPO, ["d" * 40], main="d" * 40)
    local = tmp_path / "mistralai" / "Mixtral-8x7B-Instruct-v0.1"
    local.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert hub.resolve(REPO) == Path(REPO)


def test_choose_files_takes_one_set_of_weights():
    names = ["config.json", "params.json", "tokenizer.model", "tokenizer.json", "README.md",
             "model.safetensors.index.json", "model-00001-of-00002.safetensors",
             "model-00002-of-00002.safetensors", "consolidated.00.pt", "consolidated.01.pt",
             "original/consolidated.safetensors"]
    chosen = hub.choose_files(REPO, names)
    assert sorted(chosen) == sorted(["config.json", "params.json", "tokenizer.model",
                                     "tokenizer.json", "model.safetensors.index.json",
                                     "model-00001-of-00002.safetensors",
                                     "model-00002-of-00002.safetensors"])
    assert hub.choose_files(REPO, ["params.json", "consolidated.safetensors",
                                   "consolidated.00.pt"]) == ["params.json",
                                                              "consolidated.safetensors"]
    assert hub.choose_files(REPO, ["README.md", "mixtral.Q4_K_M.gguf"]) == \
        ["mixtral.Q4_K_M.gguf"]  # a repo of GGUF files: one (test_gguf_sources)


def test_download_when_not_cached(cache, monkeypatch):
    """Online with huggingface_hub: the repo's file list, then snapshot_download of one
    checkpoint's files into the cache, mocked where huggingface_hub would reach the network."""
    huggingface_hub = pytest.importorskip("huggingface_hub")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    siblings = [SimpleNamespace(rfilename=n) for n in
                ("config.json", "model.safetensors", "consolidated.00.pt", "README.md")]
    calls = []

    def model_info(self, repo_id):
        return SimpleNamespace(siblings=siblings, sha="e" * 40)

    def snapshot_download(repo_id, allow_patterns, cache_dir):
        calls.append((repo_id, sorted(allow_patterns), Path(cache_dir)))
        return cache_tree(Path(cache_dir), repo_id, ["e" * 40], "e" * 40) / "snapshots" / ("e" * 40)

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    model = load(REPO, dtype="fp32")
    assert calls == [(REPO, ["config.json", "model.safetensors"], cache)]
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS), load(DEFAULT, dtype="fp32")(TOKENS),
                                   atol=0, rtol=0)
    load(REPO)  # now cached: no second download
    assert len(calls) == 1


def test_a_failed_download_says_what_was_tried(cache, monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    monkeypatch.delenv("HF_HUB_OFFLINE")

    def model_info(self, repo_id):
        raise ConnectionError("[Errno -2] Name or service not known")

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    with pytest.raises(CheckpointError) as e:
        load(REPO)
    assert str(e.value) == (
        f"{REPO}: no such file or directory, and not in the Hugging Face cache "
        f"({cache / 'models--mistralai--Mixtral-8x7B-Instruct-v0.1'}), and downloading it "
        "failed: ConnectionError: [Errno -2] Name or service not known (the hub cannot be "
        "reached from here: download it where it can, `hf download ORG/NAME`, and copy the "
        "cache or the folder over)")


def test_offline_and_bad_sources_say_what_was_tried(cache, tmp_path):
    with pytest.raises(CheckpointError, match="HF_HUB_OFFLINE is set, so it is not downloaded"):
        load(REPO)  # conftest sets HF_HUB_OFFLINE=1
    missing = tmp_path / "nowhere" / "model"
    with pytest.raises(CheckpointError, match=r"no such file or directory \(tried it as a "
                       r"checkpoint folder or weights file \(.safetensors, .pth, .pt, .gguf\); "
                       r"it is not a Hugging Face repo id, ORG/NAME or ORG/NAME:QUANT\)"):
        load(missing)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="not a weights file we read .* nor a checkpoint"):
        load(text)
