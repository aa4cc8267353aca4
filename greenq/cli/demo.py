"""``greenq demo``: a gevent worker drains a few thousand I/O-bound tasks
enqueued from plain synchronous code, with a progress bar.

The demo never touches the broker a ``greenq.ini``, ``$GREENQ_CONFIG`` or a
``GREENQ_*`` variable configures (it would enqueue thousands of tasks into
production): it runs on a private SQLite file in a temporary directory,
removed afterwards, with every greenq setting at its default.  A worker
that cannot start (gevent not installed, say) ends the demo at once with the
worker's exit code; the worker printed why."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, List

from .. import config as config_module
from ..exceptions import TimeoutError as GreenQTimeout
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


def private_environment(directory: str) -> str:
    """Point this process (and the worker it starts) at a SQLite broker in
    ``directory``, and nothing else: an empty config file in place of
    ``greenq.ini`` and ``$GREENQ_CONFIG``, no ``GREENQ_*`` variables.
    Returns the broker URL."""
    for key in [k for k in os.environ if k.startswith("GREENQ_")]:
        del os.environ[key]
    config_file = os.path.join(directory, "greenq.ini")
    with open(config_file, "w", encoding="utf-8") as fh:
        fh.write("; greenq demo: defaults only\n")
    url = f"sqlite:///{os.path.join(directory, 'demo.sqlite3')}"
    os.environ["GREENQ_CONFIG"] = config_file
    os.environ["GREENQ_BROKER_URL"] = url
    return url


def run_demo(args: argparse.Namespace, cfg: config_module.Config) -> int:
    """Run the demo on a private SQLite broker (``cfg``'s broker is not used)."""
    directory = tempfile.mkdtemp(prefix="greenq-demo-")
    try:
        private_environment(directory)
        from ..demo_tasks import app   # built from the private environment just made
        try:
            return _run(args, app)
        finally:
            app.close()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _run(args: argparse.Namespace, app: Any) -> int:
    from ..demo_tasks import fetch_page
    n, concurrency = args.n, args.concurrency
    print(f"greenq demo: {n} tasks that each wait {TASK_SECONDS} s on I/O, one {args.pool} worker "
          f"with {concurrency} greenlets, on a private broker {app.config.broker_url} "
          f"(your configured broker is not used)")
    cmd = [sys.executable, "-m", "greenq.worker", "-A", "greenq.demo_tasks", "--pool", args.pool,
           "-c", str(concurrency), "--loglevel", "WARNING", "--shutdown-timeout", "10"]
    worker = subprocess.Popen(cmd, env=dict(os.environ))
    try:
        started = time.monotonic()
        results: List[Any] = []
        for start in range(0, n, 500):  # plain synchronous code, pipelined in chunks
            results += app.enqueue_many([fetch_page.s(i) for i in range(start, min(n, start + 500))])
        enqueued = time.monotonic() - started
        print(f"  enqueued {n} tasks in {enqueued:.2f} s ({n / max(enqueued, 1e-6):,.0f}/s)")
        step = max(1, n // 100)
        value = None
        for i, result in enumerate(results, 1):
            value = _wait(result, worker)
            if value is _DIED:
                print(f"\n  the demo worker exited with code {worker.returncode} (its error is above)")
                return worker.returncode or EXIT_FAILURE
            if i % step == 0 or i == n:
                _bar(i, n, started)
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


#: what ``_wait`` returns when the worker exited before the result came
_DIED = object()
#: the longest a demo task's result is waited for while the worker lives
RESULT_TIMEOUT = 120.0


def _wait(result: Any, worker: "subprocess.Popen[Any]") -> Any:
    """The value of ``result``, waiting in short steps so that a worker that
    exits (or never started) is noticed within a second: then ``_DIED``."""
    deadline = time.monotonic() + RESULT_TIMEOUT
    while True:
        try:
            return result.get(timeout=1.0)
        except GreenQTimeout:
            if worker.poll() is not None:
                return _DIED
            if time.monotonic() > deadline:
                raise
