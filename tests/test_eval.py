"""The evaluations: passkey prompt construction and scoring, perplexity fast path = slow path,
routing statistics on routers whose choices are known, and each command end to end."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
import torch
from conftest import hf_mixtral
from torch import nn

from mixtral.cli import main
from mixtral.config import ModelArgs
from mixtral.default_model import random_tiny
from mixtral.eval import passkey, perplexity, routing
from mixtral.tokenizer import default_tokenizer

TOK = default_tokenizer()
WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly hum "
         "strange tunes beside the old river").split()


def prose(seed: int, words: int) -> str:
    r = random.Random(seed)
    return " ".join(r.choice(WORDS) for _ in range(words)) + "."


# --- passkey ---------------------------------------------------------------------------------

@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("length", [120, 700, 3000])
@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 1.0])
def test_passkey_prompt_has_the_length_and_depth_asked(chat, length, depth):
    p = passkey.build_prompt(TOK, length, depth, 4321, chat)
    assert length - 8 <= len(p.ids) <= length  # whole sentences: within one sentence
    assert TOK.decode(p.ids[p.key_position:]).startswith("The pass key is 4321. Remember it.")
    assert abs((p.key_position - p.filler_start) - depth * p.filler_tokens) <= 8
    text = TOK.decode(p.ids)
    assert text.count("4321") == 2 and passkey.QUESTION in text
    assert ("[INST]" in text) == chat


def test_passkey_prompt_errors():
    with pytest.raises(ValueError, match="at least .* tokens; length 20 is too short"):
        passkey.build_prompt(TOK, 20, 0.5, 1)
    with pytest.raises(ValueError, match="depth must be within 0..1, got 1.5"):
        passkey.build_prompt(TOK, 500, 1.5, 1)
    assert passkey.parse_lengths("1k, 2k,512") == [1024, 2048, 512]
    with pytest.raises(ValueError, match="bad length 'x1'"):
        passkey.parse_lengths("1k,x1")
    assert passkey.depths(3) == [0.0, 0.5, 1.0] and passkey.depths(1) == [0.5]


def test_passkey_scoring():
    key_ids = TOK.encode("12345", bos=False)
    assert passkey.score(TOK, key_ids + TOK.encode(". Done", bos=False), 12345) == (True, True)
    # the first integer decides; the strict score wants the key's own tokens first
    assert passkey.score(TOK, TOK.encode("it is 12345", bos=False), 12345) == (True, False)
    assert passkey.score(TOK, TOK.encode("1234 or 12345", bos=False), 12345) == (False, False)
    assert passkey.score(TOK, TOK.encode("no idea", bos=False), 12345) == (False, False)
    # ... and is not a subset of the first: a longer number starts with the key's tokens
    assert passkey.score(TOK, TOK.encode("123456", bos=False), 12345) == (False, True)


class _Parrot(nn.Module):
    """A 'model' that answers every passkey prompt correctly: it reads the key in the prompt
    it is given and emits the key's tokens, then </s>. Exercises run()'s bookkeeping."""

    dtype, device = torch.float32, torch.device("cpu")  # a runner (mixtral.model.Runner)

    def __init__(self, then: str = "") -> None:  # then: digits said after the key
        super().__init__()
        self.then = then
        self.args = ModelArgs(dim=8, n_layers=1, n_heads=1, n_kv_heads=1, head_dim=8,
                              hidden_dim=8, max_seq_len=4096)

    def forward(self, tokens, positions, cache, last_only=False):
        if tokens.shape[1] > 1:  # the prompt, in one chunk
            key = re.search(r"The pass key is (\d+)\.", TOK.decode(tokens[0].tolist()))[1]
            self.answer, self.step = TOK.encode(key + self.then, bos=False) + [TOK.eos_id], 0
        logits = torch.zeros(1, 1, self.args.vocab_size)
        logits[0, 0, self.answer[min(self.step, len(self.answer) - 1)]] = 1
        self.step += 1
        return logits


def test_passkey_run_bookkeeping():
    result = passkey.run(_Parrot(), TOK, [200, 400], 3, 2, seed=7)
    assert result["accuracy"] == [[1.0] * 3] * 2 and result["overall"] == 1.0
    assert [c["mean_key_depth"] for c in result["cells"][:3]] == \
        pytest.approx([0.0, 0.5, 1.0], abs=0.05)
    assert all(190 <= c["mean_prompt_tokens"] <= 200 for c in result["cells"][:3])
    with pytest.raises(ValueError, match="passkey length 8000 .* context is 4096"):
        passkey.run(_Parrot(), TOK, [200, 8000], 3, 2)


def test_passkey_metrics_are_named_and_explained():
    """Each score has a grid, an overall and a sentence in the result; a model that says the
    key and one digit more fails the first and passes the second, so their overalls cross."""
    for then, first, second in (("", 1.0, 1.0), ("7", 0.0, 1.0)):
        result = passkey.run(_Parrot(then), TOK, [200, 300], 2, 2, seed=1)
        assert set(result["metrics"]) == {"accuracy", "starts_with_key_tokens"}
        assert (result["overall"], result["overall_starts_with_key_tokens"]) == (first, second)
        assert result["accuracy"] == [[first] * 2] * 2
        assert result["starts_with_key_tokens"] == [[second] * 2] * 2
        assert [(c["accuracy"], c["starts_with_key_tokens"]) for c in result["cells"]] == \
            [(first, second)] * 4
        assert "overall_exact" not in result and "exact" not in result["cells"][0]


# --- perplexity ------------------------------------------------------------------------------

def test_perplexity_one_pass_equals_one_forward_per_length():
    model = random_tiny(torch.float32)
    docs = [(f"d{i}", TOK.encode(prose(i, 60))) for i in range(3)]
    lengths = [8, 16, 40, 64]
    fast = perplexity.curve(model, docs, lengths, chunk=16)  # several chunks per document
    slow = perplexity.reference_curve(model, docs, lengths)
    for a, b in zip(fast, slow, strict=True):
        assert a["length"] == b["length"] and a["tokens"] == b["tokens"] == 3 * (a["length"] - 1)
        assert a["perplexity"] == pytest.approx(b["perplexity"], rel=1e-5)
        assert a["perplexity_mean_of_documents"] == pytest.approx(
            b["perplexity_mean_of_documents"], rel=1e-5)


def test_perplexity_documents_and_ladder(tmp_path):
    (tmp_path / "a.txt").write_text("one document")
    (tmp_path / "b.jsonl").write_text('{"text": "two"}\n\n{"text": "three"}\n')
    assert [n for n, _ in perplexity.read_documents(tmp_path)] == ["a.txt", "b.jsonl:1",
                                                                   "b.jsonl:3"]
    (tmp_path / "c.jsonl").write_text('{"text": "ok"}\n{"txt": 1}\n')
    with pytest.raises(ValueError, match=r"c.jsonl:2: expected a JSON object with a \"text\""):
        perplexity.read_documents(tmp_path)
    assert perplexity.ladder(1000) == [128, 256, 512, 1000]
    with pytest.raises(ValueError, match="no document has 5000 tokens"):
        perplexity.select(TOK, [("x", "short")], 5000)
    rows = [{"perplexity": p} for p in (10.0, 9.0, 9.05, 8.0)]
    assert perplexity.monotone(rows, 0.01) and not perplexity.monotone(rows, 0.001)


# --- routing ---------------------------------------------------------------------------------

class _FixedGate(nn.Module):
    """Row i of the flattened batch picks expert i % E first and (i + 1) % E second."""

    def __init__(self, experts: int) -> None:
        super().__init__()
        self.experts = experts

    def forward(self, x):
        i = torch.arange(x.shape[0])
        logits = torch.zeros(x.shape[0], self.experts, dtype=x.dtype)
        logits[i, i % self.experts] = 2.0
        logits[i, (i + 1) % self.experts] = 1.0
        return logits


def test_routing_statistics_of_a_known_router():
    model = random_tiny(torch.float32)
    E = model.args.num_experts
    for layer in model.layers:
        layer.feed_forward.gate = _FixedGate(E)
    T = 29  # BOS + 28 text tokens: rows 1..28 count
    c = routing.choices(model, TOK.encode(prose(0, 40))[:T], chunk=T)[:, 1:]
    assert c.shape == (2, T - 1, 2)
    stats = routing.statistics([c], E)
    rows = range(1, T)
    first = [sum(1 for i in rows if i % E == e) / (T - 1) for e in range(E)]
    second = [sum(1 for i in rows if (i + 1) % E == e) / (T - 1) for e in range(E)]
    for layer in range(2):
        assert stats["first"][layer] == pytest.approx(first)
        assert stats["second"][layer] == pytest.approx(second)
        assert stats["either"][layer] == pytest.approx([(f + s) / 2 for f, s in
                                                        zip(first, second, strict=True)])
        assert stats["repeat_first"][layer] == 0.0  # i % E never equals (i + 1) % E
        assert stats["repeat_either"][layer] == 1.0  # (i + 1) % E is in both sets
    assert stats["tokens"] == T - 1 and stats["pairs"] == T - 2


def test_routing_random_router_matches_the_chance_levels():
    g = torch.Generator().manual_seed(0)
    n, E = 20000, 8
    c = torch.stack([torch.rand(n, E, generator=g).topk(2).indices for _ in range(3)])
    stats = routing.statistics([c], E)
    b = routing.baselines(E, 2)
    assert b == {"first": 0.125, "either": pytest.approx(13 / 28)}
    sd = (0.25 / n) ** 0.5  # binomial standard deviation bound
    for layer in range(3):
        assert stats["repeat_first"][layer] == pytest.approx(b["first"], abs=5 * sd)
        assert stats["repeat_either"][layer] == pytest.approx(b["either"], abs=5 * sd)
        assert sum(stats["first"][layer]) == pytest.approx(1.0)
        assert sum(stats["either"][layer]) == pytest.approx(1.0)
    assert routing.table_layers(32) == [0, 15, 31] and routing.table_layers(1) == [0]


def test_routing_windows_respect_limits():
    docs = [("a", prose(1, 300)), ("b", prose(2, 300))]
    w = routing.windows(TOK, docs, 64, 150)
    assert all(x[0] == TOK.bos_id and len(x) <= 64 for x in w)
    assert sum(len(x) - 1 for x in w) == 150


# --- the commands, end to end ----------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    """A checkpoint written by transformers itself (HF layout), with the real vocabulary."""
    path = tmp_path_factory.mktemp("hf")
    hf_mixtral(vocab_size=32000, max_position_embeddings=1024, std=0.05).save_pretrained(path)
    return path


def cli(capsys, *argv: str) -> tuple[int, dict, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, (json.loads(out.strip().splitlines()[-1]) if code == 0 else {}), err


def test_eval_commands_on_an_hf_checkpoint(capsys, hf_dir, tmp_path):
    out = tmp_path / "ev"
    code, summary, _ = cli(capsys, "eval", "passkey", "--model", str(hf_dir), "--lengths",
                           "128,256", "--depths", "3", "--trials", "2", "--out", str(out))
    assert code == 0 and summary["trials"] == 2 and 0 <= summary["overall"] <= 1
    result = json.loads((out / "passkey.json").read_text())
    assert len(result["accuracy"]) == 2 and all(len(r) == 3 for r in result["accuracy"])
    assert {"length", "depth", "trials", "accuracy", "starts_with_key_tokens",
            "mean_prompt_tokens", "mean_key_depth"} <= set(result["cells"][0])
    assert summary["chat"] is False and "no sign of an instruct model" in summary["chat_reason"]
    assert result["chat"] is False and result["chat_reason"] == summary["chat_reason"]

    data = tmp_path / "docs"
    data.mkdir()
    for i in range(3):
        (data / f"doc{i}.txt").write_text(prose(i, 200))
    code, summary, _ = cli(capsys, "eval", "perplexity", "--model", str(hf_dir), "--data",
                           str(data), "--max-len", "160", "--out", str(out))
    assert code == 0 and summary["documents"] == 3
    assert list(summary["perplexity"]) == ["128", "160"]
    result = json.loads((out / "perplexity.json").read_text())
    assert result["documents"] == ["doc0.txt", "doc1.txt", "doc2.txt"]
    assert isinstance(result["monotone_decreasing"], bool)

    domains = tmp_path / "domains"  # as the README's example: domains/code.py is a domain
    domains.mkdir()
    (domains / "code.py").write_text("def f(x):\n    return x + 1\n" * 20)
    (domains / "prose.jsonl").write_text(json.dumps({"text": prose(5, 300)}) + "\n")
    code, summary, err = cli(capsys, "eval", "routing", "--model", str(hf_dir), "--data",
                             str(domains), "--max-len", "128", "--html",
                             str(domains / "code.py"), "--out", str(out))
    assert code == 0 and summary["domains"] == ["code", "prose"]
    assert "| chance | 12.5 % | 12.5 % | 46.4 % | 46.4 % |" in err
    result = json.loads((out / "routing.json").read_text())
    d = result["domains"]["prose"]
    assert len(d["first"]) == 2 and len(d["first"][0]) == 8 and d["tokens"] > 200
    assert "expert" in (out / "routing.html").read_text()
    for name in ("passkey.png", "perplexity.png", "routing.png", "routing_repetition.png",
                 "routing.md"):
        assert (out / name).stat().st_size > 0
    log = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    assert [r["command"] for r in log] == ["eval passkey", "eval perplexity", "eval routing"]
    assert all(r["model"] == str(hf_dir) and r["seconds"] > 0 for r in log)


def test_eval_default_model_and_clear_errors(capsys, tmp_path):
    from mixtral.default_model import HAS_SHIPPED

    argv = ("eval", "passkey", "--lengths", "200", "--depths", "2", "--trials", "1", "--out",
            str(tmp_path))
    code, summary, err = cli(capsys, *argv, "--chat")
    assert code == 0 and summary["model"].startswith("default")
    assert summary["chat"] is True and summary["chat_reason"] == "--chat"
    code, summary, err = cli(capsys, *argv)  # the shipped default is tuned for chat: chat
    assert code == 0 and summary["chat"] is HAS_SHIPPED
    assert f"[mixtral] passkey: {'the instruct format' if HAS_SHIPPED else 'plain'}" in err
    code, summary, err = cli(capsys, *argv, "--plain")
    assert code == 0 and summary["chat"] is False and summary["chat_reason"] == "--plain"
    code, _, err = cli(capsys, "eval", "passkey", "--lengths", "64k", "--out", str(tmp_path))
    assert code == 2 and "passkey length 65536" in err and "context is" in err
    code, _, err = cli(capsys, "eval", "perplexity", "--data", str(tmp_path / "nope"),
                       "--out", str(tmp_path))
    assert code == 2 and "nope: no such file or folder" in err


def test_routing_domains_are_any_text_files(tmp_path):
    code = "def f(x):\n    return x + 1\n"
    (tmp_path / "code.py").write_text(code)
    (tmp_path / "prose.txt").write_text("Once upon a time.")
    (tmp_path / "data.jsonl").write_text('{"text": "one"}\n{"text": "two"}\n')
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.md").write_text("# notes")
    (tmp_path / "notes" / "__pycache__").mkdir()  # bytecode and dot files are never documents
    (tmp_path / "notes" / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"\xa7\r\r\n\x00")
    (tmp_path / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1\xff")
    got = routing.domains(tmp_path)
    assert got == {"code": [("code.py", code)], "data": [("data.jsonl:1", "one"),
                                                          ("data.jsonl:2", "two")],
                   "notes": [("a.md", "# notes")], "prose": [("prose.txt", "Once upon a time.")]}
    (tmp_path / "code.txt").write_text("more")  # two share a stem: each keeps its whole name
    assert {"code.py", "code.txt"} <= set(routing.domains(tmp_path))
    (tmp_path / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff")
    with pytest.raises(ValueError, match=r"logo.png: not UTF-8 text"):
        routing.domains(tmp_path)
    (tmp_path / "logo.png").unlink()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty: no domains"):
        routing.domains(tmp_path / "empty")
    with pytest.raises(ValueError, match="empty: no files"):  # an empty domain is named
        routing.domains(tmp_path)


def test_the_prompt_format_follows_the_evidence(tmp_path):
    from mixtral.default_model import HAS_SHIPPED
    from mixtral.eval.instruct import prompt_format

    base, tuned, broken = (tmp_path / n for n in ("base", "tuned", "broken"))
    for folder, config in ((base, '{"bos_token": "<s>"}'), (broken, "{not json"),
                           (tuned, json.dumps({"chat_template": "{{ messages }}"}))):
        folder.mkdir()
        (folder / "tokenizer_config.json").write_text(config)
    (tuned / "model.safetensors").write_bytes(b"")
    assert prompt_format(str(base))[0] is False and prompt_format(str(broken))[0] is False
    assert prompt_format(str(tuned)) == (True, f"{tuned / 'tokenizer_config.json'} has a chat "
                                               "template")
    assert prompt_format(str(tuned / "model.safetensors"))[0]  # a weights file: its folder
    named = tmp_path / "Mixtral-8x7B-Instruct-v0.1"
    snapshot = tmp_path / "models--mistralai--Mixtral-8x7B-Instruct-v0.1" / "snapshots" / "ab12"
    for folder in (named, snapshot):
        folder.mkdir(parents=True)
        assert prompt_format(str(folder))[0], folder
    assert prompt_format("mistralai/Mixtral-8x7B-Instruct-v0.1")[0]  # a hub id
    assert not prompt_format("mistralai/Mixtral-8x7B-v0.1")[0]
    assert prompt_format(None)[0] is HAS_SHIPPED


def test_eval_chunking_does_not_change_routing():
    model = random_tiny(torch.float32)
    ids = TOK.encode(prose(3, 80))
    assert torch.equal(routing.choices(model, ids, chunk=7), routing.choices(model, ids,
                                                                             chunk=1024))


def test_eval_lm_command(capsys, hf_dir, tmp_path):
    pytest.importorskip("lm_eval")
    code, summary, _ = cli(capsys, "eval", "lm", "--model", str(hf_dir), "--tasks",
                           "mixtral_mc_demo", "--limit", "3", "--out", str(tmp_path))
    assert code == 0
    scores = summary["results"]["mixtral_mc_demo"]
    assert scores["sample_len"] == 3 and 0 <= scores["acc,none"] <= 1
    assert (tmp_path / "lm_eval.json").exists()
    assert json.loads((tmp_path / "runs.jsonl").read_text())["command"] == "eval lm"
