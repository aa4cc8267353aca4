"""``greenq demo``: a gevent worker drains a few thousand I/O-bound tasks
enqueued from plain synchronous code, with a progress bar."""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

from .. import config as config_module
from .common import EXIT_FAILURE, EXIT_OK

TASK_SECONDS = 0.1


def _bar(done: int, total: int, started: float) -> None:
    """A progress bar redrawn in place on a terminal; one line per 10 % otherwise."""
    width = 40
    filled = int(width * done / total) if total else width
    rate = done / max(time.monotonic() - started, 1e-6)
    line = f"  [{'#' * filled}{'.' * (width - filled)}] {done}/{total}  {rate:,.0f} tasks/s "
    if sys.stdout.isatty():
        sys.stdout.write("\r" + line)
    elif done * 10 // total != (done - max(1, total // 100)) * 10 // total or done == total:
        sys.stdout.write(line + "\n")
    sys.stdout.flush()


def run_demo(args: argparse.Namespace, cfg: config_module.Config) -> int:
    os.environ.setdefault("GREENQ_BROKER_URL", cfg.broker_url)
    if cfg.result_backend:
        os.environ.setdefault("GREENQ_RESULT_BACKEND", cfg.result_backend)
    from ..demo_tasks import app, fetch_page
    n, concurrency = args.n, args.concurrency
    print(f"greenq demo: {n} tasks that each wait {TASK_SECONDS} s on I/O, one {args.pool} worker "
          f"with {concurrency} greenlets, broker {config_module.mask_url(app.config.broker_url)}")
    for queue in app.config.worker["queues"]:
        app.broker.purge(queue)
    cmd = [sys.executable, "-m", "greenq.worker", "-A", "greenq.demo_tasks", "--pool", args.pool,
           "-c", str(concurrency), "--loglevel", "WARNING", "--shutdown-timeout", "10"]
    worker = subprocess.Popen(cmd, env=dict(os.environ))
    try:
        started = time.monotonic()
        results = []
        for start in range(0, n, 500):  # plain synchronous code, pipelined in chunks
            results += app.enqueue_many([fetch_page.s(i) for i in range(start, min(n, start + 500))])
        enqueued = time.monotonic() - started
        print(f"  enqueued {n} tasks in {enqueued:.2f} s ({n / max(enqueued, 1e-6):,.0f}/s)")
        step = max(1, n // 100)
        for i, result in enumerate(results, 1):
            value = result.get(timeout=120)
            if i % step == 0 or i == n:
                _bar(i, n, started)
            if worker.poll() is not None:
                print(f"\n  worker exited early with code {worker.returncode}")
                return EXIT_FAILURE
        elapsed = time.monotonic() - started
        print(f"{chr(10) if sys.stdout.isatty() else ''}  {n} tasks done in {elapsed:.2f} s: {n / elapsed:,.0f} tasks/s "
              f"(serially they would take {n * TASK_SECONDS:,.0f} s)")
        print(f"  sample result: {json.dumps(value)}")
    finally:
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
        try:
            code = worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
            code = worker.wait()
    print(f"  worker shut down {'cleanly' if code == 0 else 'with an error'} (exit code {code})")
    return EXIT_OK if code == 0 else EXIT_FAILURE
