"""Garbage on the real event stream beside a real worker's traffic (Redis
stream ``P:events``, RabbitMQ fanout exchange ``P.events``): bodies that
are not JSON, heartbeats whose fields have the wrong type (``"succeeded":
"many"``, ``1e400``, a list, ``"queues": "default"``), names of 10,000
characters, ANSI escapes and carriage returns in names and texts, and 100,000
forged heartbeats (100 batches of 1,000).

A real ``greenq dashboard`` process and a real ``greenq events`` process read
it all.  Then: the dashboard's /api/workers shows the real worker online with
its real counters, never more than WORKERS_KEPT workers, in a bounded answer;
/api/tasks shows the real tasks succeeded; /api/stats counts what was skipped;
``greenq events`` printed the real tasks' events, no control character, and
says at the end how many events it skipped (before: it died with "cannot
reach the broker", or the dashboard froze re-reading the same batch).
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from typing import Any, Callable, List

import pytest

from greenq.dashboard.state import WORKERS_KEPT

from .conftest import HERE, Env
from .test_dashboard_browser import _start_dashboard

pytestmark = pytest.mark.e2e

WORKER = "readers-w1"


@pytest.fixture(params=["redis", "amqp"])
def broker_env(request, tmp_path):
    """A test's world on Redis (its own key prefix) or RabbitMQ (the run's vhost, a queue of its own)."""
    sys.path.insert(0, str(HERE))
    if request.param == "redis":
        url = request.getfixturevalue("redis_url")
        extra = {"GREENQ_KEY_PREFIX": request.getfixturevalue("redis_prefix")}
    else:
        url = request.getfixturevalue("amqp_url")
        queue = f"e2e-{uuid.uuid4().hex[:8]}"
        extra = {"GREENQ_DEFAULT_QUEUE": queue, "GREENQ_WORKER_QUEUES": queue}
    env = Env(tmp_path, url, extra)
    env.kind = request.param
    yield env
    env.cleanup()


def _garbage() -> List[bytes]:
    """Bodies a garbled or hostile writer could put on the stream."""
    now = time.time()
    wrong = ('{"v": 2, "w": "x", "e": [{"type": "worker-heartbeat", "worker": "forged-types", '
             '"timestamp": %d, "succeeded": "many", "failed": 1e400, "running": [1, 2], '
             '"queues": "default", "rss": -1, "pid": true, "processed": %d}]}' % (now * 1e6, 10 ** 400))
    bodies = [b"{not json", b"\xff\xfe\x00", b"", b"null", b"[" * 100000, wrong.encode(),
              json.dumps({"v": 2, "w": "x", "e": [
                  {"type": "worker-heartbeat", "worker": "n" * 10000, "timestamp": int(now * 1e6)},
                  {"type": "worker-heartbeat", "worker": "ansi\x1b[2J\x1b[31m\r", "timestamp": int(now * 1e6)},
                  ["task-ansi", "evil\x1b[31m", 3, int(now * 1e6), 1, "E: \x1b[2J\rboom", "tb"],
                  ["task-huge", "n", 2, 10 ** 30, "not a runtime"],
                  {"type": "task-started", "uuid": {"a": 1}}, {"type": 7}, [1, 2, 3]]}).encode()]
    for i in range(100):                                     # 100,000 forged heartbeats
        bodies.append(json.dumps({"v": 2, "w": "forger", "e": [
            {"type": "worker-heartbeat", "worker": f"forged-{i}-{j}", "timestamp": int(now * 1e6)}
            for j in range(1000)]}).encode())
    return bodies


def _write(env, bodies: List[bytes]) -> None:
    """Straight into the broker, in the layout of greenq/transports/redis/control.py or amqp.py."""
    if env.kind == "redis":
        import redis
        client = redis.Redis.from_url(env.broker_url)
        pipe = client.pipeline(transaction=False)
        for body in bodies:
            pipe.xadd(f"{env.env['GREENQ_KEY_PREFIX']}:events", {"e": body})
        pipe.xadd(f"{env.env['GREENQ_KEY_PREFIX']}:events", {"other": b"no e field"})
        pipe.execute()
        client.close()
        return
    import amqp
    from greenq.transports.amqp.common import connection_params
    conn = amqp.Connection(**connection_params(env.broker_url))
    conn.connect()
    channel = conn.channel()
    for body in bodies:
        channel.basic_publish(amqp.Message(body), exchange=f"{env.env['GREENQ_KEY_PREFIX']}.events",
                              routing_key="")
    conn.close()


class Lines:
    """The lines a process prints, gathered by a thread."""

    def __init__(self, stream: Any) -> None:
        self.lines: List[str] = []
        self.thread = threading.Thread(target=lambda: self.lines.extend(stream), daemon=True)
        self.thread.start()

    def wait_for(self, check: Callable[[str], bool], what: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not any(check(line) for line in list(self.lines)):
            assert time.monotonic() < deadline, f"greenq events never printed {what}:\n{''.join(self.lines)[-3000:]}"
            time.sleep(0.05)


def _get(base: str, path: str) -> Any:
    with urllib.request.urlopen(base + path, timeout=10) as resp:
        return json.loads(resp.read())


def _until(check: Callable[[], Any], what: str, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        assert time.monotonic() < deadline, f"never saw {what}"
        time.sleep(0.1)


def test_malformed_events_beside_a_real_worker(broker_env, pool):
    import e2e_tasks
    env = broker_env
    env.app()
    worker = env.worker(pool, "-n", WORKER, "-E", burst=False)
    _, base = _start_dashboard(env)
    # SIGINT ends it below: a test run started in the background of a non-interactive shell
    # inherits SIGINT ignored, and Python then keeps it ignored, so the reader gets it back
    events = subprocess.Popen([sys.executable, "-m", "greenq.cli", "events", "--timeout", "120"], cwd=env.tmp,
                              env=env.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    env.procs.append(events)
    printed = Lines(events.stdout)
    # both readers are subscribed once they have seen the worker (RabbitMQ: only connected readers get events)
    printed.wait_for(lambda line: f"worker-heartbeat   {WORKER}:" in line, "the worker's heartbeat")
    _until(lambda: any(w["name"] == WORKER and w["online"] for w in _get(base, "/api/workers")),
           "the worker online in the dashboard")

    bodies = _garbage()
    _write(env, bodies[:60])
    results = [e2e_tasks.add.delay(i, 1) for i in range(5)]
    _write(env, bodies[60:])
    assert [r.get(timeout=30) for r in results] == [1, 2, 3, 4, 5]

    # greenq events: the real tasks' events, no control character, still running
    for r in results:
        printed.wait_for(lambda line, r=r: "task-succeeded" in line and r.id in line, f"task {r.id} succeeded")
    printed.wait_for(lambda line: "task-ansi" in line, "the garbled task's event, escaped")
    assert events.poll() is None, events.stderr.read()
    # the dashboard: the real worker and tasks; the forged ones bounded
    started = time.monotonic()
    tasks = _until(lambda: (lambda t: t if all(t.get(r.id) == "SUCCESS" for r in results) else None)(
        {t["id"]: t["state"] for t in _get(base, "/api/tasks?limit=1000")}), "the tasks succeeded")
    assert len(tasks) >= 5

    def real_worker():
        with urllib.request.urlopen(base + "/api/workers", timeout=10) as resp:
            raw = resp.read()
        workers = {w["name"]: w for w in json.loads(raw)}
        assert len(workers) <= WORKERS_KEPT and len(raw) < 2 * 1024 * 1024
        w = workers.get(WORKER)
        return w if w and w["online"] and (w["processed"] or 0) >= 5 else None
    w = _until(real_worker, "the real worker online with its 5 tasks")
    assert w["queues"] and all(isinstance(q, str) for q in w["queues"]) and w["pool"] == pool
    assert time.monotonic() - started < 30
    stats = _until(lambda: (lambda s: s if s["events_read"] > 100000 else None)(_get(base, "/api/stats")),
                   "the forged heartbeats read")
    assert stats["events_skipped"] >= 2 and stats["fields_dropped"] >= 8 and stats["batches_failed"] == 0
    assert stats["workers"] <= WORKERS_KEPT

    events.send_signal(signal.SIGINT)
    out_rest, err = events.communicate(timeout=30)
    printed.thread.join(10)
    text = "".join(printed.lines)
    assert "cannot reach the broker" not in err, err
    assert "malformed event(s) skipped" in err, err
    for bad in ("\x1b", "\r", "\x00"):
        assert bad not in text
    assert "E: \\x1b[2J\\rboom" in text                  # (the worker named with escapes: skipped)
    assert "n" * 10000 not in text
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == 0
