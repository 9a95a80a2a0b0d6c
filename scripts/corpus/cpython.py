"""Python sources: the reST of the Python 3.11 documentation and the running stdlib's code.

Both are PSF-2.0. The stdlib goes without its tests, IDLE, lib2to3, the generated pydoc data
and the generated codec tables (``STDLIB_SKIP_DIRS`` and the checks in ``extract_stdlib``).
"""

from __future__ import annotations

import os
import re
import sysconfig
from pathlib import Path

from .packages import Fetched
from .text import Document, decode, log, split_paragraphs


def extract_python_docs(pkg: Fetched) -> list[Document]:
    """reST sources of the Python 3.11 docs (symlinked copies are skipped, dedup by content)."""
    root = "usr/share/doc/python3.11/html/_sources/"
    docs = []
    for name, data in pkg.members(re.escape(root) + r".+\.rst\.txt$"):
        rel = name.removeprefix(root)
        if rel == "whatsnew/changelog.rst.txt":  # an issue-number list, not prose
            continue
        docs.append(Document(rel, split_paragraphs(decode(data, name))))
    return docs


STDLIB_SKIP_DIRS = {
    "test",
    "tests",
    "idle_test",
    "idlelib",
    "lib2to3",
    "site-packages",
    "dist-packages",
    "__pycache__",
    "pydoc_data",  # generated copy of the documentation
}


def extract_stdlib() -> list[Document]:
    """The running interpreter's stdlib ``.py`` files, minus tests, idlelib, lib2to3, tables."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in STDLIB_SKIP_DIRS and "config-" not in d)
        for name in sorted(files):
            if not name.endswith(".py") or name.startswith("test_"):
                continue
            path = Path(folder, name)
            data = path.read_bytes()
            if b"gencodec.py" in data[:2000]:  # generated charmap codec tables
                continue
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                log(f"warning: skipping non-UTF-8 {path}")
                continue
            docs.append(Document(path.relative_to(root).as_posix(), split_paragraphs(text)))
    docs.sort(key=lambda d: d.key)
    return docs
