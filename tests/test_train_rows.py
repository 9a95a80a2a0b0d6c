"""How learning embedding rows move (TrainConfig.embedding_rows, embedding_twins): only the rows
of pieces a step saw, twins as one, on one process and on two."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mixtral.tokenizer import default_tokenizer
from mixtral.train.data import Batch
from mixtral.train.optimizer import RowGrad
from mixtral.train.run import TrainConfig, TrainingError, build_model, train

SMALL = {"dim": 64, "n_layers": 1, "n_heads": 4, "n_kv_heads": 2, "head_dim": 16,
         "hidden_dim": 96, "max_seq_len": 128}
ROWS = "model.embed_tokens.weight"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Lines of words drawn from 200, so that two micro-batches of 64 tokens see different
    pieces."""
    rng = random.Random(1)
    words = [w for w in default_tokenizer().pieces()[3000:9000]
             if w.startswith("\u2581") and w[1:].isalpha()][:200]
    d = tmp_path_factory.mktemp("rows")
    # one line: a word that starts a line is cut without its space (the twin) by SentencePiece
    (d / "a.txt").write_text(" ".join(" ".join(rng.choice(words)[1:] for _ in range(10)) + "."
                                      for _ in range(600)))
    return d / "a.txt"


def config(out: Path, corpus: Path, **changes: object) -> TrainConfig:
    values = dict(stage="pretrain", out=str(out), data=[str(corpus)], steps=3, batch_size=2,
                  seq_len=32, lr=3e-3, warmup=0, eval_every=100, save_every=3, eval_batches=1,
                  model=SMALL, tie_embeddings=True, progress=False)
    values.update(changes)
    return TrainConfig.from_dict(values)


def trained_rows(out: Path, corpus: Path, **changes: object) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows as initialized and after 3 steps (a preset's init is the seed's, every run)."""
    cfg = config(out, corpus, **changes)
    before = build_model(cfg).tok_embeddings.weight.detach().clone()
    return before, load_file(train(cfg) / "model.safetensors")[ROWS]


def corpus_pieces(corpus: Path) -> set[int]:
    return set(default_tokenizer().encode(corpus.read_text(), eos=True))


def test_seen_moves_only_the_rows_of_pieces_in_the_batches(tmp_path, corpus):
    """With a tied head every row gets the softmax's push: "all" moves rows the data never
    holds; "seen" moves none of them, and still moves the pieces the batches held."""
    shown = torch.zeros(32000, dtype=torch.bool)
    shown[list(corpus_pieces(corpus))] = True
    before, free = trained_rows(tmp_path / "all", corpus)
    assert (free[~shown] != before[~shown]).any(dim=1).float().mean() > 0.99
    before, seen = trained_rows(tmp_path / "seen", corpus, embedding_rows="seen")
    assert torch.equal(seen[~shown], before[~shown])
    moved = (seen != before).any(dim=1)
    assert moved.sum() > 100 and not moved[~shown].any()


def test_tied_twins_keep_their_difference_while_rows_learn(tmp_path, corpus):
    """Each pair (`\u2581Am`, `Am`) moves by one update, so row(\u2581X) - row(X) stays what it
    was (to rounding) though the rows move by far more; "free" lets it change, and "seen" with
    "tied" moves a shown piece's unspaced twin, never shown, with it."""
    twins = default_tokenizer().twins()
    spaced, bare = list(twins), list(twins.values())
    before, free = trained_rows(tmp_path / "free", corpus)
    gap = (free[spaced] - free[bare]) - (before[spaced] - before[bare])
    assert gap.abs().max() > 1e-3
    before, tied = trained_rows(tmp_path / "tied", corpus, embedding_twins="tied")
    gap = (tied[spaced] - tied[bare]) - (before[spaced] - before[bare])
    assert gap.abs().max() < 1e-6
    assert (tied[spaced] - before[spaced]).abs().max() > 1e-3
    before, both = trained_rows(tmp_path / "both", corpus, embedding_rows="seen",
                                embedding_twins="tied")
    shown, moved = corpus_pieces(corpus), (both != before).any(dim=1)
    pairs = [(a, b) for a, b in twins.items() if b not in shown and moved[a]]
    assert len(pairs) > 10
    spaced, bare = [a for a, _ in pairs], [b for _, b in pairs]
    step = both - before
    assert torch.allclose(step[spaced], step[bare], atol=1e-6)


def test_row_grad_by_hand(tmp_path, corpus):
    """A step's seen rows are its real inputs and its scored targets (an answer's `</s>` is
    only ever a target), not padding; tied twins both get their sum; the rest is untouched."""
    batch = Batch(tokens=torch.tensor([[5, 6, 0]]), targets=torch.tensor([[6, 7, 9]]),
                  loss_mask=torch.tensor([[0, 1, 0]]), token_mask=torch.tensor([[1, 1, 0]]))
    grad = torch.randn(32000, 4)
    rows = RowGrad(config(tmp_path, corpus, embedding_rows="seen"), 32000)
    rows.see(batch)
    shaped = grad.clone()
    rows.apply(shaped)
    expected = torch.zeros_like(grad)
    expected[[5, 6, 7]] = grad[[5, 6, 7]]
    assert torch.equal(shaped, expected)
    rows.apply(shaped := grad.clone())  # what was seen is forgotten after a step
    assert not shaped.any()
    tok = default_tokenizer()
    twins, spaced = tok.twins(), tok.pieces().index("\u2581Am")
    bare = twins[spaced]  # `Am`
    tied = RowGrad(config(tmp_path, corpus, embedding_twins="tied"), 32000)
    tied.apply(shaped := grad.clone())
    expected = grad.clone()
    expected[[spaced, bare]] = grad[spaced] + grad[bare]
    assert torch.allclose(shaped[[spaced, bare, 5]], expected[[spaced, bare, 5]])
    alone = [i for i in range(32000) if i not in twins and i not in twins.values()]
    assert torch.equal(shaped[alone], grad[alone])
    chain = [tok.pieces().index("\u2581" * n) for n in (1, 2, 3)]  # `\u2581\u2581` -> `\u2581`
    assert torch.allclose(shaped[chain], shaped[chain[0]].expand(3, 4))


def test_settings_that_cannot_shape_rows_are_refused(tmp_path, corpus):
    for changes, message in (({"embedding_rows": "some"}, "embedding_rows must be all or seen"),
                             ({"embedding_twins": "yes"}, "embedding_twins must be free or tied"),
                             ({"embedding_rows": "seen", "embedding_lr_scale": 0.0},
                              "embedding_lr_scale is 0: the rows are frozen"),
                             ({"embedding_twins": "tied", "lora_rank": 4},
                              r"LoRA \(lora_rank > 0\) trains adapters only")):
        with pytest.raises(TrainingError, match=message):
            config(tmp_path / "x", corpus, **changes)
    small = {**SMALL, "vocab_size": 1000}
    with pytest.raises(TrainingError, match="needs the tokenizer's 32000-piece vocabulary, "
                       "the model has 1000 rows"):
        train(config(tmp_path / "v", corpus, model=small, embedding_twins="tied"))


@pytest.mark.slow
def test_two_processes_see_what_either_saw(tmp_path, corpus):
    """Data parallel (fsdp false): a row either rank's micro-batch held learns on both, so two
    processes end as one with 2 micro-batches a step; FSDP, which splits rows, is refused."""
    one = config(tmp_path / "one", corpus, steps=2, grad_accum=2, save_every=2,
                 embedding_rows="seen", embedding_twins="tied")
    wa = load_file(train(one) / "model.safetensors")
    recipe = tmp_path / "recipe.yaml"
    settings = {k: v for k, v in vars(one).items() if k not in ("stage", "betas")}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for fsdp in (False, True):
        recipe.write_text(json.dumps({**settings, "grad_accum": 1, "fsdp": fsdp,
                                      "tie_embeddings": not fsdp,  # (refused sharded itself)
                                      "out": str(tmp_path / f"two-{fsdp}")}))
        result = subprocess.run([sys.executable, "-m", "torch.distributed.run",
                                 "--nproc-per-node", "2", "-m", "mixtral", "train", "pretrain",
                                 "--config", str(recipe)],
                                capture_output=True, text=True, env=env, timeout=300)
        if fsdp:
            assert result.returncode != 0
            assert ("embedding_rows=seen and embedding_twins=tied cannot be sharded"
                    in result.stderr), result.stderr[-2000:]
        else:
            assert result.returncode == 0, result.stderr[-2000:]
    wb = load_file(tmp_path / "two-False" / "step-000002" / "model.safetensors")
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-4
