"""The three grammar libraries behind one small interface, for benchmarks/grammar_engines.py:
Mixtral's v1 SentencePiece vocabulary as each library wants it (raw bytes per piece, or an
encode without SentencePiece's dummy prefix) and an adapter per library that compiles a
grammar, fills a decode step's bitmask and advances its matcher.

They live apart from the benchmark so that it reads top to bottom as what is measured; the
libraries are imported inside the adapters, so a machine with one of them runs that one.
"""
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import mistral_common
import sentencepiece as spm
import torch

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions  # declared in its stub only

SP_PATH = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
V = 32000
UNK, BOS, EOS = 0, 1, 2

# --------------------------------------------------------------------------- vocab
def load_sp_vocab() -> tuple[spm.SentencePieceProcessor, list[bytes | None]]:
    """Return (sp, token_bytes) where token_bytes[i] is the raw bytes of piece i,
    or None for special/control pieces (unk, <s>, </s>)."""
    sp = spm.SentencePieceProcessor(model_file=str(SP_PATH))
    assert sp.get_piece_size() == V
    toks: list[bytes | None] = []
    for i in range(V):
        p = sp.id_to_piece(i)
        if sp.is_control(i) or sp.is_unknown(i):
            toks.append(None)
        elif sp.is_byte(i):  # <0xNN>
            toks.append(bytes([int(p[3:5], 16)]))
        else:
            toks.append(p.replace("\u2581", " ").encode("utf-8"))
    assert toks[UNK] is None and toks[BOS] is None and toks[EOS] is None
    assert toks[3] == b"\x00" and toks[258] == b"\xff"
    return sp, toks


def sp_encode_no_prefix(sp: spm.SentencePieceProcessor, s: str) -> list[int]:
    """SentencePiece encode WITHOUT the dummy-prefix '▁' that Mixtral's model adds to
    every encode() call (even when s already starts with a space: ' {' -> ['▁', '▁{']).
    llguidance calls this to tokenize grammar literals mid-stream, so the extra '▁'
    must go, otherwise its forced-token masks are wrong."""
    ids = sp.encode(s)
    if ids:
        first = sp.id_to_piece(ids[0])
        if first == "\u2581":
            ids = ids[1:]
        elif first.startswith("\u2581"):
            rest = first[1:]
            rid = sp.piece_to_id(rest)
            if rid != UNK and sp.id_to_piece(rid) == rest:
                ids = [rid] + ids[1:]
            else:  # rare: remainder is not a piece -> byte-fallback tokens
                ids = [3 + b for b in rest.encode("utf-8")] + ids[1:]
    return ids


# --------------------------------------------------------------------------- engines
class Engine(Protocol):
    """What the benchmark needs of each library's adapter (the classes below); the compiled
    grammars and matchers are the libraries' own objects."""

    name: str
    tok_build_s: float

    def compile(self, kind: str, schema: dict[str, Any]) -> Any: ...

    def matcher(self, compiled: Any) -> Any: ...

    def fill(self, m: Any, bm: torch.Tensor) -> None: ...

    def advance(self, m: Any, t: int) -> bool: ...

    def done(self, m: Any) -> bool: ...


class LLGuidanceEngine:
    name = "llguidance"

    def __init__(self, sp: spm.SentencePieceProcessor, toks: list[bytes | None],
                 flexible_ws: bool = True) -> None:
        import llguidance
        import llguidance.torch as llt

        self.llg, self.llt = llguidance, llt
        self.flexible_ws = flexible_ws

        class _SPTok:  # duck-typed object for llguidance.TokenizerWrapper
            eos_token_id = EOS
            bos_token_id = BOS
            # specials get the 0xFF prefix (convention of llguidance's llama.cpp adapter)
            tokens = [t if t is not None else b"\xff" + sp.id_to_piece(i).encode()
                      for i, t in enumerate(toks)]
            special_token_ids = [UNK, BOS, EOS]

            def __call__(self, s: str | bytes) -> list[int]:
                if isinstance(s, bytes):
                    s = s.decode("utf-8", errors="replace")
                return sp_encode_no_prefix(sp, s)

        t0 = time.perf_counter()
        self.tok = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_SPTok()), n_vocab=V,
                                          eos_token=EOS)
        self.tok_build_s = time.perf_counter() - t0

    def compile(self, kind: str, schema: dict[str, Any]) -> Any:
        opts: JsonCompileOptions | None = None if self.flexible_ws else {
            "whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
        if kind == "schema_lead":
            sch = dict(schema, **({"x-guidance": opts} if opts else {}))
            g = self.llg.LLMatcher.grammar_from_lark('start: " "? obj\nobj: %json '
                                                     + json.dumps(sch))
        else:
            g = self.llg.LLMatcher.grammar_from_json_schema(schema, overrides=opts)
        m = self.llg.LLMatcher(self.tok, g)  # lexer/grammar built here
        if m.is_error():
            raise RuntimeError(m.get_error())
        return g

    def matcher(self, compiled: Any) -> Any:
        return self.llg.LLMatcher(self.tok, compiled)

    def fill(self, m: Any, bm: torch.Tensor) -> None:
        self.llt.fill_next_token_bitmask(m, bm)

    def advance(self, m: Any, t: int) -> bool:
        ok = m.consume_token(t)
        return ok and not m.is_error()

    def done(self, m: Any) -> bool:
        return m.is_stopped()


class XGrammarEngine:
    name = "xgrammar"

    def __init__(self, sp: spm.SentencePieceProcessor, toks: list[bytes | None],
                 flexible_ws: bool = True) -> None:
        import xgrammar as xgr

        self.xgr = xgr
        self.flexible_ws = flexible_ws
        # RAW vocab of bytes; specials as b"" and EOS given explicitly
        enc = [t if t is not None else b"" for t in toks]
        t0 = time.perf_counter()
        self.info = xgr.TokenizerInfo(enc, xgr.VocabType.RAW, vocab_size=V,
                                      stop_token_ids=[EOS], add_prefix_space=True)
        self.tok_build_s = time.perf_counter() - t0

    def compile(self, kind: str, schema: dict[str, Any]) -> Any:
        # fresh compiler with cache disabled so repeated compiles are really measured
        c = self.xgr.GrammarCompiler(self.info, max_threads=2, cache_enabled=False)
        kw = {} if self.flexible_ws else {"any_whitespace": False, "separators": (", ", ": ")}
        # (builtin JSON grammar accepts any JSON value; json_object uses schema {"type":"object"})
        if kind == "schema_lead":
            xg = self.xgr.Grammar
            return c.compile_grammar(xg.concat(xg.from_ebnf('root ::= "" | " "'),
                                               xg.from_json_schema(json.dumps(schema), **kw)))
        return c.compile_json_schema(schema, **kw)

    def matcher(self, compiled: Any) -> Any:
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, m: Any, bm: torch.Tensor) -> None:
        m.fill_next_token_bitmask(bm)

    def advance(self, m: Any, t: int) -> bool:
        return m.accept_token(t)

    def done(self, m: Any) -> bool:
        return m.is_terminated()


class OutlinesCoreEngine:
    name = "outlines-core"

    def __init__(self, sp: spm.SentencePieceProcessor, toks: list[bytes | None],
                 flexible_ws: bool = True) -> None:
        import outlines_core as oc

        self.oc = oc
        self.flexible_ws = flexible_ws
        t0 = time.perf_counter()
        m: dict[bytes, list[int]] = {}
        for i, t in enumerate(toks):
            if t is None:
                continue
            m.setdefault(t, []).append(i)  # ' ' maps to both '▁' and <0x20>
        self.vocab = oc.Vocabulary(EOS, m)
        self.tok_build_s = time.perf_counter() - t0

    def compile(self, kind: str, schema: dict[str, Any]) -> Any:
        # outlines-core is regex-only: {"type":"object"} becomes a depth-bounded regex
        regex = self.oc.json_schema.build_regex_from_schema(json.dumps(schema))
        if kind == "schema_lead":
            regex = "[ ]?" + regex
        return self.oc.Index(regex, self.vocab)

    def matcher(self, compiled: Any) -> Any:
        return self.oc.Guide(compiled)

    def fill(self, m: Any, bm: torch.Tensor) -> None:
        m.write_mask_into(bm.data_ptr(), bm.numel(), 4)

    def advance(self, m: Any, t: int) -> bool:
        if t == EOS:
            return m.is_finished()
        m.advance(t, return_tokens=False)
        return True

    def done(self, m: Any) -> bool:
        return False  # outlines-core never forces a stop; EOS is sampled when allowed


ENGINES: dict[str, Callable[..., Engine]] = {
    "llguidance": LLGuidanceEngine, "xgrammar": XGrammarEngine,
    "outlines-core": OutlinesCoreEngine}
