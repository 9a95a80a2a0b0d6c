"""The sampled softmax (TrainConfig.sampled_softmax) and token-id rows in fine-tuning data
({"input_ids", "labels"}), the two things issue 17's induction warm-up trains with.

The sampled loss is checked against the full cross-entropy: exactly equal when every other
piece is drawn, an unbiased estimate of the softmax's normaliser when few are, and in a run it
trains while evaluation stays on the full softmax."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mixtral.tokenizer import default_tokenizer
from mixtral.train.config import TrainConfig, TrainingError
from mixtral.train.data import DataError, sft_examples
from mixtral.train.losses import cross_entropy, sampled_cross_entropy
from mixtral.train.run import train

V, D = 300, 16
SMALL = {"dim": 32, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "head_dim": 16,
         "hidden_dim": 48, "max_seq_len": 64}


def tensors(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, 5, D, generator=g)
    weight = torch.randn(V, D, generator=g)
    tokens = torch.randint(0, V, (2, 5), generator=g)
    targets = torch.randint(0, V, (2, 5), generator=g)
    return hidden, weight, tokens, targets


def test_drawing_all_of_the_rest_is_the_full_loss_with_its_gradient():
    hidden, weight, tokens, targets = tensors()
    mask = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 0, 1, 1]], dtype=torch.bool)
    for k in (V, 10 * V):  # at least the rest: every other piece drawn once, no shift
        h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        sampled = sampled_cross_entropy(h1, w1, targets, mask, tokens, k)
        full = cross_entropy(h2 @ w2.T, targets, mask)
        assert torch.allclose(sampled, full, atol=1e-5)
        sampled.backward()
        full.backward()
        assert h1.grad is not None and h2.grad is not None
        assert w1.grad is not None and w2.grad is not None
        assert torch.allclose(h1.grad, h2.grad, atol=1e-6)
        assert torch.allclose(w1.grad, w2.grad, atol=1e-6)


def test_few_draws_estimate_the_normaliser_without_bias():
    """The loss is log(sum exp) - target logit; with k draws the sum over the pieces not in the
    batch is (rest / k) x the drawn ones', whose mean over many draws is the true sum."""
    hidden, weight, tokens, targets = tensors(1)
    full_logits = hidden.flatten(0, 1)[:1] @ weight.T  # [1, V]: one position
    seen = torch.unique(torch.cat([tokens.flatten(), targets.flatten()]))
    true_sum = full_logits.exp().sum()
    estimates = []
    for seed in range(400):
        loss = sampled_cross_entropy(hidden[:1, :1], weight, targets[:1, :1], None, tokens, 20,
                                     torch.Generator().manual_seed(seed))
        estimates.append(math.exp(loss.item() + full_logits[0, targets[0, 0]].item()))
    mean = sum(estimates) / len(estimates)
    assert abs(mean - true_sum.item()) < 0.05 * true_sum.item()
    assert min(estimates) != max(estimates)  # the draws differ by seed
    assert len(seen) < V - 20  # the test draws from a real rest


def test_no_counted_position_gives_a_zero_with_a_graph():
    hidden, weight, tokens, targets = tensors()
    h = hidden.clone().requires_grad_()
    loss = sampled_cross_entropy(h, weight, targets, torch.zeros(2, 5), tokens, 8)
    loss.backward()
    assert loss.item() == 0.0 and h.grad is not None and not h.grad.any()


def rows(path: Path, n: int, seed: int = 0) -> Path:
    """[BOS, span, span] rows of random pieces, the loss on the repeat (the warm-up's form)."""
    g = torch.Generator().manual_seed(seed)
    lines = []
    for _ in range(n):
        span = torch.randint(3, 32000, (6,), generator=g).tolist()
        ids = [1, *span, *span]
        lines.append(json.dumps({"input_ids": ids, "labels": [-100] * 7 + span}))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_id_rows_mask_exactly_the_labelled_ids_and_bad_rows_are_named(tmp_path):
    tok = default_tokenizer()
    [(ids, mask)] = sft_examples([rows(tmp_path / "r.jsonl", 1)], tok, 64)
    assert len(ids) == 13 and mask == [0] * 7 + [1] * 6
    assert sft_examples([rows(tmp_path / "r.jsonl", 1)], tok, 8)[0][0] == ids[:9]  # cut
    bad = {'{"input_ids": [1, 2], "labels": [-100]}': "two lists of integers of one length",
           '{"input_ids": [1, 32000], "labels": [-100, 32000]}': "input id 32000 is outside",
           '{"input_ids": [1, 5, 6], "labels": [-100, 7, 6]}': r"labels\[1\] is 7",
           '{"input_ids": [1, 5], "labels": [1, 5]}': r"labels\[0\] must be -100",
           '{"input_ids": [1, 5.0], "labels": [-100, 5]}': "lists of integers"}
    for n, (line, error) in enumerate(bad.items()):
        f = tmp_path / f"bad{n}.jsonl"
        f.write_text('{"input_ids": [1, 2], "labels": [-100, 2]}\n' + line + "\n")
        with pytest.raises(DataError, match=f"bad{n}.jsonl:2: .*{error}"):
            sft_examples([f], tok, 64)


def config(tmp_path: Path, **changes: object) -> TrainConfig:
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = rows(tmp_path / "train.jsonl", 64)
    values = dict(stage="sft", out=str(tmp_path / "run"), data=[str(data)],
                  eval_data=[str(rows(tmp_path / "val.jsonl", 8, seed=1))], steps=4,
                  batch_size=4, seq_len=16, warmup=1, eval_every=4, save_every=4,
                  eval_batches=2, model=SMALL, tie_embeddings=True, min_lr_ratio=1.0,
                  progress=False)
    return TrainConfig.from_dict(values | changes)


def test_a_sampled_run_trains_evaluates_on_the_full_softmax_and_resumes(tmp_path):
    """The training log has sampled_ce (an estimate of the full loss: ln V at the random start,
    though ~100 of the 32000 pieces are scored), the evaluation the full ce; the draws follow
    the batch, so a resumed run ends where a straight one does."""
    final = train(config(tmp_path / "a", sampled_softmax=32, steps=6, save_every=3,
                         eval_every=3))
    records = [json.loads(line) for line in (final.parent / "metrics.jsonl").open()]
    assert all("sampled_ce" in r and "ce" not in r for r in records)
    assert "eval_ce" in records[2] and "eval_sampled_ce" not in records[2]
    assert abs(records[0]["sampled_ce"] - math.log(32000)) < 0.3
    assert abs(records[2]["eval_ce"] - math.log(32000)) < 1
    cut = train(config(tmp_path / "b", sampled_softmax=32, steps=3, save_every=3,
                       eval_every=3))  # the lr is constant after step 1: the same schedule
    resumed = train(config(tmp_path / "b", sampled_softmax=32, steps=6, save_every=3,
                           eval_every=3))
    assert cut.name == "step-000003"
    a = [json.loads(line)["loss"] for line in (final.parent / "metrics.jsonl").open()]
    b = [json.loads(line)["loss"] for line in (resumed.parent / "metrics.jsonl").open()]
    assert a == b


def test_sampled_softmax_is_refused_where_it_cannot_apply(tmp_path):
    for changes, error in (({"stage": "dpo"}, "pretrain and sft .*set sampled_softmax: 0"),
                           ({"lora_rank": 4, "lora_base_bits": 8},
                            "full precision .*set one of them to 0"),
                           ({}, "at least 0")):
        with pytest.raises(TrainingError, match=error):
            config(tmp_path, sampled_softmax=-1 if not changes else 8, **changes)


def test_full_loss_equals_sampled_one_with_every_piece_in_a_real_model(tmp_path):
    """In the trainer's own loss: a sampled_softmax of the whole vocabulary gives the full
    cross-entropy of the model's logits on a batch."""
    from mixtral.train.run import build_model
    from mixtral.train.tasks import SFTTask

    cfg = config(tmp_path, sampled_softmax=32000)
    model = build_model(cfg)
    task = SFTTask(cfg, default_tokenizer(), 0.0)
    batch = task.batch(0, 0)
    model.train()
    sampled, stats = task.loss(model, batch)
    logits = model(batch.tokens)
    full = F.cross_entropy(logits[batch.loss_mask], batch.targets[batch.loss_mask])
    assert "sampled_ce" in stats and torch.allclose(sampled, full, atol=1e-4)


def test_logits_only_where_the_loss_counts_give_the_full_loss(tmp_path):
    """The trainer scores only the positions whose loss counts (forward's `only`): the same
    logits there as a full forward, and the same loss as the full logits' masked one."""
    from mixtral.train.run import build_model
    from mixtral.train.tasks import SFTTask

    cfg = config(tmp_path)
    model = build_model(cfg)
    task = SFTTask(cfg, default_tokenizer(), 0.0)
    batch = task.batch(0, 0)
    counts = batch.loss_mask.bool()
    assert 0 < counts.sum() < counts.numel()
    with torch.no_grad():
        full = model(batch.tokens)
        assert torch.allclose(model(batch.tokens, only=counts), full[counts], atol=1e-5)
        states = model(batch.tokens, hidden=True, only=counts)
        assert torch.allclose(states @ model.output.weight.T, full[counts], atol=1e-4)
        for training in (True, False):
            model.train(training)
            loss, stats = task.loss(model, batch)
            assert torch.allclose(loss, cross_entropy(full, batch.targets, counts), atol=1e-5)
            assert set(stats) == {"ce"}
