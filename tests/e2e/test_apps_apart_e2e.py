"""Two apps on one server, told apart by ``key_prefix`` alone: one Redis
database, and one RabbitMQ vhost (docs/operations.md, "Apps apart").

Each app runs a real worker.  Then, for each check of ``CHECKS`` (in order;
add one with ``@check``): tasks, ``inspect``, events, revokes (broadcast and
stored) never cross; last, a ``shutdown`` sent by app A stops A's worker and
leaves B's running.  On RabbitMQ task queues are named as configured, so
each app consumes a queue of its own there; on Redis both use ``default``.
(A SQLite file is one app's: its tables ignore key_prefix, as documented.)
"""
from __future__ import annotations

import signal
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, List

import pytest

from greenq import GreenQ
from greenq.config import load
from greenq.control.client import Control
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


@pytest.fixture(params=["redis", "amqp"])
def pair(request, tmp_path):
    sys.path.insert(0, str(HERE))
    if request.param == "redis":
        url, base = request.getfixturevalue("redis_url"), request.getfixturevalue("redis_prefix")
        queues = ("default", "default")              # the same queue name: the prefix keeps them apart
    else:
        url, base = request.getfixturevalue("amqp_url"), f"gqtest-{uuid.uuid4().hex[:8]}"
        queues = (f"{base}-qa", f"{base}-qb")
    a = _side("a", tmp_path / "a", url, f"{base}-a", queues[0])
    b = _side("b", tmp_path / "b", url, f"{base}-b", queues[1])
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


def test_two_apps_on_one_server_never_cross(pair, pool):
    a, b = pair
    for side in (a, b):
        side.worker = side.env.worker(pool, "-n", side.name, "-c", "2", burst=False)
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
