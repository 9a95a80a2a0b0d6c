"""Training's bad input, each in one line that says where: data that is not UTF-8 (file, line,
byte, column), recipe values and command-line overrides of the wrong type or under an unknown
key, and a stopped run, all through `mixtral train` with exit status 2 and no traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from mixtral.cli import main
from mixtral.tokenizer import default_tokenizer
from mixtral.train.config import TrainConfig, TrainingError
from mixtral.train.data import pretrain_tokens, sft_examples
from mixtral.train.recipe import read_recipe

SMALL = {"dim": 32, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "head_dim": 16,
         "hidden_dim": 48, "max_seq_len": 64}


# --- data ----------------------------------------------------------------------------------------

def test_data_that_is_not_utf8_names_file_line_byte_and_column(tmp_path):
    tok = default_tokenizer()
    chat = json.dumps({"messages": [{"role": "user", "content": "hi"},
                                    {"role": "assistant", "content": "yo"}]})
    sft = tmp_path / "sft.jsonl"
    sft.write_bytes(f"{chat}\n\n".encode() + b'{"messages": "caf\xc3\xa9 \xe9t\xe9"}\n')
    with pytest.raises(TrainingError, match=r"sft\.jsonl:3: not UTF-8 \(byte 0xe9 at column "
                       r"20\)$"):
        sft_examples([sft], tok, 64)  # column 20: "café" is 4 characters, not 5 bytes
    # far into a file (the decoder works in chunks: its own offset is not the file's)
    text = tmp_path / "book.txt"
    text.write_bytes(b"a fine line of text\n" * 5000 + b"and then \xff here\n")
    with pytest.raises(TrainingError, match=r"book\.txt:5001: not UTF-8 \(byte 0xff at column "
                       r"10\)$"):
        pretrain_tokens([text], tok)
    docs = tmp_path / "docs.jsonl"
    docs.write_bytes(b'{"text": "ok"}\n' * 3000 + b'{"text": "\x80"}\n')
    with pytest.raises(TrainingError, match=r"docs\.jsonl:3001: not UTF-8 \(byte 0x80 at "
                       r"column 11\)$"):
        pretrain_tokens([docs], tok)


# --- settings ------------------------------------------------------------------------------------

def recipe_file(tmp_path: Path, **changes: object) -> Path:
    corpus = tmp_path / "a.txt"
    corpus.write_text("\n".join(f"the cat sat on mat number {i} and the dog ran"
                                for i in range(200)))
    values = {"out": str(tmp_path / "run"), "data": [str(corpus)], "steps": 2,
              "batch_size": 2, "seq_len": 16, "warmup": 1, "eval_every": 100,
              "save_every": 100, "eval_batches": 1, "progress": False, "model": SMALL,
              **changes}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


@pytest.mark.parametrize("text, value", [("1e-4", 1e-4), ("1E-4", 1e-4), (".5", 0.5),
                                         ("2", 2.0), ("3.0e-3", 3e-3)])
def test_float_settings_read_as_numbers(tmp_path, text, value):
    recipe = recipe_file(tmp_path)
    # PyYAML (YAML 1.1) reads 1e-4 and 1E-4 as strings: they must still be numbers, on the
    # command line and in the recipe file alike
    cfg = TrainConfig.from_dict({**read_recipe(str(recipe), [f"lr={text}"]), "stage": "sft"})
    assert cfg.lr == value and type(cfg.lr) is float
    recipe.write_text(recipe.read_text() + f"lr: {text}\n")
    cfg = TrainConfig.from_dict({**read_recipe(str(recipe), []), "stage": "sft"}, str(recipe))
    assert cfg.lr == value and type(cfg.lr) is float


def test_settings_take_their_declared_types(tmp_path):
    recipe = str(recipe_file(tmp_path))
    cfg = TrainConfig.from_dict({**read_recipe(recipe, ["fsdp=false", "steps=7", "seed=3",
                                                        "betas=[0.8, 9e-1]",
                                                        "model={dim: 64, rope_theta: 1e4}",
                                                        "aux_coef=null", "data=one.txt"]),
                                 "stage": "sft"})
    assert cfg.fsdp is False and cfg.steps == 7 and cfg.seed == 3
    assert cfg.betas == (0.8, 0.9) and cfg.aux_coef is None and cfg.data == ["one.txt"]
    assert cfg.model == {"dim": 64, "rope_theta": 1e4}
    assert type(cfg.model["rope_theta"]) is float


@pytest.mark.parametrize("override, message", [
    ("steps=1.5", "command line: steps: expected an integer, got 1.5"),
    ("lr=fast", "command line: lr: expected a finite number, got 'fast'"),
    ("lr=.inf", "command line: lr: expected a finite number, got inf"),
    ("fsdp=maybe", "command line: fsdp: expected true or false, got 'maybe'"),
    ("progress=1", "command line: progress: expected true or false, got 1"),
    ("betas=[0.9]", "command line: betas: expected a list of 2 finite numbers, got [0.9]"),
    ("data=[1, 2]", "command line: data: expected a list of strings, got [1, 2]"),
    ("stepz=3", "command line: unknown setting 'stepz' (did you mean 'steps'?)"),
    ("model={dimm: 3}", "command line: model: unknown ModelArgs field 'dimm' (did you mean "
                        "'dim'?)"),
    ("model={dim: 1.5}", "command line: model.dim: expected an integer, got 1.5"),
    ("eval_every=0", "recipe.yaml: eval_every must be at least 1, got 0"),
    ("autocast=fp16", "recipe.yaml: autocast must be none or bf16, got 'fp16'"),
    ("model={dim: 1", "override 'model={dim: 1': not valid YAML"),
])
def test_bad_settings_are_one_line_errors_with_status_2(tmp_path, capsys, override, message):
    recipe = recipe_file(tmp_path)
    assert main(["train", "pretrain", "--config", str(recipe), override]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mixtral train: error: ") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # refused before anything ran


def test_a_recipe_file_is_checked_too(tmp_path, capsys):
    recipe = recipe_file(tmp_path, steps="many", lr="1e-4")
    assert main(["train", "pretrain", "--config", str(recipe)]) == 2
    assert f"{recipe}: steps: expected an integer, got 'many'" in capsys.readouterr().err


def test_an_override_in_e_notation_trains(tmp_path, capsys):
    recipe = recipe_file(tmp_path)
    assert main(["train", "pretrain", "--config", str(recipe), "lr=1e-4", "weight_decay=1E-2"
                 ]) == 0
    state = torch.load(tmp_path / "run" / "step-000002" / "trainer_state.pt", weights_only=True)
    assert state["config"]["lr"] == 1e-4 and state["config"]["weight_decay"] == 1e-2


def test_a_shape_change_on_a_checkpoint_is_refused_not_ignored(tmp_path, capsys):
    """init= a checkpoint brings its shape; a `model` setting that differs from it was once
    silently dropped (a warm-up's shape repeated in the next stage's recipe hid this)."""
    recipe = recipe_file(tmp_path)
    assert main(["train", "pretrain", "--config", str(recipe)]) == 0
    base = tmp_path / "run" / "step-000002"
    same = ["train", "pretrain", "--config", str(recipe), f"init={base}", f"out={tmp_path}/b"]
    assert main([*same, "model={dim: 32}"]) == 0  # what the checkpoint has: fine
    capsys.readouterr()
    assert main([*same, "out=" + str(tmp_path / "c"), "model={dim: 64, n_layers: 1}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model={'dim': 64}: init=" in err and "checkpoint" in err


# --- a stopped run -------------------------------------------------------------------------------

def test_a_training_error_is_one_line_with_status_2(tmp_path, capsys):
    recipe = recipe_file(tmp_path)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "latest").write_text("../elsewhere/step-000002\n")
    assert main(["train", "pretrain", "--config", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mixtral train: error: ") and err.count("\n") == 1
    assert "latest names '../elsewhere/step-000002', which is not a step-N folder" in err


def test_a_half_written_metrics_line_does_not_stop_a_resume(tmp_path):
    """A run killed mid-write leaves a partial last line in metrics.jsonl; resuming drops it
    (it is past the checkpoint) with the records after the checkpoint, and keeps the rest."""
    from mixtral.train.logs import MetricsLog

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n'
                    '{"step": 3, "loss": 1.4}\n{"step": 4, "lo')
    MetricsLog(path, start=2, enabled=True)
    assert path.read_text() == '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n'


def test_fewer_steps_than_a_run_holds_returns_a_kept_step_or_says_why(tmp_path, capsys):
    """Asking a finished run for an earlier step: the checkpoint if it was kept, else one line
    naming the step the run holds (it used to train nothing and print a folder that does not
    exist)."""
    recipe = recipe_file(tmp_path, steps=4, save_every=2, keep=0)
    assert main(["train", "pretrain", "--config", str(recipe)]) == 0
    capsys.readouterr()
    kept = sorted(p.name for p in (tmp_path / "run").glob("step-*"))
    assert kept == ["step-000004"]
    assert main(["train", "pretrain", "--config", str(recipe), "steps=2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already holds step 4, past steps=2" in err
    assert "step-000002 was not kept: ask for steps=4 or more" in err
    assert main(["train", "pretrain", "--config", str(recipe), "steps=4"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].endswith("step-000004")
    other = tmp_path / "kept"
    other.mkdir()
    recipe = recipe_file(other, steps=4, save_every=2, keep=2)
    assert main(["train", "pretrain", "--config", str(recipe)]) == 0
    assert main(["train", "pretrain", "--config", str(recipe), "steps=2"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].endswith("kept/run/step-000002")
    assert (other / "run" / "latest").read_text().strip() == "step-000004"  # left as it was
