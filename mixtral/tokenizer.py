"""The Mixtral-8x7B tokenizer (SentencePiece v1, 32000 pieces) through mistral-common, and an
incremental decoder for streaming.

mistral-common ships the exact file (`tokenizer.model.v1`, the same bytes as the hub's
`tokenizer.model`), so nothing is downloaded. Text a user types is always encoded as text:
`"</s>"` becomes the pieces `</`, `s`, `>`, never the end-of-sequence id.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from types import MappingProxyType

from mistral_common.tokens.tokenizers.mistral import MistralTokenizer


class Tokenizer:
    def __init__(self, mistral: MistralTokenizer) -> None:
        self.mistral = mistral  # used by chat.py for the instruct encoding
        self._sp = mistral.instruct_tokenizer.tokenizer
        self._pieces: tuple[str, ...] | None = None  # both read once, on first use
        self._twins: Mapping[int, int] | None = None

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id

    @property
    def vocab_size(self) -> int:
        return self._sp.n_words

    @property
    def model_file(self) -> Path:
        """The SentencePiece model file (for tools that read the vocabulary themselves)."""
        return Path(self._sp.file_path)

    @property
    def special_ids(self) -> set[int]:
        return self._sp.special_ids

    def pieces(self) -> tuple[str, ...]:
        """The vocabulary's pieces in id order (`\u2581` marks a piece that starts a word)."""
        if self._pieces is None:
            self._pieces = tuple(self._sp.vocab())
        return self._pieces

    def twins(self) -> Mapping[int, int]:
        """Each piece that starts a word (`\u2581X`) -> its twin without the space (`X`), for
        the pieces whose twin is in the vocabulary: the piece a copy of a word writes after a
        quote, where no space comes before it."""
        if self._twins is None:
            pieces = self.pieces()
            ids = {p: i for i, p in enumerate(pieces)}
            self._twins = MappingProxyType({i: ids[p[1:]] for i, p in enumerate(pieces)
                                            if p.startswith("\u2581") and p[1:] in ids})
        return self._twins

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        return self._sp.encode(text, bos=bos, eos=eos)

    def decode(self, ids: list[int]) -> str:
        """Text of ids; BOS/EOS are dropped and the first piece's leading space is not emitted."""
        return self._sp.decode(ids)


@lru_cache(maxsize=1)
def default_tokenizer() -> Tokenizer:
    return Tokenizer(MistralTokenizer.v1())


class StreamDecoder:
    """Turns token ids, pushed one at a time, into text deltas that are always whole UTF-8
    characters and concatenate to exactly `decode(all ids)`.

    SentencePiece drops the leading space of the first piece it decodes, and byte-fallback
    pieces decode to U+FFFD until their character is complete. So each step decodes a short
    window [prefix, end) twice — with and without the new ids — and emits the difference,
    holding it back while it ends in U+FFFD. The window keeps the cost per token constant.
    """

    def __init__(self, tokenizer: Tokenizer, context: list[int] | None = None) -> None:
        """context: ids already shown to the user (an assistant prefix being continued), so
        that the first new piece keeps its leading space."""
        self.tokenizer = tokenizer
        self.ids: list[int] = list(context or [])
        self.prefix = 0  # window start
        self.read = len(self.ids)  # ids up to here have been emitted as text
        self.text = ""  # everything emitted so far

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        return self._emit(final=False)

    def flush(self) -> str:
        """Emit whatever is held back (an incomplete character decodes as U+FFFD)."""
        return self._emit(final=True) if self.read < len(self.ids) else ""

    def _emit(self, final: bool) -> str:
        decode = self.tokenizer.decode
        now = decode(self.ids[self.prefix:])
        if now.endswith("\ufffd") and not final:
            return ""  # wait for the rest of the character
        seen = decode(self.ids[self.prefix:self.read])
        if now.startswith(seen):
            delta = now[len(seen):]
        else:  # a window that starts mid-sequence can decode differently: use the whole text
            full = decode(self.ids)
            delta = full[len(self.text):] if full.startswith(self.text) else ""
        # SentencePiece strips the space of a window's first *text* piece, so a window must not
        # start at BOS/EOS (the next piece would lose a space the full text keeps)
        if self.ids[self.read] not in self.tokenizer.special_ids:
            self.prefix = self.read
        self.read = len(self.ids)
        self.text += delta
        return delta
