"""The control plane in one process (memory://, threads driver), and the
dashboard's fleet state fed with events."""
from __future__ import annotations

import threading
import uuid

from greenq import GreenQ
from greenq.control.agent import OFFLINE_AFTER, worker_name
from greenq.control.client import Control
from greenq.dashboard.state import BUCKET, FleetState
from greenq.drivers import get_driver
from greenq.cli.worker import build_worker
from greenq.worker.consumer import Worker


def _running_worker(app: GreenQ, name: str, **options) -> "tuple[Worker, threading.Thread, list]":
    worker = build_worker(app, get_driver("threads"), queues=["default"], concurrency=2, name=name, **options)
    codes: list = []
    thread = threading.Thread(target=lambda: codes.append(worker.run()))
    thread.start()
    return worker, thread, codes


def test_commands_reach_the_named_worker_and_shutdown_stops_it():
    url = f"memory://control-{uuid.uuid4().hex[:6]}"
    app = GreenQ("ctl", broker=url)

    @app.task(name="ctl.add")
    def add(x, y):
        return x + y

    worker, thread, codes = _running_worker(app, "unit-%p")
    name = worker_name("unit-%p")
    control = Control(app)
    try:
        assert worker.name == name
        replies = []
        for _ in range(50):          # the control greenlet is starting
            replies = control.call("ping", timeout=0.2)
            if replies:
                break
        assert replies == [{"worker": name, "id": replies[0]["id"], "ok": "pong"}]
        assert control.call("ping", destination=["someone-else"], timeout=0.3) == []
        stats = control.call("stats", destination=[name], timeout=5)[0]["ok"]
        assert stats["pool"] == "threads" and stats["concurrency"] == 2 and stats["worker"] == name
        assert control.call("registered", destination=[name], timeout=5)[0]["ok"] == ["ctl.add"]
        grown = control.call("pool_grow", {"n": 3}, destination=[name], timeout=5)[0]
        assert grown["ok"] == "pool grown by 3 to 5" and worker.concurrency == 5
        bad = control.call("pool_shrink", {"n": 0}, destination=[name], timeout=5)[0]
        assert "expected a whole number >= 1" in bad["error"]
        unknown = control.call("reboot", destination=[name], timeout=5)[0]
        assert unknown["error"] == "ValueError: unknown command 'reboot'"
        assert add.delay(2, 3).get(timeout=10) == 5
        assert control.call("shutdown", destination=[name], timeout=5)[0]["ok"] == "warm shutdown started"
        thread.join(20)
        assert codes == [0]
    finally:
        worker.request_stop(cold=True)
        thread.join(20)
        control.close()


def test_fleet_state_from_events():
    now = [1000.0]
    state = FleetState(clock=lambda: now[0])
    beat = {"type": "worker-heartbeat", "worker": "w1", "boot": "b", "timestamp": 1000.0, "pool": "gevent",
            "succeeded": 10, "failed": 1, "running": 2, "concurrency": 100}
    state.apply([beat])
    assert [w["online"] for w in state.worker_list()] == [True]
    state.apply([dict(beat, timestamp=1002.0, succeeded=40, failed=3)])
    points = state.throughput()
    assert sum(p["succeeded"] for p in points) == 30 and sum(p["failed"] for p in points) == 2
    assert points[-1]["t"] == int(1000.0 // BUCKET * BUCKET)
    now[0] = 1002.0 + OFFLINE_AFTER + 0.1                  # three heartbeats missed
    assert [w["online"] for w in state.worker_list()] == [False]
    state.apply([{"type": "task-received", "uuid": "t1", "name": "shop.add", "worker": "w1", "timestamp": 1.0,
                  "args": "[1, 2]"},
                 {"type": "task-started", "uuid": "t1", "name": "shop.add", "worker": "w1", "timestamp": 2.0},
                 {"type": "task-failed", "uuid": "t1", "name": "shop.add", "worker": "w1", "timestamp": 3.0,
                  "exception": "KeyError: 'x'", "traceback": "Traceback ...", "runtime": 0.5},
                 {"type": "task-received", "uuid": "t2", "name": "shop.mul", "worker": "w1", "timestamp": 4.0}])
    assert [t["id"] for t in state.task_list()] == ["t2", "t1"]
    assert state.task_list(search="ADD")[0]["state"] == "FAILURE"
    assert state.task_list(state="RECEIVED")[0]["id"] == "t2"
    assert state.failure_list()[0]["traceback"] == "Traceback ..."
    assert state.task("t1")["runtime"] == 0.5 and state.task("nope") is None
    state.apply([{"type": "worker-offline", "worker": "w2", "timestamp": now[0]}, {"type": 3}, "junk"])
    assert {w["name"]: w["online"] for w in state.worker_list()} == {"w1": False, "w2": False}


def test_children_metrics_merge_into_one_exposition():
    from greenq.worker.supervisor import merge
    text = ('# HELP x_total X\n# TYPE x_total counter\nx_total 3\n'
            '# HELP h H\n# TYPE h histogram\nh_bucket{task="t",le="1.0"} 2\nh_count{task="t"} 2\n')
    lines = merge([(0, text), (1, text.replace(" 3", " 4"))]).splitlines()
    assert lines == ["# HELP x_total X", "# TYPE x_total counter", 'x_total{child="0"} 3', 'x_total{child="1"} 4',
                     "# HELP h H", "# TYPE h histogram",
                     'h_bucket{child="0",task="t",le="1.0"} 2', 'h_count{child="0",task="t"} 2',
                     'h_bucket{child="1",task="t",le="1.0"} 2', 'h_count{child="1",task="t"} 2']


def test_fleet_state_task_sent_never_moves_a_task_back():
    """task-sent comes from the sender and may be read after the worker's
    events: it fills in what is missing and never undoes a later state."""
    state = FleetState(clock=lambda: 10.0)
    state.apply([{"type": "task-received", "uuid": "a", "name": "n", "worker": "w1", "timestamp": 2.0},
                 {"type": "task-sent", "uuid": "a", "name": "n", "worker": "client.1", "timestamp": 1.0,
                  "args": "[1]", "eta": 5.0},
                 {"type": "task-sent", "uuid": "b", "name": "n", "worker": "client.1", "timestamp": 3.0}])
    tasks = {t["id"]: t for t in state.task_list()}
    assert tasks["a"]["state"] == "RECEIVED" and tasks["a"]["worker"] == "w1"
    assert tasks["a"]["sent_by"] == "client.1" and tasks["a"]["args"] == "[1]" and tasks["a"]["eta"] == 5.0
    assert tasks["b"]["state"] == "SENT" and tasks["b"]["sent"] == 3.0
    assert [t["id"] for t in state.task_list(state="SENT")] == ["b"]
