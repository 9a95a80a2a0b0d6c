"""Training: losses against hand computations, masks, LoRA, checkpoints that survive a kill,
NaN handling, bad data, each stage learning, and 2-process data parallelism."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from unittest.mock import patch

import pytest
import torch
from safetensors.torch import load_file

from mixtral.chat import encode_for_training
from mixtral.cli import main
from mixtral.config import ModelArgs
from mixtral.lora import apply_lora, load_adapter, merge_lora, save_adapter
from mixtral.model import Transformer
from mixtral.quant import Int8Linear
from mixtral.quant.int8 import quantize as int8_quantize
from mixtral.tokenizer import default_tokenizer
from mixtral.train.data import DataError, pad_batch, sft_examples
from mixtral.train.losses import dpo_loss, load_balancing_loss, router_z_loss
from mixtral.train.run import TrainConfig, TrainingError, build_model, train

SMALL = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "head_dim": 16,
         "hidden_dim": 96, "max_seq_len": 256}


# --- losses --------------------------------------------------------------------------------------

def test_load_balancing_loss_by_hand():
    # 4 tokens, 4 experts, top-1; logits chosen so the softmax rows are simple
    logits = torch.log(torch.tensor([[0.7, 0.1, 0.1, 0.1],
                                     [0.7, 0.1, 0.1, 0.1],
                                     [0.1, 0.7, 0.1, 0.1],
                                     [0.1, 0.1, 0.1, 0.7]]))
    # f = share routed to each expert = [2/4, 1/4, 0, 1/4]; p = mean prob = [.4, .25, .1, .25]
    expected = 4 * (0.5 * 0.4 + 0.25 * 0.25 + 0 * 0.1 + 0.25 * 0.25)
    assert load_balancing_loss([logits], 1).item() == pytest.approx(expected, rel=1e-6)
    # two layers: the mean of the per-layer values, not a pooled value
    uniform = torch.zeros(4, 4)
    uniform[torch.arange(4), torch.arange(4)] = 1.0  # each expert once: balanced
    balanced = load_balancing_loss([uniform], 1).item()
    both = load_balancing_loss([logits, uniform], 1).item()
    assert both == pytest.approx((expected + balanced) / 2, rel=1e-6)


def test_load_balancing_equals_top_k_at_balance_and_excludes_padding():
    E, k, N = 8, 2, 64
    logits = torch.zeros(N, E)
    for n in range(N):  # every expert chosen equally often, mean probabilities uniform
        logits[n, (2 * n) % E] = 1.0
        logits[n, (2 * n + 1) % E] = 0.9
    assert load_balancing_loss([logits], k).item() == pytest.approx(k, rel=1e-5)
    collapsed = torch.zeros(N, E)
    collapsed[:, 0], collapsed[:, 1] = 5.0, 4.0
    assert load_balancing_loss([collapsed], k).item() > 3 * k
    # padding rows (masked out) change nothing: same value as the real rows alone
    padded = torch.cat([logits, collapsed[:16]])
    mask = torch.cat([torch.ones(N), torch.zeros(16)])
    assert load_balancing_loss([padded], k, mask).item() == pytest.approx(
        load_balancing_loss([logits], k).item(), rel=1e-6)
    z = router_z_loss([torch.zeros(3, 4)])
    assert z.item() == pytest.approx(math.log(4) ** 2, rel=1e-6)


def test_dpo_loss_by_hand():
    loss, stats = dpo_loss(torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-1.5]),
                           torch.tensor([-1.5]), beta=0.5)
    # rewards: chosen 0.5 * 0.5 = 0.25, rejected 0.5 * -0.5 = -0.25, margin 0.5
    assert loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(-0.5))), rel=1e-6)
    assert stats == pytest.approx({"reward_chosen": 0.25, "reward_rejected": -0.25,
                                   "reward_margin": 0.5, "preference_accuracy": 1.0})


def test_sft_mask_is_exactly_the_assistant_tokens():
    tok = default_tokenizer()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello there"},
                {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Ciao"}]
    ids, mask = encode_for_training(messages)
    kept = [tok._sp.id_to_piece(i) for i, m in zip(ids, mask, strict=True) if m]
    assert kept == ["▁Hello", "▁there", "</s>", "▁C", "iao", "</s>"]
    batch = pad_batch([(ids, mask), (ids[:5], mask[:5])])
    # the loss mask sits on the targets: position t predicts ids[t + 1]
    assert batch.loss_mask[0].tolist() == [bool(m) for m in mask[1:]]
    assert batch.token_mask[1].sum() == 5 and not batch.loss_mask[1].any()  # 5 real inputs


# --- LoRA ----------------------------------------------------------------------------------------

def test_lora_fresh_merged_and_saved(tmp_path):
    torch.manual_seed(0)
    model = Transformer(ModelArgs(**SMALL, vocab_size=300))
    model.init_weights(std=0.1)
    tokens = torch.randint(0, 300, (2, 10))
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        base = model(tokens)
    params = apply_lora(model, rank=4, alpha=8.0)
    assert params and all(p.requires_grad for p in params)
    assert not any(p.requires_grad for n, p in model.named_parameters()
                   if all(p is not q for q in params))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), base)  # B = 0: no change
        for p in params:
            p.normal_(0, 0.05)
        adapted = model(tokens)
    assert (adapted - base).abs().max() > 1e-3
    save_adapter(model, tmp_path / "adapter", 4, 8.0, ("attention", "experts"))
    fresh = Transformer(model.args)  # the base again, then the saved adapter on it
    fresh.load_state_dict(base_state)
    load_adapter(fresh, tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(fresh(tokens), adapted)
        merged = merge_lora(model)(tokens)
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=1e-5)  # merged == unmerged


# --- the loop ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    import random

    rng = random.Random(0)
    words = ("the cat sat on a mat and the dog ran to the red ball while birds sang in green "
             "trees").split()
    d = tmp_path_factory.mktemp("corpus")
    (d / "a.txt").write_text("\n".join(" ".join(rng.choice(words) for _ in range(12)) + "."
                                       for _ in range(1500)))
    return d / "a.txt"


def config(tmp_path, corpus, **changes) -> TrainConfig:
    values = dict(stage="pretrain", out=str(tmp_path / "run"), data=[str(corpus)], steps=8,
                  batch_size=2, seq_len=32, lr=3e-3, warmup=2, eval_every=4, save_every=4,
                  eval_batches=1, model=SMALL, progress=False)
    values.update(changes)
    return TrainConfig.from_dict(values)


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_pretrain_learns_and_writes_everything(tmp_path, corpus):
    final = train(config(tmp_path, corpus, steps=24, save_every=8, eval_every=8, keep=1))
    out = tmp_path / "run"
    curve = losses(out)
    assert len(curve) == 24 and curve[-1] < curve[0] - 2
    assert (out / "loss.png").stat().st_size > 1000
    assert (out / "latest").read_text().strip() == final.name == "step-000024"
    assert sorted(p.name for p in out.glob("step-*")) == ["step-000016", "step-000024"]
    import mixtral
    assert mixtral.load(final).args.dim == 64  # the checkpoint is a loadable model
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "ce", "aux", "lr", "tokens_per_s", "grad_norm"} <= set(records[0])
    assert "eval_loss" in records[7]


@pytest.mark.slow
def test_killed_run_resumes_bit_for_bit(tmp_path, corpus):
    straight = config(tmp_path / "a", corpus, steps=12, save_every=3, eval_every=100)
    train(straight)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps({**{k: v for k, v in vars(straight).items()
                                     if k not in ("stage", "betas")},
                                  "out": str(tmp_path / "b" / "run")}))
    cmd = [sys.executable, "-m", "mixtral", "train", "pretrain", "--config", str(recipe)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = tmp_path / "b" / "run" / "latest"
    deadline = time.monotonic() + 120
    while not (latest.exists() and latest.read_text().strip() >= "step-000006"):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # mid-run, no chance to clean up
    proc.wait()
    assert subprocess.run(cmd, capture_output=True).returncode == 0  # resumes from latest
    a, b = tmp_path / "a" / "run", tmp_path / "b" / "run"
    assert losses(a) == losses(b)  # the curve continues exactly where it stopped
    wa = load_file(a / "step-000012" / "model.safetensors")
    wb = load_file(b / "step-000012" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_tied_embeddings_train_as_one_matrix_save_as_two_and_resume(tmp_path, corpus):
    """tie_embeddings: one Parameter while training (one gradient, one optimizer state), two
    equal tensors in the checkpoint (Mixtral's layout, which mixtral.load reads as usual); a
    run stopped at step 4 and resumed ends where a straight run does; an untied checkpoint is
    refused rather than silently tied."""
    straight = train(config(tmp_path / "a", corpus, steps=8, tie_embeddings=True))
    (tmp_path / "b" / "run").mkdir(parents=True)  # stopped after its step-4 checkpoint
    shutil.copytree(tmp_path / "a" / "run" / "step-000004", tmp_path / "b" / "run" / "step-000004")
    (tmp_path / "b" / "run" / "latest").write_text("step-000004\n")
    resumed = train(config(tmp_path / "b", corpus, steps=8, tie_embeddings=True))
    wa, wb = (load_file(p / "model.safetensors") for p in (straight, resumed))
    assert torch.equal(wa["lm_head.weight"], wa["model.embed_tokens.weight"])
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    first = load_file(tmp_path / "a" / "run" / "step-000004" / "model.safetensors")
    assert not torch.equal(first["lm_head.weight"], wa["lm_head.weight"])  # it did train
    untied = train(config(tmp_path / "c", corpus, steps=2))
    with pytest.raises(TrainingError, match="cannot be sharded"):  # as under torchrun, 2 ranks
        with patch("mixtral.train.run._distributed", return_value=(0, 2)):
            train(config(tmp_path / "e", corpus, steps=2, tie_embeddings=True))
    assert not (tmp_path / "e").exists()  # refused before any work
    with pytest.raises(TrainingError, match="has an output head that differs from its "
                       "embeddings"):
        train(config(tmp_path / "d", corpus, steps=2, init=str(untied), tie_embeddings=True))


def test_frozen_embeddings_and_the_final_norm_init(tmp_path, corpus):
    """embedding_lr_scale 0 leaves the (tied) embeddings exactly as initialized while the rest
    trains, and a run resumes with it bit for bit; 0.5 moves them, at half the step of the
    others; final_norm_init sets the final norm of a preset's random init and is refused for
    a checkpoint init, as is resuming a run whose groups the setting would change."""
    init = train(config(tmp_path / "i", corpus, steps=1, lr=1e-12, warmup=0,  # as initialized
                        tie_embeddings=True, final_norm_init=5.0, embedding_lr_scale=0.0))
    w0 = load_file(init / "model.safetensors")
    assert torch.equal(w0["model.norm.weight"], torch.full_like(w0["model.norm.weight"], 5.0))
    frozen = dict(steps=8, tie_embeddings=True, final_norm_init=5.0, embedding_lr_scale=0.0)
    straight = train(config(tmp_path / "a", corpus, **frozen))
    wa = load_file(straight / "model.safetensors")
    assert torch.equal(wa["model.embed_tokens.weight"], w0["model.embed_tokens.weight"])
    assert torch.equal(wa["lm_head.weight"], w0["model.embed_tokens.weight"])
    assert not torch.equal(wa["model.norm.weight"], w0["model.norm.weight"])  # the rest trains
    model = build_model(config(tmp_path / "g", corpus, **frozen))
    assert not model.tok_embeddings.weight.requires_grad  # so its gradient is not clipped
    assert model.output.weight is model.tok_embeddings.weight
    (tmp_path / "b" / "run").mkdir(parents=True)
    shutil.copytree(tmp_path / "a" / "run" / "step-000004", tmp_path / "b" / "run" / "step-000004")
    (tmp_path / "b" / "run" / "latest").write_text("step-000004\n")
    resumed = train(config(tmp_path / "b", corpus, **frozen))
    wb = load_file(resumed / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    with pytest.raises(TrainingError, match=r"parameter groups hold \[\d+, \d+\] parameters, "
                       r"this run's settings make \[\d+, \d+\] \(embedding_lr_scale changed"):
        train(config(tmp_path / "b", corpus, **{**frozen, "steps": 9, "embedding_lr_scale": 1.0}))
    half = train(config(tmp_path / "h", corpus, steps=1, warmup=0, tie_embeddings=True,
                        final_norm_init=5.0, embedding_lr_scale=0.5))
    moved = load_file(half / "model.safetensors")["model.embed_tokens.weight"]
    step = (moved - w0["model.embed_tokens.weight"]).abs().max().item()
    assert 0.4 * 3e-3 < step < 0.6 * 3e-3  # Adam's first step: lr x scale per element
    with pytest.raises(TrainingError, match="final_norm_init=5.0: init=.* is a checkpoint"):
        train(config(tmp_path / "c", corpus, init=str(init), final_norm_init=5.0,
                     model={}, tie_embeddings=True))
    for bad in ({"embedding_lr_scale": -1.0}, {"final_norm_init": 0.0}):
        with pytest.raises(TrainingError, match=f"{next(iter(bad))} must be"):
            config(tmp_path / "d", corpus, **bad)


def test_embedding_shared_adds_one_direction_to_every_row(tmp_path, corpus):
    """embedding_shared gives every row of a preset's random embeddings one common direction of
    that multiple of a row's norm, and changes nothing else in the init; a checkpoint init or a
    negative value is refused."""
    plain = build_model(config(tmp_path / "p", corpus, tie_embeddings=True))
    shared = build_model(config(tmp_path / "s", corpus, tie_embeddings=True, embedding_shared=1.0))
    rows0, rows = plain.tok_embeddings.weight, shared.tok_embeddings.weight  # [V, dim]
    norm = 0.02 * rows.shape[1] ** 0.5  # a random row's expected norm
    assert rows0.mean(0).norm() < 0.05 * norm  # no common part without it
    common = rows.mean(0)
    assert abs(common.norm().item() - norm) < 0.05 * norm
    assert torch.allclose(rows - common, rows0 - rows0.mean(0), atol=1e-6)  # the same rows else
    cosines = torch.nn.functional.cosine_similarity(rows, common[None], dim=1)
    assert abs(cosines.mean().item() - 0.5 ** 0.5) < 0.05
    assert shared.output.weight is shared.tok_embeddings.weight
    others = {k: v for k, v in plain.state_dict().items() if "embed" not in k and "output" not in k}
    assert others and all(torch.equal(v, shared.state_dict()[k]) for k, v in others.items())
    init = train(config(tmp_path / "i", corpus, steps=1, tie_embeddings=True))
    with pytest.raises(TrainingError, match="embedding_shared=1.0: init=.* is a checkpoint"):
        build_model(config(tmp_path / "c", corpus, init=str(init), model={},
                           tie_embeddings=True, embedding_shared=1.0))
    with pytest.raises(TrainingError, match="embedding_shared must be at least 0"):
        config(tmp_path / "d", corpus, embedding_shared=-1.0)


def test_embedding_space_makes_twins_of_spaced_pieces(tmp_path, corpus):
    """embedding_space gives `\u2581X` the row of `X` plus one space direction, adds that
    direction to every other piece that starts a word, and leaves the rest of the rows as they
    were; a checkpoint init is refused."""
    from mixtral.tokenizer import default_tokenizer

    pieces = default_tokenizer().pieces()
    ids = {p: i for i, p in enumerate(pieces)}
    plain = build_model(config(tmp_path / "p", corpus, tie_embeddings=True)).tok_embeddings
    spaced = build_model(config(tmp_path / "s", corpus, tie_embeddings=True,
                                embedding_space=0.5)).tok_embeddings
    rows0, rows = plain.weight, spaced.weight  # [V, dim]
    twin, lone, word = ids["\u2581Am"], ids["\u2581Kevin"], ids["Am"]
    space = rows[twin] - rows[word]
    assert abs(space.norm().item() - 0.5 * 0.02 * rows.shape[1] ** 0.5) < 1e-5
    assert torch.allclose(rows[ids["\u2581the"]] - rows[ids["the"]], space, atol=1e-6)
    assert torch.allclose(rows[lone], rows0[lone] + space, atol=1e-6)  # no twin: its own row
    unspaced = [i for i, p in enumerate(pieces) if not p.startswith("\u2581")]
    assert torch.equal(rows[unspaced], rows0[unspaced])
    init = train(config(tmp_path / "i", corpus, steps=1, tie_embeddings=True))
    with pytest.raises(TrainingError, match="embedding_space=0.5: init=.* is a checkpoint"):
        build_model(config(tmp_path / "c", corpus, init=str(init), model={},
                           tie_embeddings=True, embedding_space=0.5))


def test_nan_loss_stops_and_keeps_the_last_checkpoint(tmp_path, corpus, monkeypatch):
    import mixtral.train.tasks as tasks

    calls = {"n": 0}
    real = tasks.cross_entropy

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] > 6 else loss

    monkeypatch.setattr(tasks, "cross_entropy", poisoned)
    with pytest.raises(TrainingError, match=r"step 6: the loss is nan .* The last good "
                       r"checkpoint, .*step-000004, is intact"):
        train(config(tmp_path, corpus, eval_every=100))
    out = tmp_path / "run"
    assert (out / "latest").read_text().strip() == "step-000004"
    assert (out / "step-000004" / "model.safetensors").exists()


def finite_checkpoints(out: Path) -> bool:
    return all(torch.isfinite(t).all() for step in out.glob("step-*")
               for t in load_file(step / "model.safetensors").values())


def test_nan_gradient_stops_before_the_update(tmp_path, corpus):
    # lr 1e8: step 1's loss is finite but its gradient is NaN; the NaN weights it made were
    # saved as step-000002 and became `latest`, and every resume failed
    with pytest.raises(TrainingError, match=r"step 1: the gradient norm is nan \(not finite\) "
                       r"while the loss is .*; stopping before the update\. The last good "
                       r"checkpoint, .*step-000001, is intact"):
        train(config(tmp_path, corpus, lr=1e8, warmup=0, save_every=1, eval_every=100))
    out = tmp_path / "run"
    assert (out / "latest").read_text().strip() == "step-000001"
    assert sorted(p.name for p in out.glob("step-*")) == ["step-000001"]
    assert finite_checkpoints(out)


def test_non_finite_weights_are_never_saved(tmp_path, corpus, monkeypatch):
    import mixtral.train.run as run

    real = run.optimizer

    def breaking(model, cfg):  # the 8th (last) update turns a weight inf, gradients finite
        opt = real(model, cfg)
        step, steps = opt.step, {"n": 0}

        def broken_step(*args, **kwargs):
            result = step(*args, **kwargs)
            steps["n"] += 1
            if steps["n"] == 8:
                with torch.no_grad():
                    model.output.weight[0, 0] = float("inf")
            return result

        opt.step = broken_step
        return opt

    monkeypatch.setattr(run, "optimizer", breaking)
    with pytest.raises(TrainingError, match=r"step 7: after the update output.weight is not "
                       r"finite; stopping without saving it\. The last good checkpoint, "
                       r".*step-000004, is intact"):
        train(config(tmp_path, corpus, eval_every=100))
    out = tmp_path / "run"
    assert (out / "latest").read_text().strip() == "step-000004"
    assert not (out / "step-000008").exists() and finite_checkpoints(out)


def test_cli_reports_a_diverged_run_in_one_line(tmp_path, corpus, capsys):
    cfg = config(tmp_path, corpus, lr=1e8, warmup=0, save_every=1, eval_every=100)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps({k: v for k, v in vars(cfg).items()
                                  if k not in ("stage", "betas")}))
    assert main(["train", "pretrain", "--config", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mixtral train: error: step 1: the gradient norm is nan")
    assert "Traceback" not in err


class _Payload:
    """What an attacker would plant: unpickling it calls open(marker, "w")."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_resume_never_runs_a_planted_pickle(tmp_path, corpus):
    train(config(tmp_path, corpus, steps=4, save_every=2, eval_every=100))
    state_file = tmp_path / "run" / "step-000004" / "trainer_state.pt"
    state = torch.load(state_file, weights_only=True)  # what is saved loads this way
    marker = tmp_path / "pwned"
    torch.save({**state, "config": _Payload(marker)}, state_file)
    with pytest.raises(TrainingError, match=r"trainer_state.pt: refusing to load it: it holds "
                       r"more than tensors and numbers"):
        train(config(tmp_path, corpus, steps=6, save_every=2, eval_every=100))
    assert not marker.exists()  # the payload did not run


def test_latest_must_stay_inside_the_run_folder(tmp_path, corpus):
    train(config(tmp_path / "other", corpus, steps=2, save_every=2, eval_every=100))
    run_dir = tmp_path / "mine" / "run"
    run_dir.mkdir(parents=True)
    for pointer in ("../../other/run/step-000002", str(tmp_path / "other" / "run" /
                                                       "step-000002")):
        (run_dir / "latest").write_text(pointer + "\n")
        with pytest.raises(TrainingError, match=r"latest names .* which is not a step-N "
                           r"folder inside .*; refusing to resume from it"):
            train(config(tmp_path / "mine", corpus, steps=4, eval_every=100))


def test_bad_data_names_file_and_line(tmp_path):
    bad = tmp_path / "sft.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                            {"role": "assistant", "content": "yo"}]}) + "\n"
                   + "{oops\n")
    with pytest.raises(DataError, match=r"sft.jsonl:2: not valid JSON"):
        sft_examples([bad], default_tokenizer(), 64)
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(DataError, match=r"sft.jsonl:1: .*must end with an assistant message"):
        sft_examples([bad], default_tokenizer(), 64)
    with pytest.raises(ValueError, match="unknown setting.*stepz"):
        TrainConfig.from_dict({"stage": "sft", "out": "x", "data": ["y"], "stepz": 3})


def addition_sft(tmp_path: Path, corpus: Path) -> tuple[Path, Path]:
    """A few pretraining steps, and 36 "What is a plus b?" conversations to fine-tune on."""
    base = train(config(tmp_path / "pre", corpus, steps=6, save_every=6))
    sft = tmp_path / "sft.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                          {"role": "assistant", "content": str(a + b)}]}
            for a in range(6) for b in range(6)]
    sft.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return base, sft


def test_sft_then_dpo_with_lora_learn(tmp_path, corpus, capsys):
    base, sft = addition_sft(tmp_path, corpus)
    train(config(tmp_path / "s", corpus, stage="sft", data=[str(sft)], init=str(base),
                 steps=30, batch_size=8, lr=3e-3, eval_every=10, save_every=30))
    curve = losses(tmp_path / "s" / "run")
    assert sum(curve[-5:]) / 5 < sum(curve[:5]) / 5 - 1
    prefs = tmp_path / "dpo.jsonl"
    pairs = [{"messages": [{"role": "user", "content": f"What is {a} plus {b}?"}],
              "chosen": str(a + b), "rejected": f"I think it is {a + b + 1} or so"}
             for a in range(6) for b in range(6)]
    prefs.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    sft_final = tmp_path / "s" / "run" / "step-000030"
    final = train(config(tmp_path / "d", corpus, stage="dpo", data=[str(prefs)],
                         init=str(sft_final), steps=12, batch_size=4, lr=5e-3, lora_rank=4,
                         eval_every=12, save_every=12, dpo_beta=0.5))
    records = [json.loads(line) for line in
               (tmp_path / "d" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["reward_margin"] == pytest.approx(0.0, abs=1e-4)  # policy == reference
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert records[-1]["eval_preference_accuracy"] >= 0.75
    assert (final / "adapter" / "adapter.safetensors").exists()
    merged = tmp_path / "merged"
    assert main(["lora", "merge", str(sft_final), str(final / "adapter"), str(merged)]) == 0
    assert (merged / "config.json").exists()
    # the adapter at load time (--lora) == the merged checkpoint
    capsys.readouterr()  # drop what `lora merge` printed
    outputs = []
    for argv in (["--model", str(sft_final), "--lora", str(final / "adapter")],
                 ["--model", str(merged)]):
        assert main(["generate", *argv, "--prompt", "What is 2 plus 3?", "--chat",
                     "--temperature", "0", "--max-tokens", "8", "--json"]) == 0
        outputs.append(json.loads(capsys.readouterr().out))
    assert outputs[0] == outputs[1]


def test_int8_linear_passes_gradients_to_its_input():
    torch.manual_seed(0)
    w = torch.randn(24, 16)
    q, scales = int8_quantize(w)
    layer = Int8Linear(q, scales, torch.float32)
    x = torch.randn(5, 16, requires_grad=True)
    layer(x).pow(2).sum().backward()
    ref = x.detach().clone().requires_grad_(True)  # the same int8 weight, dequantized
    (ref @ (q.float() * scales[:, None]).T).pow(2).sum().backward()
    torch.testing.assert_close(x.grad, ref.grad, atol=1e-4, rtol=1e-4)


def test_lora_on_an_int8_base_learns_and_applies_to_the_float_base(tmp_path, corpus):
    base, sft = addition_sft(tmp_path, corpus)
    final = train(config(tmp_path / "s", corpus, stage="sft", data=[str(sft)], init=str(base),
                         steps=30, batch_size=8, lr=1e-2, lora_rank=8, lora_base_bits=8,
                         eval_every=30, save_every=30))
    curve = losses(tmp_path / "s" / "run")
    assert sum(curve[-5:]) / 5 < sum(curve[:5]) / 5 - 0.5  # only the adapters learn
    import mixtral
    from mixtral.quant import quantize_model

    tokens = torch.tensor([[1, 5, 9, 200, 31, 7, 2]])
    with torch.no_grad():
        on_int8 = load_adapter(quantize_model(mixtral.load(base), 8), final / "adapter")
        on_float = merge_lora(load_adapter(mixtral.load(base), final / "adapter"))
        plain = mixtral.load(base)(tokens)
        a, b = on_int8(tokens), on_float(tokens)
    # the adapter moved the model, and int8 vs float base differ by quantization error only
    assert (a - plain).abs().max() > 0.1
    assert (a - b).abs().max() < 0.1 * (a - plain).abs().max()
    with pytest.raises(ValueError, match="merges into float weights, not int8"):
        merge_lora(on_int8)
    with pytest.raises(ValueError, match="lora_base_bits needs LoRA"):
        config(tmp_path / "x", corpus, lora_base_bits=8)


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [True, False])
def test_two_processes_match_one(tmp_path, corpus, fsdp):
    one = config(tmp_path / "one", corpus, steps=4, grad_accum=2, eval_every=100,
                 save_every=2)
    train(one)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps({**{k: v for k, v in vars(one).items()
                                     if k not in ("stage", "betas")},
                                  "grad_accum": 1, "fsdp": fsdp,
                                  "out": str(tmp_path / "two" / "run")}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def two_processes() -> None:
        result = subprocess.run([sys.executable, "-m", "torch.distributed.run",
                                 "--nproc-per-node", "2", "-m", "mixtral", "train", "pretrain",
                                 "--config", str(recipe)],
                                capture_output=True, text=True, env=env, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]

    two_processes()
    run_two = tmp_path / "two" / "run"
    if fsdp:  # resume a sharded run from its step-2 checkpoint: it must end the same
        shutil.copytree(run_two, tmp_path / "alone")  # ... and so must one process
        shutil.rmtree(run_two / "step-000004")
        (run_two / "latest").write_text("step-000002\n")
        two_processes()
        alone = tmp_path / "alone"
        shutil.rmtree(alone / "step-000004")
        (alone / "latest").write_text("step-000002\n")
        train(replace(one, out=str(alone)))
        wc = load_file(alone / "step-000004" / "model.safetensors")
        wa = load_file(tmp_path / "one" / "run" / "step-000004" / "model.safetensors")
        assert max((wa[k] - wc[k]).abs().max().item() for k in wa) < 1e-4
    a, b = losses(tmp_path / "one" / "run"), losses(run_two)
    # the same global batch (2 micro-batches), averaged in another order: fp32 rounding only
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-4
    wa = load_file(tmp_path / "one" / "run" / "step-000004" / "model.safetensors")
    wb = load_file(run_two / "step-000004" / "model.safetensors")
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-4
