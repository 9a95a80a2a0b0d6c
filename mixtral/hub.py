"""Where `--model` points: a path on disk, or a Hugging Face repo id (ORG/NAME) found in the
Hugging Face cache, or downloaded into it when huggingface_hub is installed and we are online.

`resolve` is the one step from what a user typed to a path, so every command that takes a
model (chat, generate, serve, eval, bench, info, convert, quantize, lora) reads the same
sources. The cache is the layout huggingface_hub writes, read without it:

  $HF_HUB_CACHE | $HF_HOME/hub | $XDG_CACHE_HOME/huggingface/hub | ~/.cache/huggingface/hub
    models--ORG--NAME/refs/main            the commit of the newest snapshot of main
    models--ORG--NAME/snapshots/<commit>/  the files, as links into blobs/

Offline, an id resolves to the snapshot refs/main names (or the newest one present). When the
cache has none, huggingface_hub (the `hub` extra) downloads the checkpoint's files, with its
progress bars, unless HF_HUB_OFFLINE is set; a download's failure is one line that says what
was tried and what to do.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from mixtral.checkfile import CheckpointError

# huggingface_hub's rule for a repo id: two names of letters, digits, '-', '_', '.'
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")
_WEIGHTS = "checkpoint folder or weights file (.safetensors, .pth, .pt, .gguf)"


def resolve(source: str | os.PathLike) -> Path:
    """The path `source` names: itself if it exists, else the cached (or downloaded) snapshot
    of the Hugging Face repo it names; else a CheckpointError saying what was tried."""
    path = Path(source)
    if path.exists():
        return path
    text = os.fspath(source)
    if not is_repo_id(text):
        raise CheckpointError(f"{text}: no such file or directory (tried it as a {_WEIGHTS}; "
                              "it is not a Hugging Face repo id, ORG/NAME)")
    cached = cached_snapshot(text)
    return cached if cached is not None else download(text)


def is_repo_id(text: str) -> bool:
    return _REPO_ID.fullmatch(text) is not None and ".." not in text


def cache_dir() -> Path:
    """The hub cache huggingface_hub uses, from the same variables, read at each call."""
    env = os.environ
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(name):
            return Path(env[name]).expanduser()
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]).expanduser() / "hub"
    xdg = Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser()
    return xdg / "huggingface" / "hub"


def repo_folder(repo_id: str) -> Path:
    return cache_dir() / f"models--{repo_id.replace('/', '--')}"


def cached_snapshot(repo_id: str) -> Path | None:
    """The snapshot refs/main names, else the newest snapshot present, else None."""
    snapshots = repo_folder(repo_id) / "snapshots"
    found = [p for p in snapshots.iterdir() if p.is_dir()] if snapshots.is_dir() else []
    if not found:
        return None
    ref = snapshots.parent / "refs" / "main"
    if ref.is_file():
        main = snapshots / ref.read_text().strip()
        if main in found:
            return main
    return max(found, key=lambda p: p.stat().st_mtime)


def download(repo_id: str) -> Path:
    """The checkpoint's files of `repo_id` fetched into the cache (huggingface_hub's progress
    bars on stderr); a CheckpointError naming what was tried when that cannot be done."""
    where = f"{repo_id}: no such file or directory, and not in the Hugging Face cache " \
            f"({repo_folder(repo_id)})"
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        raise CheckpointError(f"{where}; HF_HUB_OFFLINE is set, so it is not downloaded")
    try:
        import huggingface_hub
    except ImportError:
        raise CheckpointError(f"{where}; to download it, install huggingface_hub (pip install "
                              "'mixtral[hub]') or run: hf download " + repo_id) from None
    try:
        info = huggingface_hub.HfApi().model_info(repo_id)
        names = [s.rfilename for s in info.siblings or []]
        files = choose_files(repo_id, names)
        folder = huggingface_hub.snapshot_download(repo_id, allow_patterns=files,
                                                   cache_dir=cache_dir())
    except CheckpointError:
        raise
    except Exception as e:  # network, authentication, a missing repo: one line, with advice
        raise CheckpointError(f"{where}, and downloading it failed: {_reason(e)}") from None
    return Path(folder)


def choose_files(repo_id: str, names: list[str]) -> list[str]:
    """The files of one checkpoint among a repo's (which often holds the weights twice, as
    HF shards and as Mistral's consolidated files): its configs and tokenizer, and the first
    of the sets find_files would read."""
    top = [n for n in names if "/" not in n]
    small = [n for n in top if n.endswith(".json") or n.startswith("tokenizer.")]
    sets = [
        [n for n in top if n.endswith(".safetensors") and not n.startswith("consolidated")],
        [n for n in top if n == "consolidated.safetensors"],
        [n for n in top if n.startswith("consolidated.") and n.endswith((".pth", ".pt"))],
    ]
    for weights in sets:
        if weights:
            return small + weights
    ggufs = [n for n in names if n.endswith(".gguf")]
    if ggufs:
        raise CheckpointError(f"{repo_id} holds GGUF files ({', '.join(ggufs[:3])}"
                              f"{', ...' if len(ggufs) > 3 else ''}): download the one you want "
                              f"(hf download {repo_id} FILE) and pass its path to --model")
    raise CheckpointError(f"{repo_id}: the repo holds no checkpoint we read (safetensors, "
                          "consolidated .pth/.pt or GGUF files)")


def _reason(e: Exception) -> str:
    """huggingface_hub's error in one line, with what to do for the usual ones."""
    kind = type(e).__name__
    first = (str(e).strip().splitlines() or [kind])[0][:200]
    if kind == "GatedRepoError" or "401" in first or "403" in first:
        return (f"{first} (a gated repo: accept its terms on huggingface.co, then log in with "
                "`hf auth login` or set HF_TOKEN)")
    if kind == "RepositoryNotFoundError" or "404" in first:
        return f"no such repo on the Hugging Face hub ({first})"
    return f"{kind}: {first}"
