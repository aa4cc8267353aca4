"""End-to-end fixtures: real greenq-worker processes, one per driver under
test (GREENQ_TEST_DRIVERS, default gevent), on the embedded SQLite broker and,
where marked, on Redis and RabbitMQ."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import AMQP_PREFIX, delete_queues, keep_env, on_rabbitmq

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
DRIVERS = [d for d in os.environ.get("GREENQ_TEST_DRIVERS", "gevent").split(",") if d]


#: solo is the threads pool at concurrency 1: the core scenarios cover it
SOLO_MODULES = {"test_worker_e2e", "test_endpoints_e2e"}


#: whether this run takes the tests that start no worker of the pool under test:
#: by default the run whose drivers include gevent; tox.ini gives them to the
#: threads environment instead (GREENQ_TEST_E2E_POOLLESS=1 there, 0 elsewhere),
#: so the four environments take about equally long
POOLLESS = os.environ.get("GREENQ_TEST_E2E_POOLLESS", "1" if "gevent" in DRIVERS else "0") == "1"


def pytest_collection_modifyitems(config, items):
    """A test that starts no worker of the pool under test (no ``pool``
    fixture) runs once, in one environment (``POOLLESS``): the others would
    only run it again unchanged."""
    if POOLLESS:
        return
    keep = [item for item in items if "pool" in getattr(item, "fixturenames", ())
            or not str(item.fspath).startswith(str(HERE))]
    if len(keep) != len(items):
        config.hook.pytest_deselected(items=[item for item in items if item not in keep])
        items[:] = keep


def pytest_generate_tests(metafunc):
    if "pool" in metafunc.fixturenames:
        pools = DRIVERS
        if metafunc.module.__name__.rsplit(".", 1)[-1] not in SOLO_MODULES:
            pools = [p for p in DRIVERS if p != "solo"] or DRIVERS
        metafunc.parametrize("pool", pools)


class Env:
    """One test's world: a broker namespace, an environment, helpers to run
    workers, admin commands and client processes."""

    def __init__(self, tmp_path: Path, broker_url: str, extra_env: dict) -> None:
        self.tmp = tmp_path
        self.markers = tmp_path / "markers"
        self.markers.mkdir()
        self.broker_url = broker_url
        self.env = {k: v for k, v in os.environ.items() if keep_env(k)}
        self.env.update({
            "GREENQ_BROKER_URL": broker_url,
            "PYTHONPATH": os.pathsep.join([str(HERE), str(ROOT)]),
            "E2E_MARKERS": str(self.markers),
            "GREENQ_WORKER_LOGLEVEL": "INFO",
            "GREENQ_WORKER_BLOCKING_THRESHOLD": "0",
        })
        if on_rabbitmq(broker_url):   # the run's names on a vhost that may be shared
            self.env["GREENQ_KEY_PREFIX"] = AMQP_PREFIX
        self.env.update(extra_env)
        self.procs = []

    def worker(self, pool: str, *args: str, burst: bool = True, **popen) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "greenq.worker", "-A", "e2e_tasks", "--pool", pool, *args]
        if burst:
            cmd.append("--burst")
        proc = subprocess.Popen(cmd, cwd=self.tmp, env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, **popen)
        self.procs.append(proc)
        return proc

    def run_worker(self, pool: str, *args: str, timeout: float = 60) -> "tuple[int, str]":
        proc = self.worker(pool, *args)
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out

    def admin(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "greenq.cli", *args], cwd=self.tmp, env=self.env,
                              capture_output=True, text=True, timeout=timeout)

    def client(self, code: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run ``code`` in a plain, unpatched Python process (the thin client)."""
        return subprocess.run([sys.executable, "-c", code], cwd=self.tmp, env=self.env,
                              capture_output=True, text=True, timeout=timeout)

    def app(self, module: str = "e2e_tasks"):
        """The app of the tasks module ``module`` (tests/e2e), pointed at this
        test's broker: this pytest process is the unpatched client."""
        import importlib
        from greenq.config import load
        app = importlib.import_module(module).app
        app.close()
        app.config = load(search=False, env={k: v for k, v in self.env.items() if k.startswith("GREENQ_")})
        app._codec = None
        return app

    def wait_marker(self, name: str, timeout: float = 20) -> None:
        path = self.markers / name
        deadline = time.monotonic() + timeout
        # a whole line, not just the file: a worker killed at once may have
        # created it (open) and died before it wrote its pid (seen in CI)
        while not (path.exists() and path.read_text().endswith("\n")):
            if time.monotonic() > deadline:
                raise AssertionError(f"marker {name} never appeared; workers said:\n{self.dump()}")
            time.sleep(0.02)

    def marker_count(self, name: str) -> int:
        path = self.markers / name
        return len(path.read_text().split()) if path.exists() else 0

    def dump(self) -> str:
        """Stop every worker still running and return what they printed."""
        parts = []
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGQUIT)
            try:
                out, _ = proc.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, _ = proc.communicate()
            parts.append(f"--- {' '.join(proc.args[3:])} (exit {proc.returncode})\n{out}")
        return "\n".join(parts)

    def cleanup(self) -> None:
        """Kill the workers still running; on RabbitMQ, delete the test's task
        queues (``GREENQ_DEFAULT_QUEUE``, ``GREENQ_WORKER_QUEUES``)."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
        if on_rabbitmq(self.broker_url):
            queues = {q.strip() for key in ("GREENQ_DEFAULT_QUEUE", "GREENQ_WORKER_QUEUES")
                      for q in self.env.get(key, "").split(",") if q.strip()}
            delete_queues(self.broker_url, queues, self.env.get("GREENQ_KEY_PREFIX", "greenq"))


@pytest.fixture
def sqlite_env(tmp_path):
    sys.path.insert(0, str(HERE))
    env = Env(tmp_path, f"sqlite:///{tmp_path / 'broker.sqlite3'}", {})
    yield env
    env.cleanup()


@pytest.fixture(params=["sqlite", "redis", "amqp"])
def any_env(request, tmp_path):
    """The same test on every broker."""
    sys.path.insert(0, str(HERE))
    extra = {}
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'broker.sqlite3'}"
    elif request.param == "redis":
        url = request.getfixturevalue("redis_url")
        extra["GREENQ_KEY_PREFIX"] = request.getfixturevalue("redis_prefix")
    else:
        url = request.getfixturevalue("amqp_url")
        extra["GREENQ_DEFAULT_QUEUE"] = f"e2e-{uuid.uuid4().hex[:8]}"
        extra["GREENQ_WORKER_QUEUES"] = extra["GREENQ_DEFAULT_QUEUE"]
    env = Env(tmp_path, url, extra)
    env.kind = request.param
    yield env
    env.cleanup()
