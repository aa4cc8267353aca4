"""Two schedulers running an every-second entry for a minute, one of them
killed with SIGKILL half-way (issue 11), on each broker given:

    python tests/bench/beat_kill.py [sqlite|redis|amqp ...] [--seconds 60]

Prints, per broker: the slots in the run, how many were sent once, twice or
never, and the longest gap (the handover).  Redis: db 13 under a prefix of
its own; RabbitMQ: guest@127.0.0.1, queues named after a prefix of its own.
"""
from __future__ import annotations

import argparse
import collections
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
E2E = ROOT / "tests" / "e2e"
URLS = {"redis": "redis://127.0.0.1:6379/13", "amqp": "amqp://guest:guest@127.0.0.1:5672//"}


def run(kind: str, seconds: float) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix=f"beat-kill-{kind}-"))
    markers = tmp / "markers"
    markers.mkdir()
    prefix = f"beatkill{uuid.uuid4().hex[:8]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GREENQ_")}
    env.update(GREENQ_BROKER_URL=URLS.get(kind, f"sqlite:///{tmp / 'broker.sqlite3'}"),
               GREENQ_KEY_PREFIX=prefix, GREENQ_DEFAULT_QUEUE=prefix, GREENQ_WORKER_QUEUES=prefix,
               E2E_MARKERS=str(markers), PYTHONPATH=os.pathsep.join([str(E2E), str(ROOT)]))
    (tmp / "greenq.ini").write_text("[schedule:tick]\ntask = e2e.beat_tick\nevery = 1\n")
    quiet = {"cwd": tmp, "env": env, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    worker = subprocess.Popen([sys.executable, "-m", "greenq.worker", "-A", "e2e_tasks", "-P", "threads"], **quiet)
    beats = [subprocess.Popen([sys.executable, "-m", "greenq.cli", "-A", "e2e_tasks", "beat"], **quiet)
             for _ in range(2)]
    start = time.time()
    time.sleep(seconds / 2)
    beats[0].send_signal(signal.SIGKILL)      # the first started: the leader
    killed = time.time()
    time.sleep(seconds / 2)
    stop = time.time()
    beats[1].send_signal(signal.SIGTERM)
    beats[1].wait(30)
    time.sleep(1.5)
    worker.send_signal(signal.SIGTERM)
    worker.wait(30)
    cleanup(kind, prefix)
    path = markers / "beat_tick"
    sent = [int(line.rsplit("-", 1)[1]) for line in path.read_text().split()] if path.exists() else []
    runs = collections.Counter(sent)
    first, last = min(sent), max(sent)
    per_slot = collections.Counter(runs.get(s, 0) for s in range(first, last + 1))
    gaps = [b - a for a, b in zip(sorted(runs), sorted(runs)[1:])]
    return {"broker": kind, "slots": last - first + 1, "sent_once": per_slot[1], "sent_twice_or_more":
            sum(n for k, n in per_slot.items() if k > 1), "never_sent": per_slot[0],
            "longest_gap_s": max(gaps), "killed_after_s": round(killed - start, 1),
            "ran_s": round(stop - start, 1)}


def cleanup(kind: str, prefix: str) -> None:
    """Delete this run's keys (Redis) or queues (RabbitMQ)."""
    if kind == "redis":
        import redis
        client = redis.Redis.from_url(URLS["redis"])
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
    elif kind == "amqp":
        import amqp
        conn = amqp.Connection("127.0.0.1:5672", userid="guest", password="guest")
        conn.connect()
        channel = conn.channel()
        for queue in (prefix, f"{prefix}.beat.state"):
            channel.queue_delete(queue)
        conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("brokers", nargs="*", default=["sqlite", "redis", "amqp"])
    parser.add_argument("--seconds", type=float, default=60.0)
    args = parser.parse_args()
    for kind in args.brokers:
        print(run(kind, args.seconds), flush=True)


if __name__ == "__main__":
    main()
