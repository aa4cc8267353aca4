"""The fleet's control plane with real workers on every broker: names,
heartbeats, every ``greenq inspect`` and ``greenq control`` command, events."""
from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest

pytestmark = pytest.mark.e2e


def _json(env, *args: str, timeout: str = "1") -> dict:
    done = env.admin(*args, "--json", "--timeout", timeout)
    assert done.stdout.strip(), done.stderr
    return json.loads(done.stdout)


def _wait_for(env, names, what: str = "ping") -> dict:
    """Ask until every worker in ``names`` answers (they are starting)."""
    deadline = time.monotonic() + 30
    while True:
        replies = _json(env, "inspect", what)
        if set(names) <= set(replies):
            return replies
        if time.monotonic() > deadline:
            raise AssertionError(f"workers {names} never answered {what}: {replies}\n{env.dump()}")


def test_every_inspect_and_control_command(any_env, pool):
    import e2e_tasks
    env = any_env
    app = env.app()
    queue = app.config.default_queue
    w1 = env.worker(pool, "-n", "w1", "-c", "1", burst=False)
    assert _wait_for(env, ["w1"]) == {"w1": {"ok": "pong"}}
    a = e2e_tasks.slow.delay("a", 30)
    b = e2e_tasks.slow.delay("b", 0.1)
    env.wait_marker("a.started")
    w2 = env.worker(pool, "-n", "w2", "-c", "1", burst=False)
    assert _wait_for(env, ["w1", "w2"]) == {"w1": {"ok": "pong"}, "w2": {"ok": "pong"}}

    active = _json(env, "inspect", "active", "-d", "w1")
    assert list(active) == ["w1"] and [t["id"] for t in active["w1"]] == [a.id], active
    assert active["w1"][0]["name"] == "e2e.slow" and active["w1"][0]["args"] == ["a", 30]
    assert time.time() - 60 < active["w1"][0]["started"] <= time.time()
    reserved = _json(env, "inspect", "reserved", "-d", "w1")["w1"]
    assert [t["id"] for t in reserved] == [b.id], reserved
    assert _json(env, "inspect", "scheduled", "-d", "w1") == {"w1": []}
    assert "e2e.add" in _json(env, "inspect", "registered", "-d", "w2")["w2"]

    stats = _json(env, "inspect", "stats")
    assert set(stats) == {"w1", "w2"}
    assert stats["w1"]["running"] == 1 and stats["w1"]["held"] == 2 and stats["w1"]["pool"] == pool
    assert stats["w2"]["concurrency"] == 1 and stats["w2"]["queues"] == [queue] and stats["w2"]["rss"] > 0

    # control: pool size, rate limits, queues -- on w2 only
    assert _json(env, "control", "pool-grow", "2", "-d", "w2") == {"w2": "pool grown by 2 to 3"}
    assert _json(env, "control", "pool-shrink", "1", "-d", "w2") == {"w2": "pool shrunk by 1 to 2"}
    assert _json(env, "inspect", "stats", "-d", "w2")["w2"]["concurrency"] == 2
    assert _json(env, "control", "rate-limit", "e2e.add", "50/s", "-d", "w2") == {
        "w2": "e2e.add: rate limit set to 50/s"}
    refused = env.admin("control", "rate-limit", "no.such.task", "1/s", "-d", "w2")
    assert refused.returncode == 1 and "unknown task 'no.such.task'" in refused.stdout, refused
    extra = f"extra-{uuid.uuid4().hex[:6]}"
    assert _json(env, "control", "add-consumer", extra, "-d", "w2") == {"w2": f"now consuming {extra}"}
    assert e2e_tasks.add.apply_async((20, 22), queue=extra).get(timeout=20) == 42
    assert _json(env, "inspect", "stats", "-d", "w2")["w2"]["queues"] == [queue, extra]
    assert _json(env, "control", "cancel-consumer", extra, "-d", "w2") == {"w2": f"no longer consuming {extra}"}

    # a revoked task is reported by the worker that dropped it
    task_id = uuid.uuid4().hex
    app.control_revoke(task_id)
    # (due in 1 s: rpc:// workers learn revocations from a stream of their own, asynchronously)
    revoked = e2e_tasks.add.apply_async((1, 1), task_id=task_id, countdown=1)
    with pytest.raises(Exception):
        revoked.get(timeout=20)
    assert revoked.state == "REVOKED"
    replies = _json(env, "inspect", "revoked")
    assert any(task_id in ids for ids in replies.values()), replies

    # shutdown: w2 stops warm, w1 goes on
    assert _json(env, "control", "shutdown", "-d", "w2") == {"w2": "warm shutdown started"}
    assert w2.wait(timeout=30) == 0
    assert _json(env, "inspect", "ping") == {"w1": {"ok": "pong"}}
    w1.send_signal(signal.SIGQUIT)      # cold: task a goes back to the queue
    assert w1.wait(timeout=30) == 0


def test_one_name_per_child_under_processes(pool, sqlite_env):
    proc = sqlite_env.worker(pool, "-n", "pw", "--processes", "2", "-c", "2", burst=False)
    assert _wait_for(sqlite_env, ["pw-0", "pw-1"]) == {"pw-0": {"ok": "pong"}, "pw-1": {"ok": "pong"}}
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0


def test_no_reply_exits_69_and_ping_of_an_absent_worker(sqlite_env):
    done = sqlite_env.admin("inspect", "ping", "--timeout", "0.3")
    assert done.returncode == 69 and "no worker replied within 0.3 s" in done.stderr


class EventReader:
    """``greenq events --json`` in a subprocess; its lines are read by a thread."""

    def __init__(self, env) -> None:
        # Ctrl-C as at a terminal: a process started in the background by a
        # non-interactive shell inherits SIGINT ignored, and Python then keeps it so
        self.proc = subprocess.Popen([sys.executable, "-m", "greenq.cli", "events", "--json", "--timeout", "120"],
                                     cwd=env.tmp, env=env.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        env.procs.append(self.proc)
        self.events: "queue.Queue[dict]" = queue.Queue()
        self.seen: list = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.strip():
                self.events.put(json.loads(line))

    def wait_for(self, match, what: str, timeout: float = 30) -> dict:
        """The first event read so far, or within ``timeout``, for which ``match(event)`` is true."""
        for event in self.seen:
            if match(event):
                return event
        deadline = time.monotonic() + timeout
        while True:
            try:
                event = self.events.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                seen = [(e.get("type"), e.get("worker"), e.get("uuid")) for e in self.seen]
                raise AssertionError(f"no {what} event within {timeout} s; saw {seen}") from None
            self.seen.append(event)
            if match(event):
                return event


def test_events_and_heartbeats(any_env, pool):
    """``greenq events --json`` sees the worker beat, run tasks (received,
    started, succeeded, failed, with runtimes) and go offline."""
    import e2e_tasks
    env = any_env
    env.app()
    worker = env.worker(pool, "-n", "ev1", "-E", burst=False)
    reader = EventReader(env)
    # a heartbeat also proves the reader is subscribed (RabbitMQ: events are for connected readers only)
    beat = reader.wait_for(lambda e: e["type"] == "worker-heartbeat" and e["worker"] == "ev1", "heartbeat")
    assert beat["pool"] == pool and beat["freq"] == 2.0 and beat["rss"] > 0
    assert abs(beat["timestamp"] - time.time()) < 60          # seconds again, not microseconds
    ok = e2e_tasks.add.delay(1, 2)
    bad = e2e_tasks.fail.delay("boom")
    assert ok.get(timeout=20) == 3
    bad.get(timeout=20, propagate=False)
    for kind in ("task-received", "task-started", "task-succeeded"):
        event = reader.wait_for(lambda e: e["type"] == kind and e["uuid"] == ok.id, kind)
        assert event["name"] == "e2e.add" and event["worker"] == "ev1"
    assert event["runtime"] >= 0
    failed = reader.wait_for(lambda e: e["type"] == "task-failed" and e["uuid"] == bad.id, "task-failed")
    assert "KeyError" in failed["exception"] and "Traceback" in failed["traceback"]
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == 0
    reader.wait_for(lambda e: e["type"] == "worker-offline" and e["worker"] == "ev1", "worker-offline")
    reader.proc.send_signal(signal.SIGINT)
    reader.proc.wait(timeout=20)


def test_task_sent_events(any_env, pool):
    """``task-sent``: a client with ``task_send_sent_event = true`` publishes
    one for each task it sends (flushed at its exit too); a worker with -E
    publishes one for each task it sends (here a chain's next step); a client
    without the setting publishes none."""
    import e2e_tasks
    env = any_env
    env.app()
    worker = env.worker(pool, "-n", "ev2", "-E", burst=False)
    reader = EventReader(env)
    reader.wait_for(lambda e: e["type"] == "worker-heartbeat" and e["worker"] == "ev2", "heartbeat")
    quiet = e2e_tasks.add.delay(100, 1)                    # this process: no task-sent
    assert quiet.get(timeout=20) == 101
    code = ("import os, socket, e2e_tasks\n"
            "one = e2e_tasks.add.delay(2, 5)\n"
            "chain = (e2e_tasks.add.s(1, 1) | e2e_tasks.add.s(10)).delay()\n"
            "assert one.get(timeout=20) == 7 and chain.get(timeout=20) == 12\n"
            "print(socket.gethostname(), os.getpid(), one.id, chain.id, chain.parent.id)\n")
    env.env["GREENQ_TASK_SEND_SENT_EVENT"] = "true"
    try:
        done = env.client(code)
    finally:
        del env.env["GREENQ_TASK_SEND_SENT_EVENT"]
    assert done.returncode == 0, done.stderr
    host, pid, one_id, last_id, first_id = done.stdout.split()
    client = f"{host}.{pid}"
    sent = reader.wait_for(lambda e: e["type"] == "task-sent" and e["uuid"] == one_id, "client task-sent")
    assert sent["worker"] == client and sent["name"] == "e2e.add" and sent["args"] == "[2, 5]"
    got = reader.wait_for(lambda e: e["type"] == "task-received" and e["uuid"] == one_id, "task-received")
    assert sent["queue"] == got["queue"] and got["worker"] == "ev2"
    assert sent["timestamp"] <= got["timestamp"] + 1 and abs(sent["timestamp"] - time.time()) < 60
    first = reader.wait_for(lambda e: e["type"] == "task-sent" and e["uuid"] == first_id, "chain task-sent")
    assert first["worker"] == client
    step = reader.wait_for(lambda e: e["type"] == "task-sent" and e["uuid"] == last_id, "worker task-sent")
    assert step["worker"] == "ev2" and step["args"] == "[2, 10]" and step["parent_id"] == first_id
    assert step["root_id"] == first_id
    reader.wait_for(lambda e: e["type"] == "task-succeeded" and e["uuid"] == last_id, "chain's last step")
    assert not [e for e in reader.seen if e["type"] == "task-sent" and e["uuid"] == quiet.id]
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == 0
    reader.proc.send_signal(signal.SIGINT)
    reader.proc.wait(timeout=20)
