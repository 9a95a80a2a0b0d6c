"""The `mixtral` command line, run in-process (and once as a real subprocess)."""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import sys

import pytest

from mixtral.cli import main


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_info_preset(capsys):
    code, out, _ = run(capsys, "info", "mixtral-8x7b")
    assert code == 0
    assert "46.7B total / 12.9B active" in out
    assert "bf16 86.99 GiB" in out and "128.00 KiB per token" in out and "4.00 GiB per 32768" in out
    code, out, _ = run(capsys, "info", "mixtral-8x7b", "--json")
    report = json.loads(out)
    assert report["params"] == {"total": 46_702_792_704, "active": 12_879_925_248}
    assert report["kv_cache_bytes"]["per_token_bf16"] == 131072
    assert report["weight_bytes"]["int4"] < report["weight_bytes"]["int8"] \
        < report["weight_bytes"]["bf16"]


def test_info_checkpoint(capsys, hf_tiny_dir):
    code, out, _ = run(capsys, "info", str(hf_tiny_dir))
    assert code == 0
    assert "layout hf (Hugging Face safetensors, one tensor per expert" in out
    assert "dtype float32" in out


def test_generate_default_model_is_labelled(capsys):
    from mixtral.default_model import label

    argv = ["generate", "--prompt", "Hello", "--max-tokens", "6", "--seed", "3", "--json",
            "--temperature", "1"]
    code, out, err = run(capsys, *argv)
    assert code == 0
    assert label() in err
    result = json.loads(out)
    assert result["usage"]["prompt_tokens"] == 2 and 1 <= result["usage"]["completion_tokens"] <= 6
    assert result["finish_reason"] in ("stop", "length")
    code, again, _ = run(capsys, *argv)
    assert json.loads(again)["text"] == result["text"]  # same seed, same text


@pytest.fixture
def tiny_dir(tmp_path):
    from mixtral.checkpoint import save
    from mixtral.default_model import random_tiny

    model = random_tiny()
    save(model.state_dict(), model.args, tmp_path / "tiny")
    return tmp_path / "tiny"


def test_generate_chat_from_checkpoint(capsys, hf_tiny_dir, tmp_path):
    # vocab 320 model: the chat prompt has ids beyond its vocabulary -> a clear error
    code, _, err = run(capsys, "generate", "--model", str(hf_tiny_dir), "--prompt", "Hi",
                       "--chat", "--safe-prompt")
    assert code == 2 and "outside the vocabulary [0, 320)" in err


def test_chat_session(capsys, monkeypatch, tiny_dir):
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi there\n/reset\nAgain\n/exit\nignored\n"))
    code, out, err = run(capsys, "chat", "--model", str(tiny_dir), "--max-tokens", "4",
                         "--temperature", "0", "--system", "Be brief.")
    assert code == 0
    assert "[conversation reset]" in err
    assert len(out.splitlines()) == 2  # two answers, then /exit


def test_convert_and_errors(capsys, hf_tiny_dir, tmp_path):
    code, out, _ = run(capsys, "convert", str(hf_tiny_dir), str(tmp_path / "m"), "--to",
                       "mistral")
    assert code == 0 and "consolidated.safetensors" in out
    code, _, err = run(capsys, "info", str(tmp_path / "missing"))
    assert code == 2 and "no such file or directory" in err
    code, _, err = run(capsys, "convert", str(hf_tiny_dir), str(tmp_path / "x"), "--to", "hf",
                       "--shard-size", "lots")
    assert code == 2 and "--shard-size 'lots'" in err
    with pytest.raises(SystemExit):
        main(["convert", str(hf_tiny_dir), str(tmp_path / "y"), "--to", "gguf"])


def test_python_dash_m_and_console_script():
    for cmd in ([sys.executable, "-m", "mixtral", "info", "tiny"],
                [str(__import__("pathlib").Path(sys.executable).parent / "mixtral"), "info",
                 "tiny"]):
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        assert "tiny (preset)" in out


class Terminal(io.StringIO):
    """stderr as a terminal: where progress bars are drawn."""

    def isatty(self) -> bool:
        return True


def test_convert_and_quantize_show_progress_on_a_terminal_only(capsys, monkeypatch, tiny_dir,
                                                                tmp_path):
    jobs = [["convert", str(tiny_dir), str(tmp_path / "c"), "--to", "hf", "--shard-size", "1MB"],
            ["quantize", str(tiny_dir), str(tmp_path / "q"), "--bits", "8"]]
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    for argv in jobs:
        assert main(argv) == 0
    bars = terminal.getvalue()
    for label in ("convert: writing: 100%", "quantize: writing: 100%"):  # one pass: it streams
        assert label in bars, bars
    monkeypatch.undo()
    for argv in jobs:  # stderr a pipe or a file: no bar
        argv[2] += "-again"
        assert main(argv) == 0
    out, err = capsys.readouterr()
    assert err == "" and "model.safetensors" in out  # stdout: the files written, as before


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_files_take_the_usual_mode(tiny_dir, tmp_path, umask):
    """0666 less the umask (0644 under the usual 022): a shared model folder stays readable."""
    (tiny_dir / "tokenizer.model").write_bytes(b"not a real tokenizer")  # convert copies it
    (tiny_dir / "tokenizer.model").chmod(0o600)
    old = os.umask(umask)
    try:
        assert main(["convert", str(tiny_dir), str(tmp_path / "c"), "--to", "mistral"]) == 0
        assert main(["quantize", str(tiny_dir), str(tmp_path / "q"), "--bits", "4"]) == 0
    finally:
        os.umask(old)
    files = [f for f in (tmp_path / "c").iterdir()] + [f for f in (tmp_path / "q").iterdir()]
    assert {f.name for f in files} >= {"params.json", "consolidated.safetensors",
                                       "tokenizer.model", "config.json", "model.safetensors"}
    assert {f.name: stat.S_IMODE(f.stat().st_mode) for f in files} == \
        {f.name: 0o666 & ~umask for f in files}


def test_the_default_models_label_states_its_size():
    """The label's parameter count is the loaded model's (it was a constant in the code)."""
    from mixtral.default_model import HAS_SHIPPED, label, load_default

    if not HAS_SHIPPED:
        assert "RANDOM weights" in label()
        return
    total = sum(p.numel() for p in load_default().parameters())
    assert f" {total / 1e6:.1f}M-parameter " in label()
