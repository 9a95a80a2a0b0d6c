"""`mixtral serve` under load: C concurrent clients for T seconds against /v1/chat/completions,
with or without busy neighbour processes on the same cores. Not a timed test: it measures what
a deployment sees (status codes, latency, time to first token, tok/s, server memory) and checks
what must hold under load whatever the speed (every stream well formed; a seeded request gives
the same text alone and in a busy batch).

    python benchmarks/load.py [--model PATH] [--quant bf16|fp32|int8|int4] [--clients 4]
                              [--seconds 30] [--stream-share 0.5] [--max-tokens 32]
                              [--neighbour N] [--neighbour-kind spin|matmul]
                              [--threads-policy adaptive|fixed]
                              [--server-env KEY=VALUE ...] [--replays 4] [--rss-every 250]
                              [--max-batch B] [--max-queue Q] [--timeout 300]
                              [--ready-timeout 1200] [--seed 0]

  server     `python -m mixtral serve` on a free loopback port, in its own session; its log
             goes to a temporary file (its last line is quoted if it fails to start).
             --server-env KEY=VALUE (repeatable) is added to its environment, so one run
             compares threading policies: OMP_WAIT_POLICY=PASSIVE, GOMP_SPINCOUNT=10000, ...
             --threads-policy is serve's --threads: adaptive (torch's thread count follows
             the cores other processes leave free, mixtral/threads.py) or fixed (torch's own
             count); unset, serve's default (MIXTRAL_THREADS, else fixed)
  model      the built-in default unless --model PATH; --quant bf16/fp32 is serve's --dtype,
             int8/int4 a copy written first by `mixtral quantize` into a temporary folder
  neighbour  N processes that keep one core each busy: spin (`while True: pass`, as in
             RESULTS.md's "loaded") or matmul (single-threaded numpy, which also takes caches
             and memory bandwidth)
  clients    each sends one short chat request after the other (max_tokens 32), a share of them
             streamed; a refused request (429, 503) waits 50 ms before the next
  replays    K requests with random_seed set, sent once alone before the load and again during
             it (every other one streamed); their texts must be identical

Output: one JSON object on stdout, a summary on stderr. Keys: status (requests by status code,
"error: <name>" for a transport failure), latency_s and ttft_s (p50/p95 of the 200s; TTFT is
the first chunk with content, which the server sends once the second token is known: the first
waits to learn whether it is the last, which carries the usage), completion_tokens and tok_s
(from `usage`, over the load's wall time), broken_streams (a 200 stream that ends without
`data: [DONE]`, carries malformed JSON or an error event, or content that is not valid UTF-8)
and bad_responses (the same for a JSON body): both must be 0, rss_mib (the server's VmRSS at
the start and after every --rss-every requests), replays and replays_identical (must be true),
server_alive, threads_policy, and server_cores (the server's CPU-seconds over the clients'
run, replays included, per second of it: ~2 for two threads busy on 2 cores, ~1 for one).
Exit status 0, or 1 when one of the musts failed, 2 on bad input.

To compare the thread count policies, quiet and beside one busy process, interleaved:

    run="python benchmarks/load.py --clients 8 --seconds 20 --replays 2"
    for round in 1 2; do for n in 0 1; do for p in fixed adaptive; do
      $run --threads-policy $p --neighbour $n --neighbour-kind spin > load-$p-$n-$round.json
    done; done; done

Every process it starts is ended on the way out: at the end, on an error, on Ctrl-C/SIGTERM,
and (Linux) even if this script is killed outright.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from load_clients import drive

NEIGHBOURS = {
    "spin": "while True: pass",
    "matmul": "import numpy as np\na = np.random.rand(384, 384)\nwhile True: a @ a",
}


class LoadError(Exception):
    """A run that cannot go on, said in one line (bad input, a server that will not start)."""


def server_env(value: str) -> tuple[str, str]:
    key, sep, val = value.partition("=")
    if not sep or not key or not key.replace("_", "").isalnum():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {value!r}")
    return key, val


def arguments(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", metavar="PATH", help="checkpoint (default: the built-in default)")
    p.add_argument("--quant", choices=["bf16", "fp32", "int8", "int4"])
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--stream-share", type=float, default=0.5, help="fraction streamed (0-1)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--neighbour", type=int, default=0, metavar="N", help="busy processes")
    p.add_argument("--neighbour-kind", choices=sorted(NEIGHBOURS), default="spin")
    p.add_argument("--threads-policy", choices=["adaptive", "fixed"],
                   help="serve's --threads (default: serve's: MIXTRAL_THREADS, else fixed)")
    p.add_argument("--server-env", type=server_env, action="append", default=[],
                   metavar="KEY=VALUE", help="added to the server's environment (repeatable)")
    p.add_argument("--replays", type=int, default=4, metavar="K", help="seeded replays")
    p.add_argument("--rss-every", type=int, default=250, metavar="N")
    p.add_argument("--max-batch", type=int, help="serve's --max-batch (default: serve's)")
    p.add_argument("--max-queue", type=int, help="serve's --max-queue (default: serve's)")
    p.add_argument("--seed", type=int, default=0, help="the clients' choices of prompt/stream")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    p.add_argument("--ready-timeout", type=float, default=1200.0, help="seconds for the "
                   "server to load its model (an 8x7B checkpoint takes minutes)")
    a = p.parse_args(argv)
    for flag, value, low in (("--clients", a.clients, 1), ("--max-tokens", a.max_tokens, 1),
                             ("--neighbour", a.neighbour, 0), ("--replays", a.replays, 0),
                             ("--rss-every", a.rss_every, 1), ("--max-batch", a.max_batch, 1),
                             ("--max-queue", a.max_queue, 1)):
        if value is not None and value < low:
            p.error(f"{flag} must be at least {low}, got {value}")
    for flag, seconds in (("--seconds", a.seconds), ("--timeout", a.timeout),
                          ("--ready-timeout", a.ready_timeout)):
        if not 0 < seconds < float("inf"):
            p.error(f"{flag} must be a positive number of seconds, got {seconds}")
    if not 0 <= a.stream_share <= 1:
        p.error(f"--stream-share must be between 0 and 1, got {a.stream_share}")
    if a.model is not None and not Path(a.model).exists():
        p.error(f"--model {a.model}: no such file or folder")
    return a


# --- the processes ---------------------------------------------------------------------------

def _die_with_parent() -> None:
    """In the child before exec: be killed when this script dies, however it dies (Linux)."""
    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


class Children:
    """The processes and temporary folder of one run, all ended on the way out."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []
        self.tmp = tempfile.TemporaryDirectory(prefix="mixtral-load-")
        self.dir = Path(self.tmp.name)

    def start(self, cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
        with open(log, "wb") as out:  # its own session: a Ctrl-C reaches us, and we end it
            proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True,
                                    preexec_fn=_die_with_parent if sys.platform == "linux"
                                    else None)
        self.procs.append(proc)
        return proc

    def __enter__(self) -> Children:
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in self.procs:  # SIGTERM: the server drains (nothing is in flight by now)
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + 20
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.tmp.cleanup()


def last_line(log: Path) -> str:
    lines = [s for s in log.read_text(errors="replace").splitlines() if s.strip()]
    return lines[-1].strip() if lines else "(no output)"


def model_source(a: argparse.Namespace, kids: Children, env: dict[str, str]) -> list[str]:
    """serve's model flags; for int8/int4 the quantized copy is written first."""
    if a.quant in ("bf16", "fp32"):
        return ([] if a.model is None else ["--model", a.model]) + ["--dtype", a.quant]
    if a.quant is None:
        return [] if a.model is None else ["--model", a.model]
    src = a.model
    if src is None:  # the shipped default's folder, found without importing (torch) mixtral
        spec = importlib.util.find_spec("mixtral")
        assert spec is not None and spec.submodule_search_locations
        src = str(Path(spec.submodule_search_locations[0]) / "data" / "default")
        if not (Path(src) / "model.safetensors").exists():
            raise LoadError(f"--quant {a.quant} needs --model PATH: this build ships no "
                            "trained default model to quantize")
    dst, log = kids.dir / a.quant, kids.dir / "quantize.log"
    proc = kids.start([sys.executable, "-m", "mixtral", "quantize", "--bits", a.quant[3:],
                       src, str(dst)], env, log)
    if proc.wait() != 0:
        raise LoadError(f"mixtral quantize failed: {last_line(log)}")
    return ["--model", str(dst)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(proc: subprocess.Popen, url: str, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise LoadError(f"the server exited with status {proc.returncode} before it was "
                            f"ready: {last_line(log)}")
        try:
            health = httpx.get(url + "/health", timeout=5)
            if health.status_code == 200:
                return
            if health.json().get("status") == "error":
                raise LoadError(f"the server failed to load: {health.json().get('error')}")
        except (httpx.HTTPError, ValueError):
            pass
        if time.monotonic() > deadline:
            raise LoadError(f"the server was not ready after {timeout:g} s: {last_line(log)}")
        time.sleep(0.2)


# --- the run ---------------------------------------------------------------------------------

def run(a: argparse.Namespace, kids: Children) -> dict[str, Any]:
    env = {**os.environ, **dict(a.server_env)}
    flags = model_source(a, kids, env)
    for flag, value in (("--max-batch", a.max_batch), ("--max-queue", a.max_queue),
                        ("--threads", a.threads_policy)):
        flags += [] if value is None else [flag, str(value)]
    port = free_port()
    url, log = f"http://127.0.0.1:{port}", kids.dir / "server.log"
    server = kids.start([sys.executable, "-m", "mixtral", "serve", "--port", str(port),
                         "--grace", "2", *flags],
                        env, log)
    wait_ready(server, url, log, a.ready_timeout)
    one_thread = {**os.environ, **{k: "1" for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                                     "MKL_NUM_THREADS")}}
    neighbours = [kids.start([sys.executable, "-c", NEIGHBOURS[a.neighbour_kind]], one_thread,
                             kids.dir / f"neighbour{i}.log") for i in range(a.neighbour)]
    time.sleep(1.0 if neighbours else 0.0)  # a neighbour that cannot start says so now
    for i, proc in enumerate(neighbours):
        if proc.poll() is not None:
            raise LoadError(f"neighbour {i} exited: {last_line(kids.dir / f'neighbour{i}.log')}")
    cpu, start = cpu_seconds(server.pid), time.monotonic()
    result = asyncio.run(drive(a, url, server.pid))
    used, wall = cpu_seconds(server.pid), time.monotonic() - start
    cores = None if cpu is None or used is None else round((used - cpu) / wall, 2)
    return {"model": a.model or "default", "quant": a.quant, "clients": a.clients,
            "seconds": a.seconds, "stream_share": a.stream_share, "max_tokens": a.max_tokens,
            "neighbour": a.neighbour, "neighbour_kind": a.neighbour_kind,
            "server_env": dict(a.server_env), "threads_policy": a.threads_policy, **result,
            "server_cores": cores, "server_alive": server.poll() is None}


def cpu_seconds(pid: int) -> float | None:
    """CPU-seconds process `pid` has used (all its threads), from /proc; None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def report(r: dict[str, Any]) -> list[str]:
    """The summary for stderr; returns what failed of what must hold."""
    def s(p: dict[str, float | None]) -> str:
        return "/".join("-" if v is None else f"{v:.3f}" for v in p.values())

    env = " ".join(f"{k}={v}" for k, v in r["server_env"].items()) or "inherited"
    print(f"model {r['model']} ({r['quant'] or 'as stored'}), {r['clients']} clients x "
          f"{r['seconds']:g} s, {100 * r['stream_share']:g}% streamed, max_tokens "
          f"{r['max_tokens']}, {r['neighbour']} {r['neighbour_kind']} neighbours, threads "
          f"{r['threads_policy'] or 'as serve chooses'}, server env: {env}", file=sys.stderr)
    codes = ", ".join(f"{k}: {v}" for k, v in r["status"].items())
    print(f"{r['requests']} requests ({codes}) in {r['wall_s']:g} s; latency p50/p95 "
          f"{s(r['latency_s'])} s, TTFT p50/p95 {s(r['ttft_s'])} s; {r['tok_s']:g} tok/s; "
          f"the server used {r['server_cores']} cores", file=sys.stderr)
    rss = ", ".join(f"{x['rss_mib']} @{x['requests']}" for x in r["rss_mib"])
    print(f"server RSS MiB (@requests): {rss}", file=sys.stderr)
    same = sum(x["identical"] for x in r["replays"])
    print(f"broken streams {r['broken_streams']}, bad responses {r['bad_responses']}, seeded "
          f"replays identical {same}/{len(r['replays'])}", file=sys.stderr)
    failed = [f"{r['broken_streams']} broken streams ({'; '.join(r['broken_reasons'])})"
              if r["broken_streams"] else "",
              f"{r['bad_responses']} bad responses" if r["bad_responses"] else "",
              "" if r["replays_identical"] else f"replays differ ({len(r['replays']) - same})",
              "" if r["server_alive"] else "the server died"]
    return [f for f in failed if f]


def _interrupt(sig: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM ends the run as Ctrl-C does: through the cleanup


def main(argv: list[str] | None = None) -> int:
    a = arguments(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        with Children() as kids:
            result = run(a, kids)
    except LoadError as e:
        print(f"load.py: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("load.py: interrupted (the server and neighbours are ended)", file=sys.stderr)
        return 130
    print(json.dumps(result), flush=True)
    failed = report(result)
    if failed:
        print(f"load.py: FAILED: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
