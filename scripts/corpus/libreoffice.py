"""LibreOffice help pages (en, fr, de, es, it): text blocks of ``div#DisplayArea``.

Each block keeps its element id, which is the same in every translation; that is what lets
``artifacts.build_parallel`` align the languages paragraph by paragraph.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from html.parser import HTMLParser

from .packages import Fetched
from .text import clean_text, log


@dataclass
class Block:
    """One block of a help page; ``key`` is the element id (shared by all translations)."""

    key: str
    tag: str
    text: str


@dataclass
class HelpPage:
    path: str
    blocks: list[Block]


_VOID = set("area base br col embed hr img input link meta param source track wbr".split())
_BLOCKS = {
    *"p h1 h2 h3 h4 h5 h6 li pre td th dt dd caption div table tr ul ol dl".split(),
    "blockquote",
    "section",
}
_SKIP_TAGS = {"script", "style", "noscript", "header", "footer", "aside", "nav"}
_SKIP_HIDDEN = {"MAC", "WIN", "UNIX"}  # platform variants; the "default" variant is kept


class HelpPageParser(HTMLParser):
    """Collect text blocks inside ``div#DisplayArea``, skipping hidden platform variants."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.blocks: list[Block] = []
        self._stack: list[tuple[str, bool, bool, bool]] = []  # tag, skip, display, block
        self._context: list[tuple[str, str]] = [("", "")]
        self._buffer: list[str] = []
        self._skip = self._display = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _VOID:
            if tag == "br":
                self.handle_data("\n")
            return
        attr = dict(attrs)
        skip = tag in _SKIP_TAGS or ("hidden" in attr and attr.get("class") in _SKIP_HIDDEN)
        display = attr.get("id") == "DisplayArea"
        block = tag in _BLOCKS
        if block:
            self._flush()
            self._context.append((tag, attr.get("id") or ""))
        self._stack.append((tag, skip, display, block))
        self._skip += skip
        self._display += display

    def handle_endtag(self, tag: str) -> None:
        open_tags = [t for t, *_ in self._stack]
        depth = len(open_tags) - 1 - open_tags[::-1].index(tag) if tag in open_tags else -1
        while depth >= 0 and len(self._stack) > depth:
            _, skip, display, block = self._stack.pop()
            if block:
                self._flush()
                self._context.pop()
            self._skip -= skip
            self._display -= display

    def handle_data(self, data: str) -> None:
        if self._display and not self._skip:
            self._buffer.append(data)

    def close(self) -> None:
        super().close()
        self._flush()

    def _flush(self) -> None:
        text, self._buffer = "".join(self._buffer), []
        tag, ident = self._context[-1]
        if any(t == "pre" for t, _ in self._context):
            text, tag = clean_text(text), "pre"
        else:
            text = clean_text(" ".join(text.split()))
        if text:
            self.blocks.append(Block(ident or tag, tag, text))


def parse_help_pages(pkg: Fetched, code: str) -> list[HelpPage]:
    """All ``text/**.html`` pages of one libreoffice-help-* package."""
    root = f"usr/share/libreoffice/help/{code}/"
    pages = []
    for name, data in pkg.members(re.escape(root) + r"text/.+\.html$"):
        parser = HelpPageParser()
        try:
            parser.feed(data.decode("utf-8"))
            parser.close()
        except Exception as exc:  # name the page, keep going
            log(f"warning: {pkg.path.name}: {name}: {exc}")
            continue
        pages.append(HelpPage(name.removeprefix(root), parser.blocks))
    return pages
