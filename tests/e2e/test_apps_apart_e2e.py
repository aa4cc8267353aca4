"""Two apps on one server, told apart by ``key_prefix`` alone: one Redis
database, one RabbitMQ vhost, one SQLite file (docs/operations.md, "Apps
apart").  Both apps use the same queue name, ``default``.

Each app runs a real worker.  Then, for each check of ``CHECKS`` (in order;
add one with ``@check``): tasks, ``inspect``, events, revokes (broadcast and
stored), schedules (each app's ``greenq beat`` sends its own entry, of the
same name, and neither takes the other's lease) and dashboards (``greenq
dashboard`` shows its own app's workers and queues) never cross; last, a
``shutdown`` sent by app A stops A's worker and leaves B's running.
"""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, List

import pytest

from greenq import GreenQ
from greenq.config import load
from greenq.control.client import Control
from tests.conftest import own_prefix
from tests.e2e.conftest import HERE, Env

pytestmark = pytest.mark.e2e


@dataclass
class Side:
    """One app of the pair: its environment, client app, control client and worker."""
    label: str
    env: Env
    app: GreenQ
    control: Control
    name: str
    worker: Any = None
    notes: List[str] = field(default_factory=list)


CHECKS: List[Callable[[Side, Side], None]] = []


def check(fn: Callable[[Side, Side], None]) -> Callable[[Side, Side], None]:
    """Run ``fn(a, b)`` and ``fn(b, a)`` on the running pair."""
    CHECKS.append(fn)
    return fn


def _side(label: str, tmp: Path, url: str, prefix: str, queue: str) -> Side:
    tmp.mkdir()
    env = Env(tmp, url, {"GREENQ_KEY_PREFIX": prefix, "GREENQ_DEFAULT_QUEUE": queue,
                         "GREENQ_WORKER_QUEUES": queue})
    cfg = load(search=False, env={k: v for k, v in env.env.items() if k.startswith("GREENQ_")})
    app = GreenQ(f"apps-{label}", config=cfg)
    return Side(label, env, app, Control(app), f"apps-{label}")


@pytest.fixture(params=["redis", "amqp", "sqlite"])
def pair(request, tmp_path):
    sys.path.insert(0, str(HERE))
    if request.param == "redis":
        url, base = request.getfixturevalue("redis_url"), request.getfixturevalue("redis_prefix")
    elif request.param == "amqp":
        url, base = request.getfixturevalue("amqp_url"), own_prefix()
    else:
        url, base = f"sqlite:///{tmp_path / 'shared.sqlite3'}", f"gqtest-{uuid.uuid4().hex[:8]}"
    # the same queue name: the prefix alone keeps them apart
    a = _side("a", tmp_path / "a", url, f"{base}-a", "default")
    b = _side("b", tmp_path / "b", url, f"{base}-b", "default")
    yield a, b
    for side in (a, b):
        side.control.close()
        side.app.close()
        side.env.cleanup()


def _until(what: str, found: Callable[[], Any], a: Side, b: Side, seconds: float = 20) -> Any:
    deadline = time.monotonic() + seconds
    while True:
        value = found()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} never happened\n{a.env.dump()}\n{b.env.dump()}")
        time.sleep(0.05)


def _workers(side: Side, what: str = "ping") -> List[str]:
    return [r["worker"] for r in side.control.call(what, timeout=1.5)]


def _revoked(side: Side) -> List[str]:
    """The ids ``side``'s worker knows as revoked (asked of it by name: no wait for others)."""
    return side.control.call("revoked", destination=[side.name], timeout=5)[0]["ok"]


@check
def tasks_stay_in_their_app(a: Side, b: Side) -> None:
    results = [a.app.send_task("e2e.pid", (i,)) for i in range(3)]
    assert {r.get(timeout=20) for r in results} == {a.worker.pid}


@check
def inspect_answers_from_own_workers(a: Side, b: Side) -> None:
    assert _workers(a) == [a.name]
    assert [r["worker"] for r in a.control.call("stats", timeout=1.5)] == [a.name]


@check
def events_come_from_own_workers(a: Side, b: Side) -> None:
    """Heartbeats (every 2 s) of both workers flow meanwhile: watch 2.5 s at least."""
    seen = set()
    started = time.monotonic()
    events = a.control.events(poll=0.2)
    while time.monotonic() - started < 2.5 or a.name not in seen:
        assert time.monotonic() - started < 15, seen
        seen.update(e.get("worker") for e in next(events))
    assert seen == {a.name}, seen


@check
def revokes_stay_in_their_app(a: Side, b: Side) -> None:
    task_id = f"revoke-{a.label}-{uuid.uuid4().hex}"
    a.app.control_revoke(task_id)
    _until(f"{a.name} knows the revoke", lambda: task_id in _revoked(a), a, b)
    assert task_id not in _revoked(b)
    assert task_id not in [r.task_id for r in b.app.backend.revocations(0)]
    assert task_id in [r.task_id for r in a.app.backend.revocations(0)]


def _spawn(side: Side, *args: str, env: dict = None) -> subprocess.Popen:
    """A ``greenq`` command of ``side``'s app, running (stopped by ``env.cleanup`` at the latest)."""
    proc = subprocess.Popen([sys.executable, "-m", "greenq.cli", "-A", "e2e_tasks", *args], cwd=side.env.tmp,
                            env={**side.env.env, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    side.env.procs.append(proc)
    return proc


def _stop(proc: subprocess.Popen, codes: tuple = (0,)) -> None:
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode in codes, out


def _ticks(side: Side) -> List[str]:
    path = side.env.markers / "beat_tick"
    return path.read_text().split() if path.exists() else []


@check
def schedules_stay_in_their_app(a: Side, b: Side) -> None:
    """Both apps' schedulers run at once, each with an entry ``tick`` (the same
    name): each leads its own app (a shared lease would let only one send)
    and each app's worker runs its own app's ticks."""
    before = {side.label: len(_ticks(side)) for side in (a, b)}
    beats = []
    for side in (a, b):
        ini = side.env.tmp / "beat.ini"
        ini.write_text("[schedule:tick]\ntask = e2e.beat_tick\nevery = 1\n")
        beats.append(_spawn(side, "beat", env={"GREENQ_CONFIG": str(ini)}))
    _until("both schedulers send", lambda: all(len(_ticks(s)) >= before[s.label] + 2 for s in (a, b)), a, b)
    for proc in beats:
        _stop(proc)
    for side in (a, b):
        assert all(t.startswith("beat-tick-") for t in _ticks(side)), _ticks(side)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _api(port: int, path: str) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
        return json.loads(resp.read())


@check
def dashboards_show_their_own_app(a: Side, b: Side) -> None:
    """A's ``greenq dashboard`` lists A's worker only, and A's ``parked``
    queue (no worker consumes it) with A's one message, not B's two."""
    a.app.send_task("e2e.add", (1, 1), queue="parked")
    b.app.send_task("e2e.add", (1, 1), queue="parked")
    b.app.send_task("e2e.add", (1, 1), queue="parked")
    port = _free_port()
    started = time.monotonic()
    proc = _spawn(a, "dashboard", "--http", f"127.0.0.1:{port}",
                  env={"GREENQ_WORKER_QUEUES": "default,parked"})   # (RabbitMQ lists configured queues)
    try:
        def workers() -> List[str]:
            try:
                return [w["name"] for w in _api(port, "/api/workers")]
            except OSError:
                return []
        _until(f"{a.name} on A's dashboard", lambda: a.name in workers(), a, b, 30)
        # heartbeats come every 2 s: by then B's worker would have shown up too
        _until("a heartbeat period", lambda: time.monotonic() - started > 2.5 and workers(), a, b)
        assert workers() == [a.name]
        queues = {q["name"]: q for q in _api(port, "/api/queues")}
        assert set(queues) <= {"default", "parked"}, queues
        assert queues["parked"]["ready"] == 1, queues
    finally:
        _stop(proc, codes=(0, -signal.SIGTERM))   # the dashboard dies of SIGTERM as a server does
        for side in (a, b):
            side.app.broker.purge("parked")


def test_two_apps_on_one_server_never_cross(pair):
    """Names, not the driver, keep apps apart: the workers run gevent, and the
    test runs once (in the gevent environment; tests/e2e/conftest.py)."""
    a, b = pair
    for side in (a, b):
        side.worker = side.env.worker("gevent", "-n", side.name, "-c", "2", burst=False)
    for side in (a, b):
        _until(f"{side.name} answers", lambda: _workers(side), a, b, 30)
    for fn in CHECKS:
        fn(a, b)
        fn(b, a)

    # last: A's shutdown stops A's worker only
    assert [r.get("ok") for r in a.control.call("shutdown", timeout=1.5)] == ["warm shutdown started"]
    out, _ = a.worker.communicate(timeout=30)
    assert a.worker.returncode == 0, out
    assert b.worker.poll() is None and _workers(b) == [b.name]
    assert b.app.send_task("e2e.add", (2, 3)).get(timeout=20) == 5
    b.worker.send_signal(signal.SIGTERM)
    out_b, _ = b.worker.communicate(timeout=30)
    assert b.worker.returncode == 0 and "shutdown -> ok" not in out_b, out_b
