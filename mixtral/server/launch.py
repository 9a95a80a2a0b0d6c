"""`mixtral serve`: from flags to a running server (app.serve). The model loads on the main
thread while the web server already answers (503 until it is ready); under --tp/--ep every
rank loads its shard first, rank 0 serves and the others repeat its model calls.

    python -m mixtral.server.launch [--model PATH] [--port 8000] ...
"""

from __future__ import annotations

import argparse
import os
import sys

from mixtral import assemble, threads
from mixtral.command import Arguments, standalone
from mixtral.sizes import parse_size


def arguments(p: argparse.ArgumentParser) -> None:
    assemble.add_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default "
                   "127.0.0.1: this machine only; 0.0.0.0: every interface)")
    p.add_argument("--port", type=port, default=8000,
                   help="TCP port, 1-65535 (0: any free one; default 8000)")
    p.add_argument("--api-key", help="require this bearer key on /v1/* and /openapi.json "
                   "(printable ASCII; default: the MIXTRAL_API_KEY environment variable; "
                   "neither: open)")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="also answer requests whose Host or Origin names NAME (repeatable; "
                   "'*': any). Localhost names, loopback addresses and --host always pass")
    p.add_argument("--max-queue", type=int, default=16,
                   help="requests that may wait for the engine before 429 (default 16)")
    p.add_argument("--max-batch", type=int, default=8,
                   help="sequences generated together (KV cache slots; default 8)")
    p.add_argument("--max-seq-len", type=int, help="positions per sequence (default: the "
                   "model's context, at most 8192); the KV cache holds max-batch of them")
    p.add_argument("--prefix-cache", type=size, metavar="SIZE", help="memory for the KV of "
                   "earlier requests, so a prompt that begins as one did (a chat's earlier "
                   "turns, a system prompt, a retry) prefills only what is new, e.g. 4GiB; 0: "
                   "off (default: a quarter of the memory left after loading, at most 2GiB)")
    p.add_argument("--grace", type=int, default=10, help="seconds in-flight requests get "
                   "to finish on SIGTERM/Ctrl-C before they are cut (default 10)")
    p.add_argument("--max-connections", type=int, default=256, help="open connections; "
                   "beyond, the longest idle is closed, or 503 while all are busy (default 256)")
    p.add_argument("--keep-alive", type=float, default=5.0, metavar="SECONDS",
                   help="an idle connection is closed after this long (default 5)")
    p.add_argument("--header-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="time a connection has to send a whole request head (default 10)")
    p.add_argument("--body-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="time a request has to send its whole body: else 408 (default 30)")
    p.add_argument("--max-header-bytes", type=int, default=16384,
                   help="largest request head accepted (default 16384)")
    p.add_argument("--threads", type=thread_policy, metavar="POLICY", help="torch's thread "
                   "count: adaptive (as many as cores other processes leave free, re-read each "
                   "second), fixed (torch's own), or a count (default: MIXTRAL_THREADS, else "
                   "adaptive)")
    p.set_defaults(run=run)


COMMANDS: dict[str, Arguments] = {"serve": arguments}


def port(text: str) -> int:
    try:
        number = int(text)
    except ValueError:
        number = -1
    if not 0 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"expected a TCP port, 0 to 65535, got {text!r}")
    return number


def thread_policy(text: str) -> str:
    try:
        return str(threads.parse(text))
    except threads.ThreadsError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def run(args: argparse.Namespace) -> int:
    from mixtral.config import ModelArgs
    from mixtral.parallel import is_leader
    from mixtral.server.app import Settings, json_constraints, serve

    if args.model is None:
        from mixtral.default_model import DESCRIPTION as description
        from mixtral.default_model import NAME as name
    else:
        name = assemble.preflight(args.model)  # a bad --model: one line, before the port opens
        description = "Mixtral 8x7B"
    key = args.api_key if args.api_key is not None else os.environ.get("MIXTRAL_API_KEY")
    threads.choose(args.threads)
    threads.chosen()  # a bad MIXTRAL_THREADS: one line, before the port opens
    settings = Settings(name=name, api_key=key,  # an empty key is refused, never "open"
                        max_queue=args.max_queue, description=description,
                        max_batch=args.max_batch, max_seq_len=args.max_seq_len or 8192,
                        allow_hosts=tuple(args.allow_host), max_connections=args.max_connections,
                        keep_alive_s=args.keep_alive, header_timeout_s=args.header_timeout,
                        body_timeout_s=args.body_timeout, max_header_bytes=args.max_header_bytes,
                        prefix_cache=args.prefix_cache,  # under --tp/--ep: none (their caches
                        kv_copies=args.tp == 1 and args.ep == 1)  # are on the other ranks too)
    url = f"http://{args.host}:{args.port}"
    if is_leader():
        print(f"[mixtral] serving {name}: web chat at {url}/ , API at {url}/v1"
              + (" (bearer key required)" if settings.api_key else ""), file=sys.stderr)

    def kv_positions(margs: ModelArgs) -> int:  # the engine's cache: max-batch sequences
        return args.max_batch * min(args.max_seq_len or 8192, margs.max_seq_len)

    if args.tp > 1 or args.ep > 1:  # under torchrun: rank 0 serves, the others follow it
        import signal

        from mixtral import parallel

        model = assemble.from_args(args, kv_positions)
        if not is_leader():
            for sig in (signal.SIGINT, signal.SIGTERM):  # rank 0 drains, then releases us
                signal.signal(sig, signal.SIG_IGN)
            parallel.follow(model, settings.max_batch, settings.max_seq_len or 8192)
            return 0
        leader = parallel.Leader(model, settings.max_batch)
        try:  # the engine runs the leader as it would the model: same calls, same results
            return serve(lambda: leader, settings, args.host, args.port, args.grace,
                         json_constraints())
        finally:
            leader.stop()
    return serve(lambda: assemble.from_args(args, kv_positions), settings, args.host,
                 args.port, args.grace, json_constraints())


if __name__ == "__main__":
    sys.exit(standalone("python -m mixtral.server.launch", COMMANDS))
