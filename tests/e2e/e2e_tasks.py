"""Tasks used by the end-to-end tests; imported by real greenq-worker processes
(``-A e2e_tasks``) and by the unpatched client side."""
import os
import socket
import sys
import time

from greenq import GreenQ, SoftTimeLimitExceeded

app = GreenQ.from_config(name="e2e")


class CustomError(Exception):
    """Importable on both sides: re-raised as itself."""


def _mark(name):
    marker_dir = os.environ.get("E2E_MARKERS")
    if marker_dir:
        with open(os.path.join(marker_dir, name), "a") as fh:
            fh.write(f"{os.getpid()}\n")


@app.task(name="e2e.add")
def add(x, y):
    return x + y


@app.task(name="e2e.fail")
def fail(message):
    raise KeyError(message)


@app.task(name="e2e.custom_fail")
def custom_fail(message):
    raise CustomError(message)


@app.task(name="e2e.unimportable_fail")
def unimportable_fail():
    class LocalError(Exception):
        pass
    raise LocalError("defined inside the task")


@app.task(name="e2e.flaky", bind=True, autoretry_for=(IOError,), retry_backoff=0.05,
          retry_jitter=False, max_retries=5)
def flaky(self, succeed_at):
    if self.request.retries < succeed_at:
        raise IOError(f"attempt {self.request.retries} fails")
    return self.request.retries


@app.task(name="e2e.explicit_retry", bind=True, max_retries=2)
def explicit_retry(self):
    if self.request.retries < 2:
        raise self.retry(countdown=0.1)
    return f"done after {self.request.retries} retries"


@app.task(name="e2e.always_retry", bind=True, max_retries=1)
def always_retry(self):
    raise self.retry(exc=ValueError("still broken"), countdown=0.05)


@app.task(name="e2e.soft", soft_time_limit=0.5)
def soft(seconds):
    try:
        time.sleep(seconds)
    except SoftTimeLimitExceeded:
        return "soft limit caught"
    return "finished"


@app.task(name="e2e.hard", time_limit=0.5)
def hard(seconds):
    try:
        time.sleep(seconds)
    except Exception:   # a careless task cannot swallow its hard limit
        time.sleep(seconds)
    return "should not get here"


@app.task(name="e2e.slow")
def slow(name, seconds):
    _mark(name + ".started")
    time.sleep(seconds)
    _mark(name + ".finished")
    return name


@app.task(name="e2e.patched")
def patched():
    """Which concurrency library (if any) patched the worker's socket module."""
    mod = socket.socket.__module__
    return {"socket_module": mod, "gevent": "gevent" in sys.modules, "eventlet": "eventlet" in sys.modules}


@app.task(name="e2e.block_hub")
def block_hub(seconds):
    """A CPU loop that never yields: freezes every greenlet of a green worker."""
    end = time.perf_counter() + seconds
    n = 0
    while time.perf_counter() < end:
        n += 1
    return n > 0


@app.task(name="e2e.crash_worker")
def crash_worker():
    """Kills the worker process that runs it, every time (a poison message)."""
    _mark("crash.started")
    os._exit(3)


@app.task(name="e2e.pid")
def pid(n):
    return os.getpid()


@app.task(name="e2e.slow_steps")
def slow_steps(name, seconds):
    """Like slow, in 0.1 s steps: a threads-pool task sees a kill between steps."""
    _mark(name + ".started")
    for _ in range(int(seconds * 10)):
        time.sleep(0.1)
    _mark(name + ".finished")
    return name


class _Unprintable(Exception):
    def __str__(self):
        raise RuntimeError("this exception cannot be shown")

    def __repr__(self):
        raise RuntimeError("nor represented")


@app.task(name="e2e.unprintable_fail")
def unprintable_fail():
    raise _Unprintable(object())


@app.task(name="e2e.deep_result")
def deep_result(depth):
    value = []
    for _ in range(depth):
        value = [value]
    return value


@app.task(name="e2e.local_object")
def local_object():
    class Local:
        pass
    return Local()


# -- workflows (test_workflows_e2e.py) ------------------------------------------------
@app.task(name="e2e.chord_member")
def chord_member(i, seconds):
    time.sleep(seconds)
    _mark("chord_member")
    return i


@app.task(name="e2e.chord_callback")
def chord_callback(values):
    _mark("chord_callback")
    return [len(values), sum(values)]


@app.task(name="e2e.record", bind=True)
def record(self, *args):
    """A callback: marks that it ran, returns its arguments and lineage."""
    _mark("record")
    return [list(args), self.request.parent_id, self.request.root_id]


@app.task(name="e2e.progress", bind=True)
def progress(self, name):
    """Reports PROGRESS, then waits (up to 20 s) for the test to create ``<name>.go``."""
    self.update_state(state="PROGRESS", meta={"done": 1, "total": 2})
    go = os.path.join(os.environ.get("E2E_MARKERS", "."), name + ".go")
    deadline = time.monotonic() + 20
    while not os.path.exists(go) and time.monotonic() < deadline:
        time.sleep(0.02)
    return "finished"


@app.task(name="e2e.beat_tick", bind=True)
def beat_tick(self):
    """A periodic task: appends its task id (beat-NAME-SLOT) to the beat_tick marker."""
    marker_dir = os.environ.get("E2E_MARKERS")
    if marker_dir:
        with open(os.path.join(marker_dir, "beat_tick"), "a") as fh:
            fh.write(f"{self.request.id}\n")


if os.environ.get("E2E_DIE_BEFORE_CHORD_CALLBACK"):
    # test_workflows_e2e: the first worker to complete a chord dies (SIGKILL-like,
    # os._exit) after counting the last member and before sending the callback
    from greenq.worker import followups as _followups

    _fire = _followups.Followups._fire

    def _die_once(self, msg):
        flag = os.path.join(os.environ["E2E_MARKERS"], "died_before_callback")
        if not os.path.exists(flag):
            open(flag, "w").close()
            os._exit(9)
        return _fire(self, msg)
    _followups.Followups._fire = _die_once
