"""Whether a model expects its prompts in the instruct (chat) format, and why we think so.

A model tuned for chat answers a bare prompt poorly: the shipped default scores 0% on passkey
retrieval without its format. So `mixtral eval passkey` wraps its prompts the way the model was
trained unless told otherwise (--chat, --plain), and says which it chose and why. The evidence,
in order:

- the built-in default model: tuned by SFT and DPO (see its model card);
- a chat template in the checkpoint's tokenizer_config.json: how Hugging Face marks a chat
  model (base models ship none);
- "instruct" in the model's name (its folder's, or a hub id's): how Mistral and most
  publishers name tuned models (Mixtral-8x7B-Instruct-v0.1); this also covers the Mistral
  layout, whose files say nothing.

No evidence: a base model, and plain prompts.
"""

from __future__ import annotations

import json
from pathlib import Path


def prompt_format(model: str | None) -> tuple[bool, str]:
    """(True for the instruct format, the reason in words) for --model `model` (None: the
    built-in default)."""
    from mixtral.default_model import HAS_SHIPPED

    if model is None or model == "default":
        if HAS_SHIPPED:
            return True, "the built-in default model is tuned for chat (SFT and DPO, see its " \
                         "model card)"
        return False, "the built-in default has random weights (no trained default ships here)"
    path = Path(model)
    folder = path if path.is_dir() else path.parent
    config = folder / "tokenizer_config.json"
    if config.is_file() and _has_chat_template(config):
        return True, f"{config} has a chat template"
    # the folder's name, or its snapshot's in a hub cache: models--ORG--NAME/snapshots/REV
    names = folder.resolve().parts[-3:] if path.exists() else (model,)  # else a hub id
    if any("instruct" in name.lower() for name in names):
        return True, f"its name says Instruct ({model})"
    return False, "no sign of an instruct model (no chat template in a tokenizer_config.json " \
                  "beside it, no 'instruct' in its name)"


def _has_chat_template(config: Path) -> bool:
    try:
        template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
    except (OSError, ValueError, AttributeError):  # unreadable or not an object: no evidence
        return False
    return bool(template)
