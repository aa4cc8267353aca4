"""Tasks a greenq worker runs under the names a Celery client sends them by
(tests/e2e/transport_redis/test_celery_interop_e2e.py).  Each writes what it
received, as JSON, to a marker file, so the test sees the values it ran with."""
import json
import os
import time

from greenq import GreenQ

app = GreenQ.from_config(name="celery-interop")


def _record(name, value):
    marker_dir = os.environ.get("E2E_MARKERS")
    if marker_dir:
        with open(os.path.join(marker_dir, name), "a") as fh:
            fh.write(json.dumps(value, default=repr) + "\n")


@app.task(name="interop.add")
def add(x, y):
    _record("add", [x, y, time.time()])
    return x + y


@app.task(name="interop.echo")
def echo(*args, **kwargs):
    _record("echo", {"args": args, "kwargs": {k: [type(v).__name__, repr(v)] for k, v in kwargs.items()}})
    return "echoed"


@app.task(name="interop.flaky", bind=True, max_retries=3, default_retry_delay=0.1)
def flaky(self, until):
    _record("flaky", self.request.retries)
    if self.request.retries < until:
        raise self.retry()
    return self.request.retries


@app.task(name="interop.slow")
def slow(seconds):
    time.sleep(seconds)
    _record("slow", seconds)
    return seconds


@app.task(name="interop.hold")
def hold(seconds):
    _record("hold", seconds)
    time.sleep(seconds)
    return "greenq ran it"


@app.task(name="interop.mark")
def mark(i):
    time.sleep(0.01)
    _record("mark", i)
    return i
