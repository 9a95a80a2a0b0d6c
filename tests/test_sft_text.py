"""Plain-text rows in fine-tuning data: {"text": ...} lines mixed with {"messages": ...} lines.
A text row's loss is on every token after <s> (as in pretraining), a chat row's only on the
assistant's answers; checked against encode_for_training and a per-token loss by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mixtral.chat import encode_for_training
from mixtral.config import preset
from mixtral.model import Transformer
from mixtral.tokenizer import default_tokenizer
from mixtral.train.data import DataError, pad_batch, sft_examples, text_rows
from mixtral.train.run import TrainConfig
from mixtral.train.tasks import SFTTask

CHAT = [{"role": "user", "content": "Repeat exactly: blue kettle"},
        {"role": "assistant", "content": "blue kettle"}]
TEXT = "It was a bright cold day in April, and the clocks were striking thirteen."


def write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_text_rows_train_on_every_token_and_chat_rows_on_the_answer(tmp_path):
    tok = default_tokenizer()
    data = write(tmp_path / "mix.jsonl", [{"messages": CHAT}, {"text": TEXT, "task": "text"}])
    (chat_ids, chat_mask), (text_ids, text_mask) = sft_examples([data], tok, 256)
    assert (chat_ids, chat_mask) == encode_for_training(CHAT, tok)
    assert text_ids == tok.encode(TEXT, bos=True, eos=True)
    assert text_mask == [0] + [1] * (len(text_ids) - 1)  # every token but <s> is a target
    answer = [tok._sp.id_to_piece(i) for i, m in zip(chat_ids, chat_mask, strict=True) if m]
    assert "".join(answer).replace("▁", " ").strip() == "blue kettle</s>"

    batch = pad_batch([(chat_ids, chat_mask), (text_ids, text_mask)])
    assert batch.loss_mask[1].tolist() == [True] * (len(text_ids) - 1) + [False] * (
        batch.tokens.shape[1] - len(text_ids) + 1)
    assert batch.loss_mask[0].tolist()[:len(chat_ids) - 1] == [bool(m) for m in chat_mask[1:]]


def test_the_sft_loss_is_the_mean_over_answers_and_whole_texts(tmp_path):
    """The task's loss equals the per-token cross-entropy averaged by hand over exactly the
    chat answer's tokens and every token of the text."""
    tok = default_tokenizer()
    data = write(tmp_path / "mix.jsonl", [{"messages": CHAT}, {"text": TEXT}])
    cfg = TrainConfig(stage="sft", out=str(tmp_path / "run"), data=[str(data)],
                      eval_data=[str(data)], batch_size=2, seq_len=256, aux_coef=0.0)
    task = SFTTask(cfg, tok, aux_coef=0.0)
    model = Transformer(preset("tiny")).eval()
    model.init_weights(std=0.02, generator=torch.Generator().manual_seed(0))
    batch = pad_batch(task.rows)
    with torch.no_grad():
        loss, stats = task.loss(model, batch)
        logits = model(batch.tokens)
    losses = []
    for row, (ids, mask) in enumerate(task.rows):
        for t in range(len(ids) - 1):  # position t predicts ids[t + 1]
            if mask[t + 1]:
                losses.append(F.cross_entropy(logits[row, t], torch.tensor(ids[t + 1])))
    n_answer = sum(task.rows[0][1])
    assert len(losses) == n_answer + len(tok.encode(TEXT, bos=True, eos=True)) - 1
    torch.testing.assert_close(loss, torch.stack(losses).mean())
    assert stats["ce"] == pytest.approx(loss.item())


@pytest.mark.parametrize("length,max_len", [(2, 8), (9, 8), (10, 8), (17, 8), (100, 7)])
def test_a_long_text_becomes_rows_that_lose_nothing(length, max_len):
    ids = list(range(1, length + 1))
    rows = text_rows(ids, max_len)
    assert all(2 <= len(r) <= max_len + 1 and len(r) == len(m) for r, m in rows)
    targets = [i for r, m in rows for i, keep in zip(r, m, strict=True) if keep]
    assert targets == ids[1:]  # every token after <s> a target exactly once, in order
    for (a, _), (b, _) in zip(rows, rows[1:], strict=False):
        assert b[0] == a[-1]  # each row starts on the token the previous one ended with


def test_text_rows_are_cut_at_the_sequence_length(tmp_path):
    tok = default_tokenizer()
    data = write(tmp_path / "long.jsonl", [{"text": " ".join([TEXT] * 40)}])
    ids = tok.encode(" ".join([TEXT] * 40), bos=True, eos=True)
    rows = sft_examples([data], tok, 64)
    assert len(rows) == -(-(len(ids) - 1) // 64)
    assert [i for r, _ in rows for i in r[1:]] == ids[1:]


@pytest.mark.parametrize("row,message", [
    ({"messages": CHAT, "text": TEXT}, r'mix.jsonl:2: expected .*"text".*, not both'),
    ({"task": "text"}, r'mix.jsonl:2: expected \{"messages": \[...\]\} or \{"text": "..."\}$'),
    ({"text": 42}, r'mix.jsonl:2: expected \{"messages"'),
    ({"text": "  \n"}, r"mix.jsonl:2: the text is empty"),
])
def test_a_bad_row_is_named_by_file_and_line(tmp_path, row, message):
    data = write(tmp_path / "mix.jsonl", [{"text": TEXT}, row])
    with pytest.raises(DataError, match=message):
        sft_examples([data], default_tokenizer(), 64)
