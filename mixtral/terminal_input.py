"""What `mixtral chat` reads: one message at a time, typed at a terminal or piped in.

At a terminal (stdin and stdout both ttys, where Python has GNU readline) a line is edited
with readline, and the messages sent are kept as history that the up arrow recalls, across
sessions too: one JSON string per line in $XDG_STATE_HOME/mixtral/chat_history (by default
~/.local/state/mixtral/chat_history), created when the first message is sent. A history file
that cannot be read or written is noted once and never stops the chat.

A message may take several lines:
  a paste    readline's bracketed paste puts a pasted text into the line whole, newlines and
             all, and Enter sends it; a terminal without bracketed paste sends the lines in
             one burst, so lines already waiting when one is read (within PASTE_WAIT, faster
             than anyone types) belong to the same message
  a block    a line holding only \"\"\" starts one and the next such line sends it
From a pipe every line is a message (a script's turns stay its turns); blocks work there too.
"""

from __future__ import annotations

import json
import os
import select
import signal
import sys
import threading
from pathlib import Path
from types import ModuleType

BLOCK = '"""'
PROMPT, CONTINUED = "> ", "... "
PASTE_WAIT = 0.03  # seconds; a person needs ten times that between two Enters
HISTORY_LENGTH = 1000  # entries recalled; the file is cut back to these past twice as many


def history_path() -> Path:
    """Where the chat keeps its history (the XDG base directory for state)."""
    state = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(state) / "mixtral" / "chat_history"


class MessageReader:
    """Reads messages from sys.stdin: `read()` until it returns None."""

    def __init__(self, history: Path | None = None) -> None:
        self.readline = _readline() if sys.stdin.isatty() and sys.stdout.isatty() else None
        self.interactive = sys.stdin.isatty()
        if self.interactive and threading.current_thread() is threading.main_thread():
            # Ctrl-C stops an answer or clears the line: take it back where it was ignored,
            # as a shell's background job (and whatever it starts) ignores it
            signal.signal(signal.SIGINT, signal.default_int_handler)
        self.history = History(self.readline, history) if self.readline is not None else None

    def read(self) -> str | None:
        """The next message, or a command such as "/save x.json" ("" when Ctrl-C cleared the
        line or a block was empty); None at the end of the input (Ctrl-D at the prompt)."""
        try:
            first = self._line(PROMPT)
            if first is None:
                return None
            if first.strip() == BLOCK:
                lines = self._block()
            else:
                lines = [first, *self._pasted()]
        except KeyboardInterrupt:  # Ctrl-C clears the line (or the block) and asks again
            print(file=sys.stderr)
            return ""
        text = "\n".join(lines).strip("\n")
        if self.history is not None:
            self.history.add(text)
        return text

    def _line(self, prompt: str) -> str | None:
        try:
            return input(prompt if self.interactive else "")
        except EOFError:
            return None

    def _block(self) -> list[str]:
        lines = []  # Ctrl-D ends a block too: it is sent, and the next read sees the end
        while (line := self._line(CONTINUED)) is not None and line.strip() != BLOCK:
            lines.append(line)
        return lines

    def _pasted(self) -> list[str]:
        """The lines of a paste that arrived together with the line just read."""
        lines: list[str] = []
        if self.readline is None:  # a pipe: one line, one message
            return lines
        while select.select([sys.stdin], [], [], PASTE_WAIT)[0]:
            line = self._line("")
            if line is None:
                break
            lines.append(line)
        return lines


class History:
    """The messages sent, in readline's history (the up arrow) and, when `path` is given, in
    that file (one JSON string per line, since a message may span lines) for later chats."""

    def __init__(self, readline: ModuleType, path: Path | None) -> None:
        self.readline, self.path = readline, path
        self.load()

    def load(self) -> None:
        if self.path is None:
            return
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return
        except (OSError, UnicodeDecodeError) as e:
            return self._lost(e)
        entries = []
        for line in lines:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash: the others still count
            if isinstance(entry, str):
                entries.append(entry)
        for entry in entries[-HISTORY_LENGTH:]:
            self.readline.add_history(entry)
        if len(lines) > 2 * HISTORY_LENGTH:  # appended to forever otherwise
            kept = "".join(json.dumps(e, ensure_ascii=False) + "\n"
                           for e in entries[-HISTORY_LENGTH:])
            try:
                self.path.write_text(kept, encoding="utf-8")
            except OSError as e:
                self._lost(e)

    def add(self, text: str) -> None:
        if not text.strip():
            return
        length = self.readline.get_current_history_length()
        if length and self.readline.get_history_item(length) == text:
            return  # the same message again (the up arrow, Enter) is one entry
        self.readline.add_history(text)
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(text, ensure_ascii=False) + "\n")
        except OSError as e:
            self._lost(e)

    def _lost(self, error: Exception) -> None:
        print(f"[history not kept: {self.path}: {getattr(error, 'strerror', None) or error}]",
              file=sys.stderr)
        self.path = None  # said once; the chat goes on


def _readline() -> ModuleType | None:
    """GNU readline, set up for a chat: input() then edits lines and recalls history."""
    try:
        import readline
    except ImportError:  # Windows, or a Python built without it: plain input()
        return None
    if "libedit" not in (readline.__doc__ or ""):  # libedit (macOS) reads other settings
        # Python turns bracketed paste off (its own prompt cannot take a pasted block); a chat
        # message can, and this is how a pasted text arrives whole
        readline.parse_and_bind("set enable-bracketed-paste on")
        readline.parse_and_bind("tab: tab-insert")  # no completion: Tab is text in a message
    readline.set_auto_history(False)  # _remember adds whole messages, not each line of a paste
    return readline
