"""The lm-evaluation-harness adapter: its scores against log-softmax computed here, generation
against `complete`, chat prompts against `chat.encode`, and the shipped offline tasks end to end.
Skipped without the optional `lm-eval` extra."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from mixtral.chat import encode as chat_encode
from mixtral.checkpoint import save
from mixtral.completion import complete
from mixtral.default_model import random_tiny
from mixtral.generate import GenerationParams
from mixtral.model import Transformer
from mixtral.tokenizer import default_tokenizer

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from mixtral.eval.harness import MixtralLM, evaluate  # noqa: E402

TOK = default_tokenizer()
BOS = TOK.bos_id


@pytest.fixture(scope="module")
def model() -> Transformer:
    return random_tiny()


def requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


@torch.no_grad()
def logprobs(model: Transformer, ids: list[int]) -> torch.Tensor:
    """[len(ids), V]: row p is the log-distribution of the token after ids[p]."""
    return model(torch.tensor([ids]))[0].log_softmax(-1)


def split_like_hflm(context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's causal split: BOS + context; (context + continuation) encoded whole and cut at
    the context's length, trailing spaces of the context going to the continuation."""
    if not context:
        return [BOS], TOK.encode(continuation, bos=False)
    stripped = context.rstrip()
    ctx = TOK.encode(stripped, bos=True)
    return ctx, TOK.encode(stripped + context[len(stripped):] + continuation, bos=True)[len(ctx):]


# --- loglikelihood -------------------------------------------------------------------------------

def test_loglikelihood_equals_log_softmax_of_the_model(model):
    pairs = [("The capital of France is", " Paris"),
             ("", "Hello world"),  # empty context: BOS alone
             ("Question: what is 2 + 2?\nAnswer:", " 4"),
             ("Trailing space ", "moves to the continuation"),
             ("A longer context, with several words and punctuation;", " and a longer answer.")]
    expected = []
    for context, continuation in pairs:
        ctx, cont = split_like_hflm(context, continuation)
        lp = logprobs(model, ctx + cont)
        rows = lp[len(ctx) - 1:len(ctx) + len(cont) - 1]
        target = torch.tensor(cont)
        expected.append((rows.gather(-1, target[:, None]).sum().item(),
                         bool((rows.argmax(-1) == target).all())))
    lm = MixtralLM(model=model, batch_size=len(pairs))  # one padded batch
    got = lm.loglikelihood(requests("loglikelihood", pairs), disable_tqdm=True)
    torch.testing.assert_close([g[0] for g in got], [e[0] for e in expected], rtol=1e-5,
                               atol=1e-4)
    assert [g[1] for g in got] == [e[1] for e in expected]


def test_is_greedy_on_the_models_own_argmax(model):
    ctx = TOK.encode("Once upon a time", bos=True)
    greedy = []
    for _ in range(4):
        greedy.append(int(logprobs(model, ctx + greedy)[-1].argmax()))
    other = greedy[:-1] + [(greedy[-1] + 1) % model.args.vocab_size]
    lm = MixtralLM(model=model, batch_size=2)
    got = lm._loglikelihood_tokens([(None, ctx, greedy), (None, ctx, other)])
    assert [g[1] for g in got] == [True, False]


def test_long_requests_are_truncated_from_the_left(model):
    lm = MixtralLM(model=model, max_length=8)
    ctx, cont = TOK.encode("one two three four five six seven eight nine ten", bos=True), [5, 6]
    kept = (ctx + cont)[-9:]  # max_length inputs + the last token
    lp = logprobs(model, kept[:-1])
    expected = lp[-2, 5] + lp[-1, 6]
    (got, _), = lm._loglikelihood_tokens([(None, ctx, cont)])
    assert got == pytest.approx(float(expected), abs=1e-4)


def test_rolling_loglikelihood_predicts_every_token_once(model):
    text = ("The river ran past the mill and under the old stone bridge, where children "
            "dropped sticks to race them to the other side. ") * 3
    tokens = TOK.encode(text, bos=False)
    for max_length in (16, 2048):  # several windows (the last one partial), and one window
        ext = [BOS] + tokens  # ext[k + 1] is predicted from ext[:k + 1]
        expected, start = 0.0, 0
        while start < len(tokens):
            end = min(start + max_length, len(tokens))
            offset = max(0, end - max_length)
            lp = logprobs(model, ext[offset:end])
            expected += sum(float(lp[k - offset, ext[k + 1]]) for k in range(start, end))
            start = end
        lm = MixtralLM(model=model, max_length=max_length, batch_size=3)
        got = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(text,), ("",)]))
        assert len(tokens) > 3 * 16
        assert got[0] == pytest.approx(expected, rel=1e-5)
        assert got[1] == 0.0


# --- generation ----------------------------------------------------------------------------------

def test_generate_until_equals_greedy_complete_and_stops(model):
    prompts = ["Once upon a time", "The weather today is", "1, 2, 3,"]
    reference = [complete(model, TOK, TOK.encode(p, bos=True), GenerationParams(max_tokens=12)).text
                 for p in prompts]
    ref = reference[0]
    cut = len(ref) // 2
    stop = ref[cut:cut + 2]
    expected = [ref[:ref.find(stop)], reference[1], reference[2]]
    lm = MixtralLM(model=model, batch_size=2)  # three requests through two engine slots
    got = lm.generate_until(requests("generate_until", [
        (prompts[0], {"until": [stop], "max_gen_toks": 12, "do_sample": False}),
        (prompts[1], {"until": [], "max_gen_toks": 12}),
        (prompts[2], {"max_gen_toks": 12, "temperature": 0.0})]))
    assert got == expected


def test_seeded_sampling_is_reproducible(model):
    lm = MixtralLM(model=model, batch_size=2)
    kwargs = {"until": [], "max_gen_toks": 8, "do_sample": True, "temperature": 1.0, "seed": 7}
    reqs = requests("generate_until", [("Hello", kwargs), ("Hello", kwargs)])
    first = lm.generate_until(reqs)
    assert first[0] == first[1] == lm.generate_until(reqs[:1])[0]


# --- chat ----------------------------------------------------------------------------------------

def test_chat_prompts_are_mistral_tokens(model):
    messages = [{"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": "What is 2 + 3?"},
                {"role": "assistant", "content": "5"},
                {"role": "user", "content": "And 4 + 4?"}]
    lm = MixtralLM(model=model)
    text = lm.apply_chat_template(messages)
    assert text == ("<s>[INST] Answer briefly.\n\nWhat is 2 + 3? [/INST] 5</s>"
                    "[INST] And 4 + 4? [/INST]")
    assert lm.tok_encode(text) == chat_encode(messages)
    # a rendering replayed from lm-eval's request cache is parsed at its markers
    assert MixtralLM(model=model).tok_encode(text) == chat_encode(messages)
    # gen_prefix: the final assistant message is continued, not closed
    prefixed = lm.apply_chat_template(messages[:2] + [{"role": "assistant", "content": "It is"}],
                                      add_generation_prompt=False)
    assert lm.tok_encode(prefixed) == chat_encode(
        messages[:2] + [{"role": "assistant", "content": "It is", "prefix": True}])
    ctx, cont = lm._encode_pair(text, " 8")
    assert (ctx, cont) == (chat_encode(messages), TOK.encode(" 8", bos=False))


# --- construction --------------------------------------------------------------------------------

def test_model_args_are_checked(tmp_path):
    with pytest.raises(ValueError, match="unknown model_args key.*pretrained"):
        MixtralLM.create_from_arg_string("pretrained=gpt2")
    with pytest.raises(FileNotFoundError, match="nope"):
        MixtralLM.create_from_arg_string(f"path={tmp_path / 'nope'}")
    with pytest.raises(ValueError, match="batch_size='auto'"):
        MixtralLM(model=random_tiny(), batch_size="auto")


@pytest.mark.slow
@pytest.mark.parametrize("first", ["adapter", "prompts", "running", "__main__"])
def test_the_package_registers_its_model_once_from_any_entry(first):
    """Whichever module is imported first, no import cycle and one registration (lm-eval
    refuses a second class under a name); `python -m` re-runs __main__ in that process."""
    code = (f"import runpy, sys, mixtral.eval.harness.{first}\n"
            "from lm_eval.api.registry import get_model\n"
            "from mixtral.eval.harness import MixtralLM, adapter\n"
            "assert get_model('mixtral') is MixtralLM is adapter.MixtralLM\n"
            "sys.argv = ['lm-eval', '--help']\n"
            "try:\n"
            "    runpy.run_module('mixtral.eval.harness', run_name='__main__')\n"
            "except SystemExit as e:\n"
            "    assert not e.code, e.code\n"
            "assert get_model('mixtral') is MixtralLM\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "--model_args" in out.stdout  # lm-eval's own help


def test_lm_eval_stays_optional():
    code = ("import sys, mixtral, mixtral.eval, mixtral.eval.tasks; "
            "print('lm_eval' in sys.modules, 'datasets' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


# --- the shipped offline tasks, end to end -------------------------------------------------------

def test_evaluate_runs_the_offline_tasks(model, tmp_path, monkeypatch):
    save(model.state_dict(), model.args, tmp_path / "tiny")
    monkeypatch.chdir(tmp_path)  # the task data is found from any working directory
    tasks = ["mixtral_mc_demo", "mixtral_arith_demo", "mixtral_ppl_demo"]
    out = evaluate(str(tmp_path / "tiny"), tasks, limit=5, num_fewshot=None, batch_size=4,
                   seed=0, device="cpu", dtype="fp32", include_path=None)
    json.dumps(out)  # plain JSON
    results = out["results"]
    assert {"acc,none", "acc_norm,none"} <= set(results["mixtral_mc_demo"])
    assert "exact_match,number" in results["mixtral_arith_demo"]
    ppl = results["mixtral_ppl_demo"]
    assert {"word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"} <= set(ppl)
    assert all(0 <= results["mixtral_mc_demo"][k] <= 1 for k in ("acc,none", "acc_norm,none"))
    assert ppl["byte_perplexity,none"] > 1 and math.isfinite(ppl["word_perplexity,none"])
    assert {t: out["n-samples"][t]["effective"] for t in tasks} == dict.fromkeys(tasks, 5)
    assert out["config"]["model_path"] == str(tmp_path / "tiny")


def test_evaluate_names_a_missing_include_path(tmp_path):
    # (an unknown task name is reported too, but only after indexing lm-eval's ~200 folders)
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        evaluate(None, ["mixtral_mc_demo"], include_path=[str(tmp_path / "no_such_dir")])
