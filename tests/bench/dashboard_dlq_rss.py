"""Peak RSS of ``greenq dashboard`` answering one ``GET /api/dlq`` over big
dead letters (issue 17), written straight into Redis db 13 under a prefix
of its own (deleted afterwards):

    python tests/bench/dashboard_dlq_rss.py [--count 5] [--mib 30] [--root DIR]

Prints the dashboard's peak RSS (VmHWM) before and after the request, the
answer's size and how long it took.  ``--root`` runs the greenq found there.
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parents[2]
URL = "redis://127.0.0.1:6379/13"


def peak_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=5)
    parser.add_argument("--mib", type=int, default=30)
    parser.add_argument("--root", type=Path, default=ROOT)
    args = parser.parse_args()
    prefix = f"bench-dlq-{uuid.uuid4().hex[:8]}"
    client = redis.Redis.from_url(URL)
    body = b'{"v":1,"id":"big","task":"demo.fetch_page","args":["' + b"x" * (args.mib << 20) + b'"],"kwargs":{}}'
    for _ in range(args.count):
        client.xadd(f"{prefix}:dead", {"q": "default", "b": body, "r": "bench", "m": "big", "t": "0", "p": "0"})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=str(args.root.resolve()), GREENQ_BROKER_URL=URL, GREENQ_KEY_PREFIX=prefix)
    proc = subprocess.Popen([sys.executable, "-m", "greenq.cli", "-A", "greenq.demo_tasks", "dashboard", "--http",
                             f"127.0.0.1:{port}"], cwd=tempfile.mkdtemp(), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/workers", timeout=2).read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit("the dashboard did not start")
                time.sleep(0.2)
        before = peak_rss_mib(proc.pid)
        started = time.monotonic()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/dlq", timeout=120) as resp:
            size = len(resp.read())
        took = time.monotonic() - started
        print(f"{args.count} dead letters of {args.mib} MiB, greenq from {args.root}: peak RSS "
              f"{before:.0f} MiB before, {peak_rss_mib(proc.pid):.0f} MiB after one GET /api/dlq "
              f"({size} bytes, {took:.2f} s)")
    finally:
        proc.terminate()
        proc.wait(30)
        client.delete(f"{prefix}:dead")
        client.close()


if __name__ == "__main__":
    main()
