"""The chat page as the server sends it (no browser): every part inlined into one response, the
vendored libraries byte-identical to their pinned npm releases, a Content-Security-Policy that
admits exactly the page's own scripts, and the package shipping every part."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mixtral.server import page

ROOT = Path(__file__).parent.parent


def test_vendored_files_match_their_pinned_checksums():
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "vendor_page.py"), "--check"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "6 files match" in done.stdout


def test_every_part_is_inlined_and_nothing_is_fetched():
    html, _ = page.page()
    assert not re.search(r"<script[^>]*\ssrc=|<link[^>]*\shref=(?!\"data:)", html)
    index = (ROOT / "mixtral" / "server" / "static" / "index.html").read_text()
    for part in re.findall(r'src="([\w./-]+)"|href="([\w./-]+\.css)"', index):
        name = part[0] or part[1]
        assert page.read(name) in html, name
    assert "marked v18.2.1" in html and "DOMPurify 3.5.0" in html and "v11.12.0" in html


def test_the_policy_admits_exactly_the_inline_scripts():
    html, headers = page.page()
    scripts = re.findall(r"<script>(.*?)</script>", html, re.DOTALL)
    digests = {"'sha256-" + base64.b64encode(hashlib.sha256(s.encode()).digest()).decode() + "'"
               for s in scripts}
    policy = dict(p.strip().split(" ", 1) for p in headers["Content-Security-Policy"].split(";"))
    assert set(policy["script-src"].split()) == digests and len(scripts) == 7
    assert policy["default-src"] == "'none'" and policy["connect-src"] == "'self'"


@pytest.mark.parametrize("text", ["var a = '</script>';", "x = '<!-- <script>'"])
def test_text_that_would_end_a_script_early_is_refused(text, monkeypatch):
    monkeypatch.setattr(page, "read", lambda name: '<script src="x.js"></script>'
                        if name == "index.html" else text)
    page.page.cache_clear()
    try:
        with pytest.raises(ValueError, match="static/x.js cannot be inlined"):
            page.page()
    finally:
        page.page.cache_clear()


def test_the_package_ships_every_part():
    line = re.search(r'^"mixtral.server" = (\[.*\])$', (ROOT / "pyproject.toml").read_text(),
                     re.MULTILINE)  # (tomllib is Python 3.11+; this list is also JSON)
    patterns = json.loads(line[1])
    static = ROOT / "mixtral" / "server"
    shipped = {p for pattern in patterns for p in static.glob(pattern)}
    wanted = {p for p in (static / "static").rglob("*") if p.is_file()}
    assert wanted <= shipped, sorted(str(p) for p in wanted - shipped)
