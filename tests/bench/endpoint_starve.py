"""Latency of the HTTP endpoints while idle and half-open connections are
held against them (issue 17): a worker's ``--http``, a ``--processes 2``
supervisor's endpoint and ``greenq dashboard``, on an embedded SQLite broker.

    python tests/bench/endpoint_starve.py [worker supervisor dashboard] \\
        [--held 1000] [--requests 200] [--pool gevent] [--root DIR]

For each endpoint: opens ``--held`` connections (one in ten sends half a
request line and stops), then times ``--requests`` sequential GETs
(/healthz; /api/workers for the dashboard), each given 2 s, and prints the
p50, p99 and worst latency and how many timed out.  ``--root`` runs the
greenq found there (an older checkout, to compare).
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parents[2]
PER_REQUEST = 2.0
PATHS = {"worker": "/healthz", "supervisor": "/healthz", "dashboard": "/api/workers"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(port: int, path: str, timeout: float) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as resp:
            resp.read()
            return True
    except OSError:
        return False


def start(kind: str, root: Path, pool: str, tmp: Path) -> "tuple[subprocess.Popen, int]":
    port = _free_port()
    where = f"127.0.0.1:{port}"
    env = dict(os.environ, PYTHONPATH=str(root), GREENQ_BROKER_URL=f"sqlite:///{tmp / 'broker.sqlite3'}",
               GREENQ_WORKER_BLOCKING_THRESHOLD="0")
    if kind == "dashboard":
        cmd = [sys.executable, "-m", "greenq.cli", "-A", "greenq.demo_tasks", "dashboard", "--http", where]
    else:
        cmd = [sys.executable, "-m", "greenq.worker", "-A", "greenq.demo_tasks", "--pool", pool, "--http", where]
        if kind == "supervisor":
            cmd += ["--processes", "2", "-c", "2"]
    proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not _get(port, PATHS[kind], 2):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{kind} did not start ({' '.join(cmd)})")
        time.sleep(0.2)
    return proc, port


def measure(kind: str, root: Path, pool: str, held_count: int, requests: int) -> Dict[str, float]:
    tmp = Path(tempfile.mkdtemp(prefix=f"endpoint-starve-{kind}-"))
    proc, port = start(kind, root, pool, tmp)
    held: List[socket.socket] = []
    try:
        for i in range(held_count):
            try:
                sock = socket.create_connection(("127.0.0.1", port), timeout=2)
            except OSError:         # the server takes no more (a full backlog): measure with these
                break
            if i % 10 == 0:
                sock.sendall(b"GET /healthz HT")
            held.append(sock)
        times, failed = [], 0
        for _ in range(requests):
            started = time.monotonic()
            failed += not _get(port, PATHS[kind], PER_REQUEST)
            times.append(time.monotonic() - started)
        times.sort()
        return {"p50": times[len(times) // 2], "p99": times[min(len(times) - 1, int(len(times) * 0.99))],
                "max": times[-1], "timed_out": failed, "held": len(held)}
    finally:
        for sock in held:
            sock.close()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kinds", nargs="*", metavar="{worker,supervisor,dashboard}")
    parser.add_argument("--held", type=int, default=1000)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--pool", default="gevent")
    parser.add_argument("--root", type=Path, default=ROOT)
    args = parser.parse_args()
    unknown = set(args.kinds) - set(PATHS)
    if unknown:
        parser.error(f"unknown endpoint(s) {', '.join(sorted(unknown))}: expected {', '.join(PATHS)}")
    print(f"{args.held} connections held, {args.requests} GETs each ({PER_REQUEST:.0f} s allowed), "
          f"pool {args.pool}, greenq from {args.root}")
    for kind in args.kinds or PATHS:
        r = measure(kind, args.root.resolve(), args.pool, args.held, args.requests)
        print(f"{kind:<11} p50 {r['p50'] * 1000:8.1f} ms  p99 {r['p99'] * 1000:8.1f} ms  "
              f"max {r['max'] * 1000:8.1f} ms  timed out {r['timed_out']}/{args.requests}"
              + ("" if r["held"] == args.held else f"  (only {r['held']} connections could be opened)"),
              flush=True)


if __name__ == "__main__":
    main()
