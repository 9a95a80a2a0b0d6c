"""The chat page as one HTML response: static/index.html with its stylesheet and scripts inlined.

static/ holds the page as readable parts: index.html (the markup), app.css, app.js, and
vendor/ (marked, DOMPurify, highlight.js: see scripts/vendor_page.py). index.html names each
part with an ordinary <link rel="stylesheet" href="..."> or <script src="..."></script>; here
each is replaced by the file's text. So the page makes no request but the API's, works behind
the bearer key (which guards everything but `/`), and needs no network at run time.

The response carries a Content-Security-Policy that allows exactly these inline scripts (by
their sha256) and connections to this server only: a payload that got past the sanitizer in a
model's answer still could not run, nor load an image from elsewhere.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import re
from importlib import resources

STATIC = resources.files("mixtral.server") / "static"
STYLESHEET = re.compile(r'<link rel="stylesheet" href="([\w./-]+)">')
SCRIPT = re.compile(r'<script src="([\w./-]+)"></script>')
# inside <script>, "</script" ends the element early, and "<!--" ... "<script" (with no "-->"
# between) makes the parser ignore the real end tag: text with either cannot be inlined as is
UNSAFE_IN_SCRIPT = re.compile(r"</script|<!--(?:(?!-->).)*?<script", re.IGNORECASE | re.DOTALL)


def read(name: str) -> str:
    return STATIC.joinpath(*name.split("/")).read_text(encoding="utf-8")


@functools.cache
def page() -> tuple[str, dict[str, str]]:
    """-> (the page's HTML, its response headers)."""
    hashes: list[str] = []

    def script(match: re.Match[str]) -> str:
        text = read(match[1])
        if UNSAFE_IN_SCRIPT.search(text):
            raise ValueError(f"static/{match[1]} cannot be inlined in a <script> element")
        digest = base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()
        hashes.append(f"'sha256-{digest}'")
        return f"<script>{text}</script>"

    def stylesheet(match: re.Match[str]) -> str:
        text = read(match[1])
        if "</style" in text.lower():
            raise ValueError(f"static/{match[1]} cannot be inlined in a <style> element")
        return f"<style>{text}</style>"

    html = read("index.html")
    html = SCRIPT.sub(script, STYLESHEET.sub(stylesheet, html))
    policy = ("default-src 'none'; connect-src 'self'; img-src 'self' data:; "
              f"style-src 'unsafe-inline'; script-src {' '.join(hashes)}; "
              "base-uri 'none'; form-action 'none'")
    return html, {"Content-Security-Policy": policy, "X-Content-Type-Options": "nosniff"}
