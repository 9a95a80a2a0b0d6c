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

A repo of GGUF files (one per quantization) is named as llama.cpp's `-hf` names it:
`ORG/NAME:Q4_K_M` picks the file whose name ends in that quantization (or `ORG/NAME:FILE.gguf`
the file of that name); a bare `ORG/NAME` picks Q4_K_M, llama.cpp's default, or the only GGUF
file there is. Only the chosen file is downloaded. Ollama's `hf.co/ORG/NAME:QUANT` is the same.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from mixtral.checkfile import CheckpointError

# huggingface_hub's rule for a repo id: two names of letters, digits, '-', '_', '.'
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")
_WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt")
_WEIGHTS = "checkpoint folder or weights file (.safetensors, .pth, .pt, .gguf)"
_SPLIT = re.compile(r"-(\d{5})-of-(\d{5})$")  # llama.cpp's gguf-split parts: x-00001-of-00003
_HOSTS = ("https://", "hf.co/", "huggingface.co/")
DEFAULT_QUANT = "Q4_K_M"  # what llama.cpp's -hf and the hub's GGUF manifests pick untold


def resolve(source: str | os.PathLike) -> Path:
    """The path `source` names: itself if it exists, else the cached (or downloaded) snapshot
    of the Hugging Face repo it names, or the one GGUF file of it that ORG/NAME:QUANT (or a
    repo of GGUF files alone) picks; else a CheckpointError saying what was tried."""
    path = Path(source)
    if path.exists():
        return path
    text = os.fspath(source)
    for prefix in _HOSTS:  # Ollama's form, hf.co/ORG/NAME:QUANT, and the page's address
        text = text.removeprefix(prefix)
    repo_id, _, quant = text.partition(":")
    if not is_repo_id(repo_id) or (":" in text and not quant):
        raise CheckpointError(f"{text}: no such file or directory (tried it as a {_WEIGHTS}; "
                              "it is not a Hugging Face repo id, ORG/NAME or ORG/NAME:QUANT)")
    cached = cached_snapshot(repo_id)
    if cached is not None:
        names = [p.relative_to(cached).as_posix() for p in cached.rglob("*") if p.is_file()]
        if not quant and any(n.endswith(_WEIGHT_SUFFIXES) for n in names):
            return cached  # a checkpoint's files (HF or Mistral's): find_files picks a set
        ggufs = [n for n in names if n.endswith(".gguf")]
        if ggufs or quant:
            chosen = choose_gguf(repo_id, ggufs, quant, strict=False)
            if chosen is not None:
                return cached / chosen
            return download(repo_id, quant, cached=ggufs)
        return cached
    return download(repo_id, quant)


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


def download(repo_id: str, quant: str = "", cached: list[str] | None = None) -> Path:
    """The checkpoint's files of `repo_id` (with `quant`: that GGUF file) fetched into the
    cache (huggingface_hub's progress bars on stderr); a CheckpointError naming what was tried
    when that cannot be done. `cached`: the GGUF files the cache has, none the one asked for."""
    if cached is None:
        where = f"{repo_id}{':' if quant else ''}{quant}: no such file or directory, and " \
                f"not in the Hugging Face cache ({repo_folder(repo_id)})"
    else:
        held = ", ".join(cached[:4]) + (", ..." if len(cached) > 4 else "") or "no GGUF file"
        where = f"{repo_id}:{quant or DEFAULT_QUANT}: the Hugging Face cache holds no such " \
                f"GGUF file of the repo (it has {held})"
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
        gguf = choose_gguf(repo_id, names, quant) if quant else None
        files = [gguf] if gguf else choose_files(repo_id, names)
        folder = huggingface_hub.snapshot_download(repo_id, allow_patterns=files,
                                                   cache_dir=cache_dir())
    except CheckpointError:
        raise
    except Exception as e:  # network, authentication, a missing repo: one line, with advice
        raise CheckpointError(f"{where}, and downloading it failed: {_reason(e)}") from None
    return Path(folder) / files[0] if files[0].endswith(".gguf") else Path(folder)


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
    gguf = choose_gguf(repo_id, names, "")
    if gguf is not None:
        return [gguf]
    raise CheckpointError(f"{repo_id}: the repo holds no checkpoint we read (safetensors, "
                          "consolidated .pth/.pt or GGUF files)")


def choose_gguf(repo_id: str, names: list[str], quant: str,
                strict: bool = True) -> str | None:
    """The one GGUF file among `names` that `quant` names: a file whose name (less .gguf)
    ends in it after a '.', '-' or '_' (any case; Q4_K does not pick Q4_K_M), or the file of
    that name; no `quant`: Q4_K_M, else the only GGUF file. None where there is none: an
    error when `strict` (the repo's whole list), else a cue to download (the cache's part)."""
    ggufs = [n for n in names if n.endswith(".gguf") and not n.rsplit("/", 1)[-1].startswith(
        "mmproj")]  # a vision projector, not a model
    if not ggufs:
        return None
    if not quant and len(ggufs) == 1:
        return ggufs[0]
    want = (quant or DEFAULT_QUANT).lower()
    tail = re.compile(rf"(^|[._-]){re.escape(want)}$")
    found = [n for n in ggufs if n.rsplit("/", 1)[-1].lower() == want] or \
        [n for n in ggufs if tail.search(_SPLIT.sub("", _stem(n)).lower())]
    parts = sorted(found)
    split = [m for n in parts if (m := _SPLIT.search(_stem(n)))]
    if parts and len(split) == len(parts):  # one model in parts (a cache may hold some)
        first = _SPLIT.sub("", _stem(parts[0]))
        if all(_SPLIT.sub("", _stem(n)) == first for n in parts):
            count = int(split[0].group(2))
            raise CheckpointError(f"{repo_id}:{quant or DEFAULT_QUANT} is split in {count} "
                                  f"files ({parts[0]}, ...), which mixtral does not read as one: "
                                  "merge them with llama.cpp's llama-gguf-split --merge and "
                                  "pass the merged file's path to --model")
    if len(found) == 1:
        return found[0]
    if not strict and not found:
        return None
    shown = found or ggufs
    listed = ", ".join(shown[:8]) + (", ..." if len(shown) > 8 else "")
    if found:
        raise CheckpointError(f"{repo_id}:{quant or DEFAULT_QUANT} names several GGUF files "
                              f"({listed}): name one, {repo_id}:FILE.gguf")
    asked = f"no GGUF file of quantization {quant}" if quant else \
        f"several GGUF files and none is {DEFAULT_QUANT}"
    raise CheckpointError(f"{repo_id} holds {asked} (it has {listed}): pick one with "
                          f"{repo_id}:QUANT, e.g. {repo_id}:Q8_0, or {repo_id}:FILE.gguf")


def _stem(name: str) -> str:
    return name.rsplit("/", 1)[-1].removesuffix(".gguf")


def _reason(e: Exception) -> str:
    """huggingface_hub's error in one line, with what to do for the usual ones."""
    kind = type(e).__name__
    first = (str(e).strip().splitlines() or [kind])[0][:200]
    if kind == "GatedRepoError" or "401" in first or "403" in first:
        return (f"{first} (a gated repo: accept its terms on huggingface.co, then log in with "
                "`hf auth login` or set HF_TOKEN)")
    if kind == "RepositoryNotFoundError" or "404" in first:
        return f"no such repo on the Hugging Face hub ({first})"
    if isinstance(e, (ConnectionError, TimeoutError)) or "Connect" in kind or "Timeout" in kind:
        return (f"{kind}: {first} (the hub cannot be reached from here: download it where it "
                "can, `hf download ORG/NAME`, and copy the cache or the folder over)")
    return f"{kind}: {first}"
