"""scripts/build_corpus.py on a tiny offline configuration: the same input gives the same bytes.

The builder takes a .deb from its work directory when one is there, so the tests put small
hand-made packages (the Devil's Dictionary and WordNet formats) there instead of downloading.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "build_corpus.py"
B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
REPEATED = "A paragraph long enough to count as a duplicate when it comes back."


def tar_gz(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def write_deb(path: Path, version: str, files: dict[str, bytes]) -> None:
    """A minimal Debian package: an ar archive of debian-binary, control.tar.gz, data.tar.gz."""
    members = {
        "debian-binary": b"2.0\n",
        "control.tar.gz": tar_gz({"./control": f"Package: x\nVersion: {version}\n".encode()}),
        "data.tar.gz": tar_gz({f"./{name}": data for name, data in files.items()}),
    }
    out = bytearray(b"!<arch>\n")
    for name, data in members.items():
        out += f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode()
        out += data + (b"\n" if len(data) % 2 else b"")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(out))


def b64(n: int) -> str:
    digits = ""
    while True:
        n, r = divmod(n, 64)
        digits = B64[r] + digits
        if not n:
            return digits


def devil_deb(path: Path, n_entries: int) -> None:
    """dictd files: the body (gzip; .dz is gzip-compatible) and the base-64 offset index."""
    entries = [("00databaseinfo", "About this file.\n\nPREFACE\n\nThe preface text.\n")]
    for i in range(n_entries):
        entries.append((f"WORD{i:03d}", f"WORD{i:03d}, n. Meaning number {i}.\n\n{REPEATED}\n"))
    body, index = b"", []
    for word, text in entries:
        data = text.encode()
        index.append(f"{word}\t{b64(len(body))}\t{b64(len(data))}\n")
        body += data
    write_deb(path, "1.0-13.1", {
        "usr/share/dictd/devil.dict.dz": gzip.compress(body, mtime=0),
        "usr/share/dictd/devil.index": "".join(index).encode(),
    })


WORDNET_NOUN = (
    "  1 This software and database is being provided to you, the LICENSEE, by Princeton\n"
    "00001740 03 n 01 entity 0 000 | that which is perceived; \"an entity exists\"\n"
    "00002137 04 n 02 abstraction 0 abstract_entity 0 001 @ 00001740 n 0000 | a general concept; "
    "\"the abstraction of the idea\"; \"an abstract entity\"\n"
)
WORDNET_VERB = "01323976 35 v 01 kill 0 001 @ 01617192 v 0000 02 + 08 00 + 09 00 | cause to die\n"


def build(out: Path, work: Path, *sources: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, str(SCRIPT), str(out), "--work", str(work), "--no-tokens",
           "--sources", *sources]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


def tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_tiny_build_is_deterministic_and_complete(tmp_path):
    work = tmp_path / "work"
    devil_deb(work / "debian" / "dict-devil" / "dict-devil.deb", 150)
    write_deb(work / "debian" / "wordnet-base" / "wordnet-base.deb", "1:3.0-37",
              {"usr/share/wordnet/data.noun": WORDNET_NOUN.encode(),
               "usr/share/wordnet/data.verb": WORDNET_VERB.encode()})
    out = tmp_path / "out"
    runs = []
    for _ in range(2):  # the same output path both times: the manifest records the command
        result = build(out, work, "devils_dictionary", "wordnet,definitions")
        assert result.returncode == 0, result.stderr
        runs.append(tree(out))
        out.rename(tmp_path / f"run{len(runs)}")
    assert runs[0] == runs[1]

    files = runs[0]
    manifest = json.loads(files["manifest.json"])
    assert manifest["failures"] == {}
    devil = manifest["sources"]["devils_dictionary"]
    assert devil["documents_extracted"] == 151  # the preface and 150 entries
    assert devil["duplicates_dropped"] == 149  # REPEATED is kept once
    for split in ("train", "val"):
        assert devil[split]["sha256"] == hashlib.sha256(files[devil[split]["path"]]).hexdigest()
    held_out = files["pretrain/val/devils_dictionary.txt"].decode()
    assert held_out  # ~1 %, and at least one unit
    text = files["pretrain/train/devils_dictionary.txt"].decode() + held_out
    for i in range(150):
        assert text.count(f"Meaning number {i}.") == 1
    assert text.count(REPEATED) == 1
    assert "The preface text." in text and "About this file" not in text

    definitions = [json.loads(line) for line in files["definitions.jsonl"].decode().splitlines()]
    assert definitions == [
        {"word": "entity", "pos": "noun", "gloss": "that which is perceived",
         "example": "an entity exists", "synset": "00001740-n", "hypernyms": []},
        {"word": "abstraction", "pos": "noun", "gloss": "a general concept",
         "example": "the abstraction of the idea", "synset": "00002137-n",
         "hypernyms": ["00001740-n"]},
        {"word": "abstract entity", "pos": "noun", "gloss": "a general concept",
         "example": "an abstract entity", "synset": "00002137-n", "hypernyms": ["00001740-n"]},
        {"word": "kill", "pos": "verb", "gloss": "cause to die", "synset": "01323976-v",
         "hypernyms": ["01617192-v"], "frames": [8, 9]},
    ]
    wordnet = (files["pretrain/train/wordnet.txt"] + files["pretrain/val/wordnet.txt"]).decode()
    assert "entity (noun): that which is perceived; \"an entity exists\"" in wordnet


def test_a_broken_package_is_recorded_and_the_rest_is_built(tmp_path):
    work = tmp_path / "work"
    devil_deb(work / "debian" / "dict-devil" / "dict-devil.deb", 3)
    (work / "debian" / "jargon-text").mkdir(parents=True)
    (work / "debian" / "jargon-text" / "jargon.deb").write_bytes(b"not an archive")
    result = build(tmp_path / "out", work, "jargon_file", "devils_dictionary")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["failures"] == {
        "jargon_file": "jargon-text: SourceError: jargon.deb: not a Debian package (ar archive)"}
    assert manifest["sources"]["devils_dictionary"]["status"] == "ok"
    assert not (tmp_path / "out" / "pretrain" / "train" / "jargon_file.txt").exists()


def test_an_unknown_source_is_a_one_line_error(tmp_path):
    result = build(tmp_path / "out", tmp_path / "work", "austen,nope")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    last = result.stderr.splitlines()[-1]
    assert last.startswith("build_corpus.py: error: unknown source(s) nope; choose from austen")
    assert not (tmp_path / "out").exists()
