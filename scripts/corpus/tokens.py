"""Mixtral v1 token counts for the manifest (optional: needs ``mistral-common``).

Files up to ``TOKEN_EXACT_MAX_BYTES`` are counted exactly, document by document; larger ones are
estimated from evenly spaced windows, and the manifest says which method gave each count.
"""

from __future__ import annotations

from typing import Any

from .text import log

TOKEN_EXACT_MAX_BYTES = 2_000_000  # larger files get a sample-based token estimate
TOKEN_SAMPLE_WINDOWS = 24
TOKEN_WINDOW_CHARS = 48_000


class TokenCounter:
    """Counts Mixtral v1 tokens per document; large files are estimated from a sample."""

    def __init__(self, enabled: bool) -> None:
        self.tokenizer: Any = None
        self.description = "disabled (--no-tokens)"
        if not enabled:
            return
        try:
            import mistral_common
            from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

            self.tokenizer = MistralTokenizer.v1().instruct_tokenizer.tokenizer
            self.description = (
                f"mistral-common {mistral_common.__version__} MistralTokenizer.v1(), "
                "encode(doc, bos=False, eos=False) per document"
            )
        except Exception as exc:  # token counts are optional
            self.description = f"unavailable: {type(exc).__name__}: {exc}"
            log(f"warning: no token counts: {self.description}")

    def encode_len(self, text: str) -> int:
        return len(self.tokenizer.encode(text, bos=False, eos=False))

    def count(self, text: str) -> dict[str, Any]:
        if self.tokenizer is None or not text:
            return {"tokens": None if self.tokenizer is None else 0, "tokens_method": "none"}
        if len(text.encode()) <= TOKEN_EXACT_MAX_BYTES:
            return {
                "tokens": sum(map(self.encode_len, text.split("\n\n\n"))),
                "tokens_method": "exact",
            }
        sampled_chars = sampled_tokens = 0
        for i in range(TOKEN_SAMPLE_WINDOWS):
            start = len(text) * i // TOKEN_SAMPLE_WINDOWS
            if i:
                boundary = text.find("\n\n", start)
                start = boundary + 2 if boundary >= 0 else start
            end = text.find("\n\n", start + TOKEN_WINDOW_CHARS)
            window = text[start : end if end > 0 else len(text)]
            sampled_chars += len(window)
            sampled_tokens += self.encode_len(window)
        share = sampled_chars / len(text)
        return {
            "tokens": round(sampled_tokens * len(text) / sampled_chars),
            "tokens_method": f"estimate from {TOKEN_SAMPLE_WINDOWS} evenly spaced windows "
            f"({share:.1%} of the characters)",
        }
