"""`mixtral chat` as a person uses it: under a pseudo-terminal (line editing, history, pastes,
Ctrl-C) and from a pipe; the conversation files of /save and /load; the history file."""

from __future__ import annotations

import io
import json
import os
import pty
import re
import select
import signal
import sys
import time
from pathlib import Path

import pytest

from mixtral.terminal_chat import read_messages
from mixtral.terminal_input import History


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    from mixtral.checkpoint import save
    from mixtral.default_model import random_tiny

    model = random_tiny()  # random weights: answers run to --max-tokens, so Ctrl-C finds one
    path = tmp_path_factory.mktemp("chat") / "tiny"
    save(model.state_dict(), model.args, path)
    return path


class Terminal:
    """A program on a pseudo-terminal: what it shows (`seen`), and keys sent to it."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: the pty is its controlling terminal, Ctrl-C included
            # ... but ignored, as a background job's children have it: the chat takes it back
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            os.execve(argv[0], argv, env)
        self.seen = b""

    def send(self, keys: bytes) -> None:
        os.write(self.fd, keys)

    def read(self, seconds: float) -> bytes:
        """What has arrived, waiting up to `seconds` for the first of it."""
        got = b""
        while select.select([self.fd], [], [], 0 if got else seconds)[0]:
            try:
                chunk = os.read(self.fd, 65536)
            except OSError:  # the program has ended
                break
            if not chunk:
                break
            got += chunk
        self.seen += got
        return got

    def expect(self, pattern: bytes, timeout: float = 120) -> bytes:
        """What arrives from now on until `pattern` matches it (less the terminal's control
        sequences: readline's switching of bracketed paste on and off, cursor moves)."""
        start, got = time.monotonic(), b""
        while not re.search(pattern, re.sub(rb"\x1b\[[0-9;?]*[A-Za-z]", b"", got)):
            assert time.monotonic() - start < timeout, f"no {pattern!r} in {got[-800:]!r}"
            got += self.read(0.05)
        return got

    def prompt(self) -> bytes:
        """Output until the chat waits at its prompt: "> " last, then silence."""
        got = b""
        while not got.endswith(b"> "):
            got += self.expect(rb"> ")
            got += self.read(0.5)
        return got

    def wait(self) -> int:
        self.read(0.2)
        _, status = os.waitpid(self.pid, 0)
        return os.waitstatus_to_exitcode(status)


UP, CTRL_C, CTRL_D = b"\x1b[A", b"\x03", b"\x04"
PASTE_START, PASTE_END = b"\x1b[200~", b"\x1b[201~"  # what a terminal sends around a paste


@pytest.mark.slow
def test_chat_at_a_terminal(tiny_dir, tmp_path):
    pytest.importorskip("readline")  # without it (Windows) the chat reads plain lines
    state = tmp_path / "state"
    history = state / "mixtral" / "chat_history"
    history.parent.mkdir(parents=True)
    history.write_text('"from an earlier chat"\n"hello there"\n')
    env = {**os.environ, "TERM": "xterm", "XDG_STATE_HOME": str(state)}
    term = Terminal([sys.executable, "-m", "mixtral", "chat", "--model", str(tiny_dir),
                     "--max-tokens", "200", "--temperature", "1"], env)
    banner = term.prompt()
    assert b'"""' in banner and b"/help" in banner and b"Ctrl-C" in banner

    def stop_answer(after: bytes) -> bool:
        """Ctrl-C at the first word of the answer to the message ending in `after`: whether
        it stopped the answer (a short one may have ended before Ctrl-C reached it)."""
        term.expect(re.escape(after) + rb"\r\n[\s\S]*\w")
        term.send(CTRL_C)
        return b"[stopped]" in term.prompt()

    term.send(UP + b"\r")  # the up arrow recalls the last message of an earlier chat
    stop_answer(b"hello there")
    for _ in range(5):
        term.send(b"tell me a story\r")
        if stop_answer(b"story"):
            break
    else:
        pytest.fail(f"every answer ended before Ctrl-C reached it: {term.seen[-3000:]!r}")

    # a paste is one message, and the question after a stopped answer is answered in full
    term.send(PASTE_START + b"first line\rsecond line\rthird line" + PASTE_END + b"\r")
    assert b"[stopped]" not in term.prompt()
    term.send(b"alpha\rbeta\rgamma\r")  # a terminal without bracketed paste: one burst
    stop_answer(b"gamma")
    term.send(b'"""\r')  # a block, typed line by line
    for line in (b"one\r", b"two\r", b'"""\r'):
        term.expect(rb"\.\.\. ")
        term.send(line)
    stop_answer(b'"""')

    term.send(b"never sent" + CTRL_C)  # Ctrl-C at the prompt clears the line
    term.prompt()
    term.send(f"/save {tmp_path / 'a.json'}\r".encode())
    assert b"[saved" in term.prompt()
    term.send(f"/load {tmp_path / 'a.json'}\r".encode())
    assert b"[loaded" in term.prompt()
    term.send(f"/save {tmp_path / 'b.json'}\r".encode())
    term.prompt()
    term.send(f"/load {tmp_path / 'missing.json'}\r".encode())
    assert re.search(rb"\[error: \S+missing.json: no such file; the conversation is unchanged",
                     term.prompt())
    term.send(CTRL_D)
    assert term.wait() == 0

    saved = json.loads((tmp_path / "a.json").read_text())
    assert json.loads((tmp_path / "b.json").read_text()) == saved  # /save, /load round-trip
    assert [m["role"] for m in saved] == ["user", "assistant"] * (len(saved) // 2)
    users = [m["content"] for m in saved[::2]]  # a story asked again if Ctrl-C came late
    assert users[0] == "hello there" and set(users[1:-3]) == {"tell me a story"}
    assert users[-3:] == ["first line\nsecond line\nthird line", "alpha\nbeta\ngamma",
                          "one\ntwo"]
    assert all(m["content"] for m in saved[1::2])  # the stopped answer kept as far as it went
    kept = [json.loads(line) for line in history.read_text().splitlines()]
    assert kept[:2] == ["from an earlier chat", "hello there"]
    assert "first line\nsecond line\nthird line" in kept and "one\ntwo" in kept
    assert "never sent" not in kept and all("never sent" not in m["content"] for m in saved)


def test_chat_from_a_pipe(tiny_dir, tmp_path, monkeypatch, capsys):
    """Piped in, every line is a message, except in a \"\"\" block; a bad /load is one line
    and the conversation goes on."""
    from mixtral.cli import main

    (tmp_path / "not.json").write_text("[{")
    script = "\n".join(['"""', "line 1", "line 2", '"""', f"/load {tmp_path / 'not.json'}",
                        "/lod typo", "next", f"/save {tmp_path / 'out.json'}", "/exit", "ignored"])
    monkeypatch.setattr(sys, "stdin", io.StringIO(script + "\n"))
    assert main(["chat", "--model", str(tiny_dir), "--max-tokens", "3", "--seed", "1"]) == 0
    err = capsys.readouterr().err
    assert f"[error: {tmp_path / 'not.json'}: not JSON (" in err
    assert "[unknown command /lod; /help lists the commands]" in err
    saved = json.loads((tmp_path / "out.json").read_text())
    assert [(m["role"], m["content"]) for m in saved[::2]] == [("user", "line 1\nline 2"),
                                                                ("user", "next")]


@pytest.mark.parametrize("content, wanted", [
    (None, "no such file"),
    ("", "not JSON (Expecting value, line 1)"),
    (b"\xff\xfe", "not UTF-8 text"),
    ('{"role": "user", "content": "hi"}', "expected a list of messages"),
    ('[{"role": "robot", "content": "hi"}]', "message 0 needs a role, one of system, user"),
    ('[{"role": "user", "content": "hi"}, {"role": "assistant"}]',
     "message 1 (assistant) needs its content as text"),
])
def test_load_refuses_a_bad_file(tmp_path, content, wanted):
    path = tmp_path / "chat.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=re.escape(f"{path}: {wanted}")):
        read_messages(path)
    with pytest.raises(ValueError, match="is a directory"):
        read_messages(tmp_path)


def test_load_reads_a_request_body_too(tmp_path):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    (tmp_path / "request.json").write_text(json.dumps({"model": "m", "messages": messages}))
    assert read_messages(tmp_path / "request.json") == messages


class FakeReadline:
    """readline's history calls, without a terminal."""

    def __init__(self) -> None:
        self.entries: list[str] = []

    def add_history(self, text: str) -> None:
        self.entries.append(text)

    def get_current_history_length(self) -> int:
        return len(self.entries)

    def get_history_item(self, index: int) -> str:  # 1-based, as readline's
        return self.entries[index - 1]


def test_history_file_round_trip(tmp_path):
    path = tmp_path / "state" / "mixtral" / "chat_history"
    first = FakeReadline()
    history = History(first, path)  # type: ignore[arg-type]
    assert not path.exists()  # made when the first message is sent
    for text in ("one", "two\nlines", "two\nlines", "  ", "three"):
        history.add(text)
    assert first.entries == ["one", "two\nlines", "three"]  # a repeat and a blank are not kept
    with path.open("a") as f:
        f.write('"cut sh')  # a crash mid-write loses that line only
    later = FakeReadline()
    History(later, path)  # type: ignore[arg-type]
    assert later.entries == ["one", "two\nlines", "three"]


def test_history_that_cannot_be_kept_never_stops_the_chat(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    readline = FakeReadline()
    history = History(readline, tmp_path / "file" / "chat_history")  # type: ignore[arg-type]
    history.add("one")
    history.add("two")
    err = capsys.readouterr().err
    assert err.count("[history not kept: ") == 1 and "Not a directory" in err  # said once
    assert readline.entries == ["one", "two"]  # recalled in this chat all the same
