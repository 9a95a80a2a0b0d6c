"""The conversation of `mixtral chat`: messages in, streamed answers out, and the slash
commands (/help lists them) that reset, save and load it.

The conversation is kept as the chat API's messages (`[{"role": ..., "content": ...}]`): /save
writes what a request to the API takes as its `messages`, and /load reads it back (a request
body too). Ctrl-C while an answer is being written stops it: what was written stays in the
conversation as the assistant's turn (the user saw it, and the web page keeps a stopped answer
too); an answer stopped before any text drops its question, since a turn without an answer
would merge into the next question.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from mixtral import chat
from mixtral.completion import stream
from mixtral.generate import GenerationParams
from mixtral.model import Transformer
from mixtral.terminal_input import BLOCK, MessageReader, history_path
from mixtral.tokenizer import Tokenizer

BANNER = (f"Chat with Mixtral. Enter sends; a paste is one message; {BLOCK} on a line of its "
          f"own starts and ends a message of several lines. Ctrl-C stops an answer, Ctrl-D "
          "quits, /help lists the commands.")

HELP = f"""\
/help          this list
/reset         start over (the --system prompt stays)
/save PATH     write the conversation as JSON messages: [{{"role": ..., "content": ...}}]
/load PATH     continue a conversation written by /save (or any such list)
/exit, /quit   leave (Ctrl-D at an empty prompt too)
{BLOCK}            alone on a line: starts a message of several lines; the next {BLOCK} sends it
Ctrl-C         stops the answer being written (the text so far is kept); at the prompt, clears
               the line
Up, Down       recall earlier messages (kept in {history_path()})"""

COMMAND = re.compile(r"/([a-z]+)(?:\s+(.*))?", re.DOTALL)


class Chat:
    """One conversation with `model`: `run()` until the input ends or /exit."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, params: GenerationParams,
                 system: list[dict[str, Any]], safe_prompt: bool = False,
                 speak: bool = True) -> None:
        # speak: under --tp/--ep every rank runs the same chat; only the leader (rank 0) prints
        self.model, self.tokenizer, self.params, self.speak = model, tokenizer, params, speak
        self.system, self.safe_prompt = system, safe_prompt
        self.messages = list(system)
        self.commands: dict[str, Callable[[str], bool]] = {
            "help": self.help, "reset": self.reset, "save": self.save, "load": self.load,
            "exit": self.exit, "quit": self.exit}

    def run(self, reader: MessageReader) -> None:
        if reader.interactive and self.speak:
            note(BANNER)
        while (text := reader.read()) is not None:
            command = COMMAND.fullmatch(text.strip()) if "\n" not in text.strip() else None
            if command and command[1] in self.commands:
                if not self.commands[command[1]]((command[2] or "").strip()):
                    return
            elif command:
                note(f"[unknown command /{command[1]}; /help lists the commands]")
            elif text.strip():
                self.answer(text)

    def answer(self, text: str) -> None:
        """Stream the model's answer to `text`, the conversation so far before it."""
        self.messages.append({"role": "user", "content": text})
        reply: list[str] = []
        try:
            prompt = chat.encode(self.messages, self.safe_prompt, self.tokenizer)
            room = self.model.args.max_seq_len - len(prompt)  # answer within what is left
            wanted = room if self.params.max_tokens is None else self.params.max_tokens
            params = replace(self.params, max_tokens=min(wanted, max(room, 1)))
            for delta in stream(self.model, self.tokenizer, prompt, params):
                reply.append(delta.text)
                if self.speak:
                    print(delta.text, end="", flush=True)
            if self.speak:
                print()
        except KeyboardInterrupt:  # stop this answer, keep the conversation
            if self.speak:
                print()
                note("[stopped]")
        except ValueError as e:  # e.g. the conversation no longer fits the context
            note(f"[error: {e}; /reset to start over]")
        if reply_text := "".join(reply):  # an empty turn is invalid; the user turns merge
            self.messages.append({"role": "assistant", "content": reply_text})
        else:
            self.messages.pop()

    # --- the slash commands: each returns whether the chat goes on ---------------------------

    def help(self, argument: str) -> bool:
        note(HELP)
        return True

    def reset(self, argument: str) -> bool:
        self.messages = list(self.system)
        note("[conversation reset]")
        return True

    def save(self, argument: str) -> bool:
        if not argument:
            note("[/save needs a file: /save PATH]")
            return True
        path = Path(argument).expanduser()
        try:
            path.write_text(json.dumps(self.messages, ensure_ascii=False, indent=2) + "\n",
                            encoding="utf-8")
        except OSError as e:
            note(f"[error: cannot write {path}: {e.strerror or e}]")
            return True
        note(f"[saved {len(self.messages)} messages to {path}]")
        return True

    def load(self, argument: str) -> bool:
        if not argument:
            note("[/load needs a file: /load PATH]")
            return True
        try:
            self.messages = read_messages(Path(argument).expanduser())
        except ValueError as e:
            note(f"[error: {e}; the conversation is unchanged]")
            return True
        note(f"[loaded {len(self.messages)} messages from {argument}]")
        return True

    def exit(self, argument: str) -> bool:
        return False


def read_messages(path: Path) -> list[dict[str, Any]]:
    """A conversation from a JSON file: a list of {"role", "content"} messages, or a chat
    request's {"messages": [...]}. ValueError, naming the file and what is wrong, otherwise."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except OSError as e:
        raise ValueError(f"{path}: {(e.strerror or str(e)).lower()}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e.msg}, line {e.lineno})") from None
    if isinstance(data, dict) and "messages" in data:
        data = data["messages"]
    if not isinstance(data, list):
        raise ValueError(f'{path}: expected a list of messages [{{"role": ..., "content": ...}}]')
    for i, m in enumerate(data):
        if not isinstance(m, dict) or m.get("role") not in chat.ROLES:
            raise ValueError(f"{path}: message {i} needs a role, one of {', '.join(chat.ROLES)}")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"{path}: message {i} ({m['role']}) needs its content as text")
    return [{"role": m["role"], "content": m["content"]} for m in data]


def note(text: str) -> None:
    """What the chat says about itself goes to stderr: stdout holds only the answers."""
    print(text, file=sys.stderr, flush=True)
