"""The benchmark's client: a plain, unpatched process that talks to one system.

    python bench_client.py SYSTEM fill KIND N [--sleep S] [--bulk]
    python bench_client.py SYSTEM enqueue N [--bulk]
    python bench_client.py SYSTEM roundtrip N [--warmup W] [--timeout T]
    python bench_client.py SYSTEM left

SYSTEM is greenq, celery or dramatiq; its tasks module ``bench_<SYSTEM>_tasks``
is configured from the environment the driver sets.  The last line printed is
one JSON object with the measurements; timing covers the calls only, never the
imports or the first connection (one untimed message is sent first).
"""
from __future__ import annotations

import argparse
import importlib
import json
import socket
import sys
import time


def _args_for(kind: str, sleep: float) -> tuple:
    return (sleep,) if kind == "sleep" else ()


def fill(tasks, kind: str, n: int, sleep: float, bulk: bool) -> dict:
    """Enqueue ``n`` messages of ``kind``; timed (the enqueue rate)."""
    task = getattr(tasks, kind)
    args = _args_for(kind, sleep)
    start = time.perf_counter()
    if bulk:
        tasks.send_many(task, [args] * n)
    else:
        for _ in range(n):
            tasks.send(task, *args)
    seconds = time.perf_counter() - start
    return {"n": n, "seconds": seconds, "rate": n / seconds if seconds else None,
            "method": "bulk" if bulk else "one call per message"}


def enqueue(tasks, n: int, bulk: bool) -> dict:
    """The client's enqueue rate; one untimed message first opens the connection."""
    tasks.send(tasks.noop)
    return fill(tasks, "noop", n, 0.0, bulk)


def roundtrip(tasks, n: int, warmup: int, timeout: float) -> dict:
    """``n`` sequential ``delay().get()`` round trips, after ``warmup`` untimed ones
    (the first waits for the worker to be up)."""
    for i in range(warmup):
        tasks.round_trip(i, 120.0 if i == 0 else timeout)
    latencies = []
    for i in range(n):
        start = time.perf_counter()
        value = tasks.round_trip(i, timeout)
        latencies.append((time.perf_counter() - start) * 1000.0)
        if value != i:
            raise SystemExit(f"round trip {i} returned {value!r}")
    return {"n": n, "latencies_ms": latencies}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("system", choices=("greenq", "celery", "dramatiq"))
    sub = parser.add_subparsers(dest="op", required=True)
    p = sub.add_parser("fill")
    p.add_argument("kind", choices=("noop", "sleep", "echo", "incr"))
    p.add_argument("n", type=int)
    p.add_argument("--sleep", type=float, default=0.0)
    p.add_argument("--bulk", action="store_true")
    p = sub.add_parser("enqueue")
    p.add_argument("n", type=int)
    p.add_argument("--bulk", action="store_true")
    p = sub.add_parser("roundtrip")
    p.add_argument("n", type=int)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--timeout", type=float, default=10.0)
    sub.add_parser("left")
    args = parser.parse_args(argv)

    tasks = importlib.import_module(f"bench_{args.system}_tasks")
    if args.op == "fill":
        out = fill(tasks, args.kind, args.n, args.sleep, args.bulk)
    elif args.op == "enqueue":
        out = enqueue(tasks, args.n, args.bulk)
    elif args.op == "roundtrip":
        out = roundtrip(tasks, args.n, args.warmup, args.timeout)
    else:
        out = {"left": tasks.left()}
    out["patched"] = socket.socket.__module__ != "socket"  # must stay False: a plain client
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
