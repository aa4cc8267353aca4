"""A worker started before its broker waits for it (issue 8, item 4): it
retries with backoff, one log line per attempt, and consumes once the broker
is up; ``[greenq] broker_connect_timeout`` bounds the wait."""
from __future__ import annotations

import queue
import shutil
import signal
import socket
import subprocess
import threading
import time

import pytest

pytestmark = pytest.mark.e2e


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Lines:
    """The worker's output, line by line, read by a thread so the test can wait for a line."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.lines: "queue.Queue[str]" = queue.Queue()
        self.seen: list = []
        threading.Thread(target=self._read, args=(proc,), daemon=True).start()

    def _read(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            self.lines.put(line)

    def wait_for(self, text: str, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no line with {text!r}; the worker said:\n{''.join(self.seen)}")
            self.seen.append(line)
            if text in line:
                return line


@pytest.fixture
def private_redis(tmp_path, redis_url):
    """A redis-server of this test's own on a free port, started when the test says."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed")
    port = _free_port()
    procs = []

    def start() -> None:
        procs.append(subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                       "--appendonly", "no", "--dir", str(tmp_path)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    yield port, start
    for proc in procs:
        proc.terminate()
        proc.wait(timeout=30)


def test_worker_waits_for_a_broker_that_comes_up_later(pool, sqlite_env, private_redis):
    port, start_redis = private_redis
    url = f"redis://127.0.0.1:{port}/0"
    sqlite_env.env["GREENQ_BROKER_URL"] = url
    proc = sqlite_env.worker(pool, burst=False)
    lines = Lines(proc)
    first = lines.wait_for("unreachable")
    assert f"broker {url} unreachable (attempt 1" in first and "retrying in 0.5 s" in first
    assert f"127.0.0.1:{port}" in first
    second = lines.wait_for("unreachable")
    assert "(attempt 2" in second and "retrying in 1.0 s" in second     # the pause doubles
    start_redis()
    lines.wait_for("reachable after")
    lines.wait_for("worker ready")
    called = sqlite_env.admin("call", "e2e.add", "--args", "[2, 3]", "--wait", "--timeout", "30")
    assert called.returncode == 0 and '"result": 5' in called.stdout, called.stderr
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    assert not any("Traceback" in line for line in lines.seen)


def test_broker_connect_timeout_ends_the_wait_with_one_line(pool, sqlite_env):
    port = _free_port()   # nothing listens there
    sqlite_env.env.update(GREENQ_BROKER_URL=f"redis://127.0.0.1:{port}/0",
                          GREENQ_BROKER_CONNECT_TIMEOUT="1.5")
    started = time.monotonic()
    code, out = sqlite_env.run_worker(pool, timeout=60)
    assert code == 1, out
    assert time.monotonic() - started < 30
    assert "still unreachable after" in out and "broker_connect_timeout = 1.5" in out, out
    assert "Traceback" not in out


def test_sigterm_during_the_wait_is_a_clean_stop(pool, sqlite_env):
    sqlite_env.env["GREENQ_BROKER_URL"] = f"redis://127.0.0.1:{_free_port()}/0"
    sqlite_env.env["PYTHONFAULTHANDLER"] = "1"     # SIGABRT below prints every thread's stack
    proc = sqlite_env.worker(pool, burst=False)
    lines = Lines(proc)
    lines.wait_for("unreachable")
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(timeout=30)
    except subprocess.TimeoutExpired:   # seen once (eventlet): say where the worker hangs
        proc.send_signal(signal.SIGABRT)
        proc.wait(timeout=10)
        time.sleep(0.5)                 # the reader takes the rest of the output
        rest = []
        while not lines.lines.empty():
            rest.append(lines.lines.get())
        raise AssertionError("the worker did not stop within 30 s of SIGTERM; it said:\n"
                             + "".join(lines.seen + rest)) from None
    assert code == 0
