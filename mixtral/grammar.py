"""JSON mode: constrained decoding with llguidance, so that any model's answer is valid JSON.

llguidance (the engine behind guidance, and mistral-common's own choice) was measured against
xgrammar and outlines-core on this tokenizer (benchmarks/RESULTS.md): a 3 MB wheel with no
dependencies, ~0.7 ms to compile a schema, ~5-20 µs per token, and the only one of the three
with no invalid output. This module adapts Mixtral's SentencePiece vocabulary to it and turns a
matcher into the decode loop's `TokenConstraint`.

Near the end of the token budget the constraint closes the document: it narrows the choice to
the allowed token that finishes soonest (`"` inside a string; else `}`, `]`, `0`, `"`), so even a
random-weights model returns JSON that parses instead of a truncated object.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import llguidance
import sentencepiece
import torch
from torch import Tensor

from mixtral.tokenizer import Tokenizer

SPACE = "\u2581"  # SentencePiece's word-boundary mark
# Whitespace between JSON tokens: a real model pretty-prints, so allow some, but bounded,
# or a random model spends its budget on newlines.
FORMAT = {"whitespace_pattern": r"[\x20\x0A\x0D\x09]{0,12}"}
CLOSE_WITHIN = 32  # tokens left when the constraint starts closing the document
# llguidance builds a regex's repetitions lazily, and fails mid-answer ("too many expressions
# constructed") once a pattern must repeat ~50k times (a{30000} works, a{50000} does not); such
# schemas are refused up front. A JSON string that long would not fit most budgets anyway.
MAX_PATTERN_REPEAT = 10_000


class _Vocabulary:
    """What llguidance.TokenizerWrapper reads: each piece's bytes, specials and a tokenizer."""

    def __init__(self, sp: sentencepiece.SentencePieceProcessor, eos: int, bos: int) -> None:
        self.sp = sp
        self.eos_token_id, self.bos_token_id = eos, bos
        self.special_token_ids = [i for i in range(sp.get_piece_size())
                                  if sp.is_control(i) or sp.is_unknown(i)]
        tokens = []
        for i in range(sp.get_piece_size()):
            piece = sp.id_to_piece(i)
            if i in self.special_token_ids:
                tokens.append(b"\xff" + piece.encode())  # llguidance's mark for special tokens
            elif sp.is_byte(i):
                tokens.append(bytes([int(piece[3:5], 16)]))  # <0xNN>
            else:
                tokens.append(piece.replace(SPACE, " ").encode())
        self.tokens = tokens
        self.blank = torch.tensor([bool(t) and not t.strip() for t in tokens])  # whitespace only

    def __call__(self, text: str | bytes) -> list[int]:
        """Tokenize text that continues a stream: without SentencePiece's dummy-prefix space
        (which encode always adds, even before text that starts with a space). The pieces'
        bytes must spell the text exactly (llguidance forces these tokens): where
        SentencePiece's normalizing would change it (a literal "\u2581", which it reads as a
        space; NFKC's folds), the text is spelt in byte-fallback pieces instead."""
        data = text if isinstance(text, bytes) else text.encode("utf-8", errors="surrogatepass")
        ids = self._pieces(data.decode("utf-8", errors="replace"))
        return ids if b"".join(self.tokens[i] for i in ids) == data else _byte_pieces(data)

    def _pieces(self, text: str) -> list[int]:
        ids = self.sp.encode(text)
        if not ids:
            return ids
        first = self.sp.id_to_piece(ids[0])
        if first == SPACE:
            return ids[1:]
        if first.startswith(SPACE):
            rest = first[1:]
            rid = self.sp.piece_to_id(rest)
            head = [rid] if self.sp.id_to_piece(rid) == rest and not self.sp.is_unknown(rid) \
                else _byte_pieces(rest.encode())
            return head + ids[1:]
        return ids


def _byte_pieces(data: bytes) -> list[int]:
    """The byte-fallback pieces <0x00>..<0xFF> spelling `data` (their ids start at 3)."""
    return [3 + b for b in data]


class JsonConstraint:
    """One per answer: which tokens keep the output valid JSON (for the schema)."""

    def __init__(self, tokenizer: llguidance.LLTokenizer, grammar: str, vocab: _Vocabulary,
                 closers: dict[str, int]) -> None:
        self.matcher = llguidance.LLMatcher(tokenizer, grammar)
        if self.matcher.is_error():
            raise ValueError(self.matcher.get_error())
        self.vocab = vocab
        c = closers
        self.closers_in_string = [c["eos"], c['"']]
        self.closers_outside = [c["eos"], c["}"], c["]"], c["0"], c['"'], c[":"], c[","]]
        self.in_string = self.escaped = False  # where the JSON text so far ends
        self._bits = 1 << torch.arange(8, dtype=torch.uint8)

    def allowed(self, remaining: int | None = None) -> Tensor:
        words = torch.frombuffer(bytearray(self.matcher.compute_bitmask()), dtype=torch.uint8)
        mask = ((words[:, None] & self._bits) != 0).flatten()[:len(self.vocab.tokens)]  # [V]
        if remaining is not None and remaining <= CLOSE_WITHIN:
            closers = self.closers_in_string if self.in_string else self.closers_outside
            forced = self.matcher.compute_ff_tokens()  # e.g. the rest of a required key
            for token in [*closers, *forced[:1]]:  # finish the document while tokens are left
                if mask[token]:
                    only = torch.zeros_like(mask)
                    only[token] = True
                    return only
            text = mask & ~self.vocab.blank  # no more whitespace, if anything else is allowed
            return text if text.any() else mask
        return mask

    def can_start(self) -> bool:
        """Whether any text can begin the answer: a schema that admits no value at all (e.g.
        {"$ref": "#"}) allows only the leading space and the end, which would answer ""."""
        text = self.allowed() & ~self.vocab.blank
        text[self.vocab.special_token_ids] = False
        return bool(text.any())

    def advance(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise RuntimeError(f"JSON grammar rejected token {token}: {self.matcher.get_error()}")
        if token in self.vocab.special_token_ids:
            return
        for byte in self.vocab.tokens[token]:  # follow string boundaries in the text
            if self.escaped:
                self.escaped = False
            elif self.in_string and byte == 0x5C:  # backslash
                self.escaped = True
            elif byte == 0x22:  # quote
                self.in_string = not self.in_string


def _least_repeats(pattern: str) -> int:
    """How many atoms any match of `pattern` must have, by its repetition lower bounds (what
    the grammar engine must expand); 0 if Python cannot parse it (llguidance then judges)."""
    from re import _parser  # type: ignore[attr-defined]  # the stdlib's own regex parser

    try:
        parsed = _parser.parse(pattern)
    except (re.error, RecursionError, OverflowError):
        return 0

    def size(items: Any) -> int:
        total = 0
        for op, arg in items:
            if op in (_parser.MAX_REPEAT, _parser.MIN_REPEAT, _parser.POSSESSIVE_REPEAT):
                total += arg[0] * size(arg[2])
            elif op is _parser.SUBPATTERN:
                total += size(arg[3])
            elif op is _parser.BRANCH:
                total += min(size(b) for b in arg[1])
            else:
                total += 1
        return total

    return size(parsed)


def _check_patterns(schema: Any) -> None:
    """ValueError for a regular expression in the schema that the grammar engine would fail
    on in the middle of an answer (see MAX_PATTERN_REPEAT)."""
    if isinstance(schema, list):
        for item in schema:
            _check_patterns(item)
    if not isinstance(schema, dict):
        return
    patterns = [schema["pattern"]] if isinstance(schema.get("pattern"), str) else []
    if isinstance(schema.get("patternProperties"), dict):
        patterns += list(schema["patternProperties"])
    for pattern in patterns:
        if _least_repeats(pattern) > MAX_PATTERN_REPEAT:
            shown = pattern if len(pattern) <= 60 else pattern[:60] + "..."
            raise ValueError(f"the pattern {shown!r} repeats more than {MAX_PATTERN_REPEAT} "
                             "times, which JSON mode cannot follow")
    for value in schema.values():
        _check_patterns(value)


def json_constraint_factory(tokenizer: Tokenizer) -> Callable[[dict[str, Any] | None],
                                                              JsonConstraint]:
    """-> make(schema): a fresh constraint for a JSON schema, or any JSON object for None.
    make raises ValueError for a schema llguidance cannot compile."""
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer.model_file))
    vocab = _Vocabulary(sp, tokenizer.eos_id, tokenizer.bos_id)
    lltok = llguidance.LLTokenizer(llguidance.TokenizerWrapper(vocab),
                                   n_vocab=sp.get_piece_size(), eos_token=tokenizer.eos_id)
    closers = {"eos": tokenizer.eos_id,
               **{p: sp.piece_to_id(p) for p in ("}", "]", '"', "0", ":", ",")}}

    def make(schema: dict[str, Any] | None) -> JsonConstraint:
        schema = dict(schema) if schema is not None else {"type": "object"}
        _check_patterns(schema)
        schema.setdefault("x-guidance", FORMAT)
        # the answer's first piece is usually "▁{": allow the one space SentencePiece adds
        grammar = 'start: " "? answer\nanswer: %json ' + json.dumps(schema)
        error = llguidance.LLMatcher.validate_grammar(grammar, lltok)
        if error:
            raise ValueError(f"cannot use this JSON schema: {error}")
        constraint = JsonConstraint(lltok, grammar, vocab, closers)
        if not constraint.can_start():
            raise ValueError("the schema admits no JSON value (a $ref to itself and nothing "
                             "else?)")
        return constraint

    return make
