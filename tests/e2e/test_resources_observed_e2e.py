"""Issue 20, item 5, with a real greenq-worker: while tasks wait for a
saturated resource, ``greenq inspect stats --json`` has the resources section
and /metrics the resource gauges; afterwards the waits are counted, and each
waiter was warned about once (docs/resources.md, "Seeing it")."""
from __future__ import annotations

import json
import os
import signal
import socket
import time
import urllib.request

import pytest

pytestmark = pytest.mark.e2e

TASKS = '''
import os
import time

from greenq import GreenQ

app = GreenQ.from_config(name="resobs")
MARKERS = os.environ["E2E_MARKERS"]


@app.task(name="resobs.hold", resources={"pg": 1})
def hold():
    with open(os.path.join(MARKERS, "holding"), "a") as fh:
        fh.write(f"{os.getpid()}\\n")
    while not os.path.exists(os.path.join(MARKERS, "release")):
        time.sleep(0.02)            # cooperative under gevent/eventlet
    return "held"


@app.task(name="resobs.query", resources={"pg": 1})
def query(n):
    return n
'''

INI = "[resource:pg]\nlimit = 1\n\n[resource:api]\nlimit = 7\nscope = process\n"

SEND = '''
import json, resobs_tasks
ids = [resobs_tasks.hold.delay().id] + [resobs_tasks.query.delay(n).id for n in range(4)]
print(json.dumps(ids))
'''

READ = '''
import json, sys, resobs_tasks
ids = json.loads(open("ids.json").read())
print(json.dumps([resobs_tasks.app.AsyncResult(i).get(timeout=20) for i in ids]))
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stats(env, name):
    done = env.admin("inspect", "stats", "--json", "-d", name, "--timeout", "1")
    return json.loads(done.stdout).get(name) if done.returncode == 0 else None


def _until(what, check, env, timeout=30.0):
    """Ask ``check`` again until it returns something true (the worker is another process)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} never came; workers said:\n{env.dump()}")


def test_stats_and_metrics_show_a_saturated_resource(pool, sqlite_env):
    env = sqlite_env
    (env.tmp / "resobs_tasks.py").write_text(TASKS)
    (env.tmp / "greenq.ini").write_text(INI)
    env.env["GREENQ_WORKER_RESOURCE_WAIT_WARNING"] = "0.3"
    sent = env.client(SEND)
    assert sent.returncode == 0, sent.stderr
    (env.tmp / "ids.json").write_text(sent.stdout.strip())
    port = _free_port()
    proc = env.worker(pool, "-A", "resobs_tasks", "-n", "obs", "-c", "4", "--http", f"127.0.0.1:{port}",
                      burst=False)
    env.wait_marker("holding")

    def four_waiting():
        stats = _stats(env, "obs")
        return stats if stats and stats["resources"]["pg"]["waiting"] == 4 else None
    stats = _until("four tasks waiting on pg", four_waiting, env)
    all_waiting = time.monotonic()             # the four waits began before this
    pg = stats["resources"]["pg"]
    assert (pg["limit"], pg["configured_limit"], pg["scope"], pg["adaptive"], pg["in_use"]) \
        == (1, 1, "process", False, 1), pg
    assert stats["resources"]["api"] == {"limit": 7, "configured_limit": 7, "scope": "process",
                                         "adaptive": False, "in_use": 0, "waiting": 0, "wait_count": 0,
                                         "wait_seconds_sum": 0.0, "wait_seconds_max": 0.0}
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert 'greenq_resource_limit{resource="pg"} 1\n' in metrics, metrics
    assert 'greenq_resource_in_use{resource="pg"} 1\n' in metrics
    assert 'greenq_resource_waiting{resource="pg"} 4\n' in metrics
    assert 'greenq_resource_wait_seconds_count{resource="pg"} 0\n' in metrics
    human = env.admin("inspect", "stats", "-d", "obs", "--timeout", "1")
    assert "pg: limit 1 (configured 1, process), in use 1, waiting 4" in human.stdout, human.stdout

    # the waits must last past the 0.3 s warning threshold (the checks above may take less on a fast machine)
    time.sleep(max(0.0, all_waiting + 0.4 - time.monotonic()))
    (env.tmp / "markers" / "release").write_text("go\n")
    read = env.client(READ)
    assert read.returncode == 0, read.stderr + env.dump()
    assert json.loads(read.stdout) == ["held", 0, 1, 2, 3]
    pg = _stats(env, "obs")["resources"]["pg"]
    assert (pg["in_use"], pg["waiting"], pg["wait_count"]) == (0, 0, 4), pg
    assert pg["wait_seconds_max"] >= 0.3 and pg["wait_seconds_sum"] >= pg["wait_seconds_max"], pg
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert 'greenq_resource_wait_seconds_count{resource="pg"} 4\n' in metrics
    assert 'greenq_resource_wait_seconds_bucket{resource="pg",le="0.1"} 0\n' in metrics
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    warned = [line for line in out.splitlines() if "for a permit of pg" in line]
    assert len(warned) == 4, out                 # each waiter once
    assert sorted(line.split("resobs.query[", 1)[1].split("]")[0] for line in warned) \
        == sorted(json.loads((env.tmp / "ids.json").read_text())[1:]), warned
    assert os.path.exists(env.tmp / "markers" / "holding")
