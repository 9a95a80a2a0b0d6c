"""Vendor the chat page's JavaScript libraries from npm into mixtral/server/static/vendor/.

    python scripts/vendor_page.py           fetch the pinned packages, check them, write them
    python scripts/vendor_page.py --check   check the files in the tree (no network)
    python scripts/vendor_page.py --update  after changing PINS: write the new SHA256SUMS

The page runs with no network (the server inlines these files into its one HTML response), so
the libraries live in the package. `npm pack` fetches each pinned tarball and verifies the
registry's sha512 integrity; this script then takes the few files the page uses, with the
package's licence, and compares every byte against vendor/SHA256SUMS, which is committed:
a changed tarball behind an unchanged version number cannot slip in.
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

VENDOR = Path(__file__).resolve().parent.parent / "mixtral" / "server" / "static" / "vendor"
SUMS = VENDOR / "SHA256SUMS"

# npm package@version -> {path inside the tarball: name in vendor/}
PINS: dict[str, dict[str, str]] = {
    "marked@18.2.1": {  # Markdown -> HTML (MIT)
        "package/lib/marked.umd.js": "marked.umd.js",
        "package/LICENSE": "LICENSE.marked",
    },
    "dompurify@3.5.0": {  # HTML sanitizer (MPL-2.0 OR Apache-2.0)
        "package/dist/purify.min.js": "purify.min.js",
        "package/LICENSE": "LICENSE.dompurify",
    },
    "@highlightjs/cdn-assets@11.12.0": {  # highlighting, the "common" 36 languages (BSD-3)
        "package/highlight.min.js": "highlight.min.js",
        "package/LICENSE": "LICENSE.highlightjs",
    },
}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_sums() -> dict[str, str]:
    pairs = (line.split() for line in SUMS.read_text().splitlines() if line.strip())
    return {name: digest for digest, name in pairs}


def fetch() -> dict[str, bytes]:
    """Every vendored file's bytes, from the pinned tarballs (npm checks their integrity)."""
    files: dict[str, bytes] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for spec, wanted in PINS.items():
            out = subprocess.run(["npm", "pack", "--silent", "--pack-destination", tmp, spec],
                                 check=True, capture_output=True, text=True).stdout
            with tarfile.open(Path(tmp) / out.strip().splitlines()[-1]) as tar:
                for inside, name in wanted.items():
                    member = tar.extractfile(inside)
                    if member is None:
                        raise SystemExit(f"{spec} has no file {inside}")
                    files[name] = member.read()
    return files


def check(files: dict[str, bytes], sums: dict[str, str]) -> list[str]:
    """-> what is wrong: a file missing, extra, or not matching its pinned digest."""
    wrong = [f"{name}: not in SHA256SUMS" for name in files if name not in sums]
    wrong += [f"{name}: missing" for name in sums if name not in files]
    wrong += [f"{name}: sha256 {sha256(files[name])}, pinned {digest}"
              for name, digest in sums.items() if name in files and sha256(files[name]) != digest]
    return wrong


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true",
                      help="verify the vendored files against SHA256SUMS, offline")
    mode.add_argument("--update", action="store_true",
                      help="fetch and rewrite SHA256SUMS (after changing PINS)")
    args = parser.parse_args()
    names = [name for wanted in PINS.values() for name in wanted.values()]
    if args.check:
        wrong = check({n: (VENDOR / n).read_bytes() for n in names if (VENDOR / n).exists()},
                      read_sums())
    else:
        files = fetch()
        if args.update:
            SUMS.write_text("".join(f"{sha256(files[n])}  {n}\n" for n in sorted(files)))
        wrong = check(files, read_sums())
        if not wrong:
            VENDOR.mkdir(parents=True, exist_ok=True)
            for name, data in files.items():
                (VENDOR / name).write_bytes(data)
    for line in wrong:
        print(f"vendor_page: {line}", file=sys.stderr)
    if not wrong:
        print(f"vendor_page: {len(names)} files match {SUMS}")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
