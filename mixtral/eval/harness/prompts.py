"""Chat prompts as lm-eval wants them (strings) over the ids Mistral's format gives (tokens).

lm-eval's `apply_chat_template=True` asks the model for the prompt as a string; our prompts are
the ids of `mixtral.chat.encode` (mistral-common's Instruct v1 encoding). The string is the
readable rendering `<s>[INST] ... [/INST]` (BOS and EOS shown as `<s>`/`</s>`, like the HF chat
template), and `ChatPrompts` remembers the exact ids of each string it rendered, so the model
sees exactly Mistral's tokens. A string that starts with `<s>` but was not rendered here
(lm-eval's request cache replays contexts) is split at its `</s>` markers instead, the way
HFLM lets its tokenizer parse the special tokens in such a string.
"""

from __future__ import annotations

from typing import Any

from mixtral.tokenizer import Tokenizer

BOS_TEXT, EOS_TEXT = "<s>", "</s>"  # how the rendering shows BOS/EOS (HF's spelling)


class ChatPrompts:
    """Renders conversations to strings and gives back each string's exact ids."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._ids: dict[str, list[int]] = {}  # rendered prompt -> its exact ids

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """The readable string of `messages` encoded in the instruct format; without
        add_generation_prompt a final assistant message is continued, not closed (lm-eval's
        gen_prefix)."""
        from mixtral.chat import encode

        messages = [dict(m) for m in messages]
        if not add_generation_prompt and messages and messages[-1]["role"] == "assistant":
            messages[-1]["prefix"] = True
        ids = encode(messages, tokenizer=self.tokenizer)
        text = self._readable(ids)
        self._ids[text] = ids
        return text

    def ids(self, text: str) -> list[int] | None:
        """The ids of a chat rendering (remembered exactly, or parsed at its markers); None
        for any other text."""
        if text in self._ids:
            return list(self._ids[text])
        if not text.startswith(BOS_TEXT):
            return None
        ids = [self.tokenizer.bos_id]
        for i, segment in enumerate(text[len(BOS_TEXT):].split(EOS_TEXT)):
            if i:
                ids.append(self.tokenizer.eos_id)
            if segment:
                ids += self.tokenizer.encode(segment, bos=False)
        return ids

    def _readable(self, ids: list[int]) -> str:
        """The text between special tokens, which show as <s> and </s>."""
        marks = {self.tokenizer.bos_id: BOS_TEXT, self.tokenizer.eos_id: EOS_TEXT}
        parts: list[str] = []
        run: list[int] = []
        for i in [*ids, None]:
            if i is None or i in marks:
                parts.append(self.tokenizer.decode(run))
                run = []
                if i is not None:
                    parts.append(marks[i])
            else:
                run.append(i)
        return "".join(parts)
