"""Writing a file so that a crash leaves the old file or the new one, never half of one.

The bytes go to a temporary file beside the target (the same folder, so the rename cannot
cross file systems), which is flushed to disk and renamed over the target; then the folder is
flushed too, so that the rename itself survives a power cut. Checkpoints, evaluation results
and training's files all go through here.
"""

from __future__ import annotations

import os
import stat
import uuid
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> None:
    """Have `write(tmp)` write the file at the path it is given, then put it in place of
    `path`. `tmp` ends with `path`'s suffix, for writers that choose a format by it (savefig);
    if anything fails, the temporary file is removed and `path` is left as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp{path.suffix}")
    # created here (O_EXCL: never someone else's file) with the usual permissions, 0666 less
    # the umask, which the finished file keeps
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    mode = stat.S_IMODE(os.stat(tmp).st_mode)
    try:
        write(tmp)
        os.chmod(tmp, mode)  # a writer that replaces the file (safetensors does) leaves 0600
        fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """`text` as UTF-8, atomically."""
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def fsync(path: str | os.PathLike) -> None:
    """Flush a file's bytes, or a folder's entries (what makes a rename in it last), to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
