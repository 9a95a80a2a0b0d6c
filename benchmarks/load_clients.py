"""The client side of benchmarks/load.py: chat requests over HTTP, every answer checked as it is
read (a stream event by event: its JSON, UTF-8, the closing `data: [DONE]`), and the figures of
a run (status codes, percentiles, tok/s, the server's RSS, the seeded replays).

Only the public HTTP API is used, never the server's code: what is measured is what a client
sees. load.py runs it; `drive` is the whole load.
"""

from __future__ import annotations

import argparse
import asyncio
import codecs
import json
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

MODEL = "mistral-small"  # an alias every `mixtral serve` answers to, whatever it loaded
ROUTE = "/v1/chat/completions"
PROMPTS = ["Hello! How are you today?", "Write a haiku about the sea.",
           "What is the capital of France?", "Give me three tips for learning to cook.",
           "Explain what a mixture of experts is in one sentence.", "Tell me a short joke.",
           "List four colours.", "What should I name my cat?"]
REPLAY_PROMPTS = ["Tell me a story about a dragon.", "Describe your ideal weekend.",
                  "What is your favourite book and why?", "Invent a new word and define it."]
REPLAY_SEED = 1000  # replay k samples with REPLAY_SEED + k


@dataclass
class Outcome:
    """One request as the client saw it."""
    status: int | str  # the HTTP status, or "error: <exception>" when no response came
    latency: float
    stream: bool
    ttft: float | None = None
    tokens: int = 0
    text: str = ""
    problem: str | None = None  # why a 200's body is not what the API promises


class StreamError(Exception):
    """An error event inside a 200 stream (the server failed after the headers went out)."""


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None  # gone, or not Linux


def body(prompt: str, max_tokens: int, stream: bool, seed: int | None = None) -> dict[str, Any]:
    b: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": prompt}],
                         "max_tokens": max_tokens, "stream": stream}
    if seed is not None:
        b.update(random_seed=seed, temperature=1.0)  # sampled, so that the seed matters
    return b


async def request(http: httpx.AsyncClient, b: dict[str, Any]) -> Outcome:
    t0 = time.perf_counter()
    stream = bool(b["stream"])
    try:
        if stream:
            async with http.stream("POST", ROUTE, json=b) as r:
                if r.status_code != 200:
                    await r.aread()
                    return Outcome(r.status_code, time.perf_counter() - t0, stream)
                return await read_stream(r, t0)
        r = await http.post(ROUTE, json=b)
    except httpx.HTTPError as e:
        return Outcome(f"error: {type(e).__name__}", time.perf_counter() - t0, stream)
    out = Outcome(r.status_code, time.perf_counter() - t0, stream)
    if r.status_code == 200:
        try:
            answer = json.loads(r.content.decode("utf-8"))
            out.text = answer["choices"][0]["message"]["content"]
            out.tokens = answer["usage"]["completion_tokens"]
            out.text.encode("utf-8")  # a lone surrogate (a \ud800 escape) is not UTF-8
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
            out.problem = f"bad body: {type(e).__name__}"
    return out


async def read_stream(r: httpx.Response, t0: float) -> Outcome:
    """A 200 stream, read event by event; `problem` says how it broke, if it did."""
    out = Outcome(200, 0.0, True)
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    pending, done = "", False
    try:
        async for raw in r.aiter_bytes():
            pending += decoder.decode(raw)
            while "\n\n" in pending:
                event, pending = pending.split("\n\n", 1)
                for line in event.splitlines():
                    if not line.startswith("data: "):
                        continue  # ": ping" keepalives
                    if done:
                        out.problem = "data after [DONE]"
                    elif line == "data: [DONE]":
                        done = True
                    else:
                        take(json.loads(line[6:]), out, t0)
        decoder.decode(b"", final=True)
    except UnicodeError:
        out.problem = "not valid UTF-8"
    except ValueError:
        out.problem = "malformed JSON"
    except (KeyError, IndexError, TypeError, AttributeError) as e:
        out.problem = f"bad chunk: {type(e).__name__}"
    except httpx.HTTPError as e:
        out.problem = f"cut: {type(e).__name__}"
    except StreamError as e:
        out.problem = str(e)
    if out.problem is None and not done:
        out.problem = "ended without [DONE]"
    out.latency = time.perf_counter() - t0
    return out


def take(chunk: dict[str, Any], out: Outcome, t0: float) -> None:
    """One chunk into the outcome: its content (the first sets TTFT), its usage if any."""
    if "error" in chunk:
        raise StreamError(f"error event: {str(chunk['error'].get('message'))[:80]}")
    for choice in chunk["choices"]:
        content = choice["delta"].get("content") or ""
        content.encode("utf-8")
        if content and out.ttft is None:
            out.ttft = time.perf_counter() - t0
        out.text += content
    if chunk.get("usage"):
        out.tokens = chunk["usage"]["completion_tokens"]


class Tally:
    """The load's outcomes, and the server's RSS at the start and every `every` requests."""

    def __init__(self, pid: int, every: int) -> None:
        self.pid, self.every = pid, every
        self.outcomes: list[Outcome] = []
        self.rss: list[dict[str, Any]] = [{"requests": 0, "rss_mib": rss_mib(pid)}]

    def add(self, out: Outcome) -> None:
        self.outcomes.append(out)
        if len(self.outcomes) % self.every == 0:
            self.rss.append({"requests": len(self.outcomes), "rss_mib": rss_mib(self.pid)})


async def client(http: httpx.AsyncClient, tally: Tally, rng: random.Random,
                 a: argparse.Namespace, stop: asyncio.Event) -> None:
    while not stop.is_set():
        stream = rng.random() < a.stream_share
        out = await request(http, body(rng.choice(PROMPTS), a.max_tokens, stream))
        tally.add(out)
        if out.status != 200:
            await asyncio.sleep(0.05)  # a refused or failed request must not spin


def replay(k: int, a: argparse.Namespace, stream: bool) -> dict[str, Any]:
    return body(REPLAY_PROMPTS[k % len(REPLAY_PROMPTS)], a.max_tokens, stream,
                seed=REPLAY_SEED + k)


async def drive(a: argparse.Namespace, url: str, pid: int) -> dict[str, Any]:
    """Replays alone, then the clients for --seconds with the replays again among them."""
    limits = httpx.Limits(max_connections=a.clients + 2)
    async with httpx.AsyncClient(base_url=url, timeout=a.timeout, limits=limits) as http:
        alone = [await request(http, replay(k, a, False)) for k in range(a.replays)]
        tally, stop = Tally(pid, a.rss_every), asyncio.Event()

        async def among_load() -> list[Outcome]:
            await asyncio.sleep(min(a.seconds / 4, 5.0))  # once the clients fill the batch
            outs = []
            for k in range(a.replays):
                outs.append(await request(http, replay(k, a, k % 2 == 1)))
                tally.add(outs[-1])
            return outs

        t0 = time.perf_counter()
        clients = [asyncio.create_task(client(http, tally, random.Random(a.seed * 1000 + i), a,
                                              stop)) for i in range(a.clients)]
        _, loaded = await asyncio.gather(asyncio.sleep(a.seconds), among_load())
        stop.set()  # requests in flight finish; no new ones start
        await asyncio.gather(*clients)
        wall = time.perf_counter() - t0
    tally.rss.append({"requests": len(tally.outcomes), "rss_mib": rss_mib(pid)})
    return summarize(tally, alone, loaded, wall)


def percentiles(values: list[float]) -> dict[str, float | None]:
    if len(values) < 2:
        return {"p50": round(values[0], 4) if values else None, "p95": None}
    q = statistics.quantiles(values, n=100, method="inclusive")
    return {"p50": round(q[49], 4), "p95": round(q[94], 4)}


def summarize(tally: Tally, alone: list[Outcome], loaded: list[Outcome],
              wall: float) -> dict[str, Any]:
    outs = tally.outcomes
    ok = [o for o in outs if o.status == 200 and o.problem is None]
    status: dict[str, int] = {}
    for o in outs:
        status[str(o.status)] = status.get(str(o.status), 0) + 1
    broken = [o.problem for o in outs if o.problem and o.stream]
    tokens = sum(o.tokens for o in ok)
    replays = [{"seed": REPLAY_SEED + k, "stream": y.stream, "chars": len(x.text),
                "identical": x.status == y.status == 200 and x.problem is None
                and y.problem is None and x.text == y.text}
               for k, (x, y) in enumerate(zip(alone, loaded, strict=True))]
    return {"wall_s": round(wall, 2), "requests": len(outs), "status": dict(sorted(status.items())),
            "latency_s": percentiles([o.latency for o in ok]),
            "ttft_s": percentiles([o.ttft for o in ok if o.ttft is not None]),
            "completion_tokens": tokens, "tok_s": round(tokens / wall, 2),
            "broken_streams": len(broken), "broken_reasons": sorted(set(broken)),
            "bad_responses": sum(1 for o in outs if o.problem and not o.stream),
            "rss_mib": tally.rss, "replays": replays,
            "replays_identical": all(r["identical"] for r in replays)}
