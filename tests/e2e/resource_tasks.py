"""Tasks of the shared-scope permit tests (tests/e2e/test_resources_scopes_e2e.py),
imported by real greenq-worker processes (``-A resource_tasks``) and by the
unpatched client side.  The ``[resource:NAME]`` sections come from the
test's greenq.ini.

Each task appends ``start`` and ``end`` lines (pid, task argument,
``time.monotonic()``, one system-wide clock on Linux) to ``permits.log`` in
the test's markers directory, inside the time it holds its permit: one
``O_APPEND`` write per line, so processes never interleave within a line.
The test rebuilds from them how many tasks held the resource at once across
every process, and which process ran what."""
import os
import time

from greenq import GreenQ

app = GreenQ.from_config(name="restasks")


@app.on("worker_process_init")
def _ready(worker):
    """Say this worker process is about to consume: ``ready-<pid>`` in the
    markers directory, so a test sends its tasks only once every worker
    it started can take them (a worker that starts late under load would
    otherwise find the work done)."""
    open(os.path.join(os.environ["E2E_MARKERS"], f"ready-{os.getpid()}"), "w").close()


def _log(event, n):
    path = os.path.join(os.environ["E2E_MARKERS"], "permits.log")
    line = f"{event} {os.getpid()} {n} {time.monotonic():.6f}\n".encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def _gate():
    """Wait (cooperatively: time.sleep is the driver's) until the test opens the gate."""
    gate = os.path.join(os.environ["E2E_MARKERS"], "go")
    while not os.path.exists(gate):
        time.sleep(0.02)


@app.task(name="res.db", resources={"db": 1})
def use_db(n, seconds):
    _log("start", n)
    time.sleep(seconds)
    _log("end", n)
    return n


@app.task(name="res.api", resources={"api": 1})
def use_api(n, seconds, gated=False):
    _log("start", n)
    if gated:
        _gate()
    time.sleep(seconds)
    _log("end", n)
    return n
