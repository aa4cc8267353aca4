"""One failover run, shared by the tests and ``python -m tests.clusters.bench``.

A publisher thread (this process, unpatched) sends numbered tasks at a steady
rate to one or more queues while a real ``greenq-worker`` drains them; once a
third have run, ``kill()`` SIGKILLs a master and the run goes on until every
task sent has run or ``settle`` seconds pass with nothing new.

Counted: ``sent`` (publishes that returned), ``refused`` (publishes that
raised: the client knows, so they are not lost), ``completed`` (distinct
tasks that ran), ``lost`` (sent, never ran), ``duplicated`` (ran more than
once), ``resume_s`` (the longest pause between two task starts after the kill:
how long the worker was stalled by the failover), ``first_queue_resume_s``
(the same for the first queue alone: on a cluster, the one whose master dies),
``others_meanwhile`` (tasks of the other queues that started during that pause).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Sequence

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent


@dataclass
class Outcome:
    sent: int = 0
    refused: int = 0
    completed: int = 0
    lost: int = 0
    duplicated: int = 0
    resume_s: float = 0.0
    first_queue_resume_s: float = 0.0
    others_meanwhile: int = 0

    def line(self) -> str:
        return " ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}"
                        for k, v in asdict(self).items())


def read_log(path: Path) -> List[tuple]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2:
            rows.append((int(parts[0]), float(parts[1])))
    return rows


def worker_env(url: str, prefix: str, log: Path, extra: Dict[str, str]) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GREENQ_") or k.startswith("GREENQ_TEST_")}
    env.update({"GREENQ_BROKER_URL": url, "GREENQ_KEY_PREFIX": prefix, "CLUSTER_LOG": str(log),
                "PYTHONPATH": os.pathsep.join([str(HERE), str(ROOT)]),
                "GREENQ_LEASE_SECONDS": "4", "GREENQ_WORKER_BLOCKING_THRESHOLD": "0",
                "GREENQ_WORKER_LOGLEVEL": "WARNING", "GREENQ_REDIS_SOCKET_TIMEOUT": "2"})
    env.update(extra)
    return env


def run(url: str, queues: Sequence[str], kill: Callable[[], None], tmp: Path, total: int = 300,
        rate: float = 200.0, settle: float = 8.0, deadline: float = 40.0, concurrency: int = 10,
        backlog: int = 0, pause: float = 0.02, kill_at: int = 0, pad: int = 0,
        extra_env: Dict[str, str] = None, prefix: str = "", pool: str = "gevent") -> "tuple[Outcome, str]":
    """Send ``backlog`` tasks at once, then the rest of ``total`` at ``rate``/s,
    over ``queues``; each task takes ``pause`` s and carries ``pad`` bytes of
    ballast; drain; kill once ``kill_at`` (default: a third) have run.
    Returns the outcome and what the worker printed."""
    from greenq.config import load
    log = tmp / "completed.log"
    env = worker_env(url, prefix or f"fo{os.getpid()}", log, dict(extra_env or {}))
    sys.path.insert(0, str(HERE))
    import cluster_tasks
    app = cluster_tasks.app
    app.close()
    app.config = load(search=False, env={k: v for k, v in env.items() if k.startswith("GREENQ_")})
    app._codec = None
    out = Outcome()
    ballast = "x" * pad
    sent: List[int] = []
    stop = threading.Event()

    def publish() -> None:
        began = time.monotonic()
        for n in range(total):
            if stop.is_set():
                return
            try:
                app.send_task("clusters.record", args=(n, pause, ballast), queue=queues[n % len(queues)])
                sent.append(n)
            except Exception:
                out.refused += 1
            if n == backlog:
                began = time.monotonic()
            lag = began + (n - backlog + 1) / rate - time.monotonic()
            if n >= backlog and lag > 0:
                time.sleep(lag)

    worker = subprocess.Popen(
        [sys.executable, "-m", "greenq.worker", "-A", "cluster_tasks", "--pool", pool,
         "-c", str(concurrency), "-Q", ",".join(queues)],
        cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    publisher = threading.Thread(target=publish, daemon=True)
    publisher.start()
    end = time.monotonic() + deadline
    try:
        while len(read_log(log)) < (kill_at or total // 3):
            if time.monotonic() > end or worker.poll() is not None:
                raise AssertionError("the drain never reached a third before the kill")
            time.sleep(0.02)
        killed_at = time.time()
        kill()
        publisher.join(deadline)
        last_change, seen = time.monotonic(), -1
        while time.monotonic() < end:
            rows = read_log(log)
            if len(rows) != seen:
                seen, last_change = len(rows), time.monotonic()
            if len({n for n, _ in rows} & set(sent)) == len(sent) and not publisher.is_alive():
                time.sleep(0.5)   # duplicates arriving just after
                break
            if time.monotonic() - last_change > settle:
                break
            time.sleep(0.05)
    finally:
        stop.set()
        worker.send_signal(signal.SIGTERM)
        try:
            printed, _ = worker.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            worker.kill()
            printed, _ = worker.communicate()
        app.close()
    rows = read_log(log)
    counts = Counter(n for n, _ in rows)
    out.sent = len(sent)
    out.completed = len(set(counts) & set(sent))
    out.lost = len(set(sent) - set(counts))
    out.duplicated = sum(1 for c in counts.values() if c > 1)
    out.resume_s = _longest_gap(killed_at, [t for _, t in rows])
    first = [t for n, t in rows if n % len(queues) == 0]
    out.first_queue_resume_s = _longest_gap(killed_at, first)
    begin, end = _gap_bounds(killed_at, first)
    out.others_meanwhile = sum(1 for n, t in rows if n % len(queues) and begin < t < end)
    return out, printed


def _gap_bounds(since: float, starts: List[float]) -> "tuple[float, float]":
    """The longest pause between task starts after ``since`` (the kill): (begin, end)."""
    times = sorted([since] + [t for t in starts if t >= since])
    if len(times) < 2:
        return since, float("inf")
    return max(zip(times, times[1:]), key=lambda pair: pair[1] - pair[0])


def _longest_gap(since: float, starts: List[float]) -> float:
    begin, end = _gap_bounds(since, starts)
    return end - begin
