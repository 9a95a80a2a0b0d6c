"""benchmarks/: every script starts. A benchmark that dies on a typo after minutes of setup costs
a whole measuring session, so each script (found by its `if __name__ == "__main__"`, so a new
one is covered too) must answer --help with its usage and exit 0, and a bad flag with exit 2 and
an argparse error; each shell script must parse (bash -n). Where a script has a cheap mode it
runs for real: machine_roofline.py --smoke, bench_mixtral.py on the tiny preset piped through
show.py, and summarize.py on that output, its table's roofline checked against the formula.
check_agreement.compare is checked against hand-computed agreement figures.

The --help runs share one Python process (runpy, each with its own directory first on sys.path
as `python script.py` has), so torch and transformers are imported once, not twenty times.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"
ANCHORS = BENCHMARKS / "anchors"
SCRIPTS = sorted(p for p in BENCHMARKS.rglob("*.py") if '__name__ == "__main__"' in p.read_text())
SHELL = sorted(BENCHMARKS.rglob("*.sh"))
# only the anchors' own venv has these (benchmarks/anchors/setup_anchor_env.sh builds it)
ANCHOR_VENV_ONLY = {"llama_cpp", "psutil"}

FLAGS = ("--help", "--no-such-flag")
# argv: the scripts; prints {flag: {script: {code, missing, text}}} as JSON
DRIVER = r"""
import contextlib, io, json, os, runpy, sys
paths, out = sys.argv[1:], {}
for flag, path in [(f, p) for f in FLAGS for p in paths]:
    buf, code, missing = io.StringIO(), None, None
    sys.argv = [path, flag]
    sys.path.insert(0, os.path.dirname(path))
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            runpy.run_path(path, run_name="__main__")
        code = "returned without exiting"
    except SystemExit as e:
        code = e.code
    except ModuleNotFoundError as e:
        missing = e.name
    except BaseException as e:
        code = repr(e)
    finally:
        sys.path.pop(0)
    out.setdefault(flag, {})[path] = dict(code=code, missing=missing, text=buf.getvalue())
print(json.dumps(out))
""".replace("FLAGS", repr(FLAGS))


def run(*argv: str | Path, input: str | None = None, **kw) -> subprocess.CompletedProcess:
    """argv run to its end; stdin is `input`, or empty (a script that reads it must not wait)."""
    stdin = {"input": input} if input is not None else {"stdin": subprocess.DEVNULL}
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=600,
                          **stdin, **kw)


@pytest.fixture(scope="module")
def answers() -> dict[str, dict[str, dict]]:
    """Each script's answer to --help and to a flag nobody has, all from one process."""
    r = run(sys.executable, "-c", DRIVER, *SCRIPTS)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.splitlines()[-1])


def _answer(answers: dict, flag: str, script: Path) -> dict:
    a = answers[flag][str(script)]
    if a["missing"] in ANCHOR_VENV_ONLY:
        pytest.skip(f"{script.name} needs {a['missing']} (the anchors' venv)")
    assert a["missing"] is None, f"{script.name}: no module {a['missing']!r}"
    return a


def test_scripts_found() -> None:
    names = {p.name for p in SCRIPTS}
    assert {"load.py", "machine_roofline.py", "summarize.py", "bench_mixtral.py"} <= names
    assert "common.py" not in names and "load_clients.py" not in names  # modules, not scripts


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(BENCHMARKS)))
def test_help(answers: dict, script: Path) -> None:
    a = _answer(answers, "--help", script)
    assert a["code"] in (0, None), f"{script.name} --help: {a['code']}\n{a['text'][-2000:]}"
    assert a["text"].startswith(f"usage: {script.name}"), a["text"][:500]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(BENCHMARKS)))
def test_bad_flag(answers: dict, script: Path) -> None:
    a = _answer(answers, "--no-such-flag", script)
    assert a["code"] == 2, f"{script.name} --no-such-flag: {a['code']}\n{a['text'][-2000:]}"
    assert f"{script.name}: error: " in a["text"].splitlines()[-1], a["text"][-500:]
    assert "Traceback" not in a["text"]


# counts that would leave nothing measured: these scripts once ran on and died on a median of
# nothing (a NameError after minutes of setup), and grammar_engines.py wrote its results file
@pytest.mark.parametrize("script,flag", [("prefix_cache.py", "--turns"),
                                         ("prefix_cache.py", "--repeats"),
                                         ("grammar_engines.py", "--compile-reps"),
                                         ("grammar_engines.py", "--timing-runs")])
def test_a_count_of_zero_is_refused_by_name(script: str, flag: str, tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, str(BENCHMARKS / script), flag, "0"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert f"argument {flag}: expected a whole number above 0, got '0'" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("script", SHELL, ids=lambda p: str(p.relative_to(BENCHMARKS)))
def test_shell_parses(script: Path) -> None:
    r = run("bash", "-n", script)
    assert r.returncode == 0, r.stderr


def test_roofline_smoke(tmp_path: Path) -> None:
    """The fixed timing code runs end to end; no file lands in $BENCH_OUT without --out."""
    env = dict(os.environ, BENCH_OUT=str(tmp_path / "default"))
    r = run(sys.executable, ANCHORS / "machine_roofline.py", "--smoke", "--threads", "1", env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not (tmp_path / "default").exists()
    out = tmp_path / "r.json"
    r = run(sys.executable, ANCHORS / "machine_roofline.py", "--smoke", "--threads", "1",
            "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["smoke"] is True and res["threads"] == 1
    for dt in ("fp32", "bf16"):
        for key in (f"gemm64_{dt}_GFLOPs", f"gemv256_{dt}_GFLOPs", f"gemv256_{dt}_weight_GBps",
                    f"linear_b1_256_{dt}_weight_GBps", f"gemv_expert56x16_{dt}_GFLOPs_incache"):
            assert res[key]["n"] >= 1 and 0 < res[key]["min"] <= res[key]["median"], key
    assert res["bw_numpy_copy_GBps"]["n"] == 1


def test_mixtral_anchor_pipeline(tmp_path: Path) -> None:
    """bench_mixtral.py on the tiny preset -> show.py -> summarize.py, as compare.sh chains them;
    summarize's roofline = best bandwidth / weight bytes a token reads, and a --smoke roofline
    file beside the real one is ignored."""
    results, models = tmp_path / "results", tmp_path / "models"
    (models / "bench").mkdir(parents=True)
    (models / "bench" / "bench_info.json").write_text(json.dumps(
        {"config": {"num_local_experts": 8, "num_experts_per_tok": 2}}))
    r = run(sys.executable, ANCHORS / "bench_mixtral.py", "--model", "tiny", "--quant", "fp32",
            "--threads", "1", "--prefill-len", "16", "--prompt-len", "8", "--new-tokens", "3",
            "--batch", "2", "--out", results / "results.jsonl")
    assert r.returncode == 0, r.stderr[-3000:]
    recs = [json.loads(line) for line in (results / "results.jsonl").read_text().splitlines()]
    assert [x["metric"] for x in recs] == ["prefill", "decode_b1", "decode_b2"]
    assert all(x["tok_s"] > 0 and x["engine"] == "mixtral" for x in recs)

    shown = run(sys.executable, ANCHORS / "show.py", input=r.stdout + "noise\n")
    assert shown.returncode == 0, shown.stderr
    assert [line.split()[0] for line in shown.stdout.splitlines()] == \
        ["prefill", "decode_b1", "decode_b2"]

    def roofline(name: str, bw: float, smoke: bool) -> None:
        (results / name).write_text(json.dumps({"smoke": smoke, "bw_torch_read_GBps": {
            "median": bw, "min": bw, "max": bw, "n": 1}}))

    roofline("roofline.json", 10.0, False)
    roofline("roofline-smoke.json", 1e6, True)
    summary = tmp_path / "summary.json"
    r = run(sys.executable, ANCHORS / "summarize.py", "--results", results, "--models", models,
            "--json", summary)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads(summary.read_text())
    assert s["bw_GBps"] == 10.0
    (row,) = s["rows"]
    b1 = recs[0]["dense_bytes"] + recs[0]["expert_bytes"] * 2 / 8
    assert row["roof1"] == pytest.approx(10.0 / b1 * 1e9, rel=1e-12)
    assert "**mixtral (this project)** | 1 | fp32 |" in r.stdout


COMPARE = r"""
import json, sys
import numpy as np
from check_agreement import compare
ref = np.array([[0., 5, 1, 2, 3, 4, -1], [9, 1, 2, 3, 4, 5, 6]])
got = np.array([[0., 5, 1, 2, 3, 4, -1], [1, 9, 2, 3, 4, 5, 0]])
out = compare(ref, np.array([[1, 2, 3], [4, 5, 6]]), got, np.array([[1, 2, 3], [4, 0, 6]]))
try:
    compare(ref, np.ones((2, 3)), got[:1], np.ones((1, 3)))
    out["short"] = "no error"
except ValueError as e:
    out["short"] = type(e).__name__
print(json.dumps(out))
"""


def test_agreement_figures() -> None:
    """check_agreement.compare against figures worked out by hand; one side short of rows is an
    error, not a mean over fewer prompts."""
    r = run(sys.executable, "-c", COMPARE, cwd=ANCHORS)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    # row 0 identical; row 1: top-1 moves from index 0 to 1, its top-5 {0,6,5,4,3} vs {1,5,4,3,2}
    assert out["top1_agree"] == "1/2"
    assert out["top5_overlap"] == pytest.approx((5 / 5 + 3 / 5) / 2)
    assert out["max_abs_logit_err"] == 8.0
    assert out["greedy_leading_match"] == [3, 1] and out["greedy_full_match"] == "1/2"
    assert out["greedy_tokens"] == 3
    assert out["short"] == "ValueError"
