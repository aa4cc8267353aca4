"""Autoscaling signals (issue 23, item 4; docs/autoscaling.md) with real
processes: ``greenq queues --json``, a worker's /metrics, the dashboard's
/api/queues and /metrics, the KEDA example in conf/, and
bin/greenq-autoscale-example starting burst workers from zero on lag and
ending at zero workers again."""
from __future__ import annotations

import json
import queue as queue_mod
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Callable, List

import pytest

from tests.conftest import until

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent.parent
SCRIPT = ROOT / "bin" / "greenq-autoscale-example"
KEDA = ROOT / "conf" / "keda-scaledobject.yaml"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.read().decode()


def _queue(env) -> str:
    return env.env.get("GREENQ_DEFAULT_QUEUE", "default")


class Lines:
    """A process's stdout lines, read by a thread; ``wait_for`` the first
    line from here on that matches."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.seen: List[str] = []
        self._q: "queue_mod.Queue[str]" = queue_mod.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.strip():          # blank lines (in eventlet's deprecation warning) are not the end
                self._q.put(line.rstrip("\n"))
        self._q.put("")    # end of output

    def wait_for(self, check: Callable[[str], bool], what: str, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._q.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue_mod.Empty:
                line = None
            if line:
                self.seen.append(line)
                if check(line):
                    return line
                continue
            raise AssertionError(f"never saw {what}; the script said:\n" + "\n".join(self.seen))

    def rest(self) -> None:
        """Read what is left once the process ended."""
        while True:
            line = self._q.get(timeout=30)
            if not line:
                return
            self.seen.append(line)


def reading(line: str) -> dict:
    """``t=1.4 ready=20 held=0 delayed=0 oldest=1.2 workers=0`` as a dict ({} for other lines)."""
    if not line.startswith("t="):
        return {}
    return {k: (None if v == "?" else float(v)) for k, v in (w.split("=") for w in line.split())}


# -- the signals ---------------------------------------------------------------------

def test_queues_json_and_the_workers_metrics(pool, any_env):
    """``greenq queues --json`` gives the four figures of each queue; a worker's
    /metrics gives them for its own queues as greenq_queue_* gauges.  The age
    is null (and its gauge left out) on RabbitMQ only."""
    import e2e_tasks
    env = any_env
    app = env.app()
    name = _queue(env)
    aged = env.kind != "amqp"
    results = [e2e_tasks.add.delay(i, 1) for i in range(3)]
    e2e_tasks.add.apply_async((9, 9), countdown=600)
    listing = env.admin("queues", "--json")
    assert listing.returncode == 0, listing.stderr
    [row] = [q for q in json.loads(listing.stdout)["queues"] if q["name"] == name]
    assert (row["ready"], row["held"], row["delayed"]) == (3, 0, 1), row
    if aged:
        assert isinstance(row["oldest_ready_age"], float) and 0.0 <= row["oldest_ready_age"] < 30, row
    else:
        assert row["oldest_ready_age"] is None

    port = _free_port()
    worker = env.worker(pool, "--http", f"127.0.0.1:{port}", burst=False)
    assert [r.get(timeout=30) for r in results] == [1, 2, 3]
    # a result is stored before its message is acknowledged: held drops to 0 just after
    assert until(lambda: json.loads(_get(f"http://127.0.0.1:{port}/healthz"))["held"] == 0
                 and app.broker.queue_stats([name])[0].held == 0, 20)
    metrics = _get(f"http://127.0.0.1:{port}/metrics")    # (its first scrape: read now, not cached)
    assert f'greenq_queue_ready{{queue="{name}"}} 0\n' in metrics, metrics
    assert f'greenq_queue_held{{queue="{name}"}} 0\n' in metrics
    assert f'greenq_queue_delayed{{queue="{name}"}} 1\n' in metrics
    age = f'greenq_queue_oldest_ready_age_seconds{{queue="{name}"}} 0.000\n'
    assert (age in metrics) == aged, metrics
    assert "# TYPE greenq_queue_oldest_ready_age_seconds gauge" in metrics
    worker.send_signal(signal.SIGTERM)
    out, _ = worker.communicate(timeout=30)
    assert worker.returncode == 0, out


def test_prefetched_work_shows_as_held_not_ready(pool, sqlite_env):
    """A worker of concurrency 1 and prefetch 3 running a slow task holds two
    more it has not started: the queue shows 1 ready and 3 held, and the
    worker's greenq_messages_prefetched says 2 of its 3 have not started."""
    import e2e_tasks
    env = sqlite_env
    env.app()
    env.env["GREENQ_WORKER_PREFETCH"] = "3"
    slow = e2e_tasks.slow.delay("long", 3)
    quick = [e2e_tasks.add.delay(i, 1) for i in range(3)]
    port = _free_port()
    worker = env.worker(pool, "-c", "1", "--http", f"127.0.0.1:{port}")
    env.wait_marker("long.started")
    assert until(lambda: json.loads(_get(f"http://127.0.0.1:{port}/healthz"))["held"] == 3, 20)
    metrics = _get(f"http://127.0.0.1:{port}/metrics").splitlines()
    for line in ('greenq_queue_ready{queue="default"} 1', 'greenq_queue_held{queue="default"} 3',
                 "greenq_tasks_running 1", "greenq_messages_held 3", "greenq_messages_prefetched 2"):
        assert line in metrics, (line, metrics)
    assert slow.get(timeout=30) == "long" and [r.get(timeout=30) for r in quick] == [1, 2, 3]
    out, _ = worker.communicate(timeout=30)
    assert worker.returncode == 0, out


def test_the_dashboard_serves_the_signals(sqlite_env):
    """/api/queues (what the queues panel reads) and /metrics of the dashboard,
    which lists every queue: the always-on endpoint to scale from zero on."""
    from tests.e2e.test_dashboard_browser import _start_dashboard
    import e2e_tasks
    env = sqlite_env
    env.app()
    e2e_tasks.add.delay(1, 1)
    e2e_tasks.add.delay(2, 2)
    e2e_tasks.add.apply_async((3, 3), countdown=600)
    _, base = _start_dashboard(env)
    [row] = [q for q in json.loads(_get(base + "/api/queues")) if q["name"] == "default"]
    assert (row["ready"], row["held"], row["delayed"], row["dead"]) == (2, 0, 1, 0), row
    assert isinstance(row["oldest_ready_age"], float) and 0.0 <= row["oldest_ready_age"] < 30
    metrics = _get(base + "/metrics")
    assert 'greenq_queue_ready{queue="default"} 2\n' in metrics, metrics
    assert 'greenq_queue_delayed{queue="default"} 1\n' in metrics
    assert re.search(r'^greenq_queue_oldest_ready_age_seconds\{queue="default"\} \d+\.\d{3}$', metrics, re.M)


def test_the_keda_example_scales_on_metrics_greenq_exports():
    """conf/keda-scaledobject.yaml: a ScaledObject with the Prometheus scaler,
    down to zero replicas, whose queries name only greenq_queue_* gauges
    greenq exports."""
    from greenq.metrics import QUEUE_SIGNALS
    text = KEDA.read_text()
    exported = {metric for metric, _, _ in QUEUE_SIGNALS}
    try:
        import yaml
    except ImportError:      # (not in the test environment: read the few keys by hand)
        yaml = None
    if yaml is not None:
        docs = [d for d in yaml.safe_load_all(text) if d]
        [scaled] = [d for d in docs if d["kind"] == "ScaledObject"]
        assert scaled["apiVersion"] == "keda.sh/v1alpha1"
        assert scaled["spec"]["minReplicaCount"] == 0
        triggers = scaled["spec"]["triggers"]
        assert triggers and all(t["type"] == "prometheus" for t in triggers)
        queries = [t["metadata"]["query"] for t in triggers]
    else:
        assert re.search(r"^apiVersion: keda\.sh/v1alpha1$", text, re.M)
        assert re.search(r"^kind: ScaledObject$", text, re.M)
        assert re.search(r"^  minReplicaCount: 0\b", text, re.M)
        assert re.findall(r"^    - type: (\S+)$", text, re.M) == ["prometheus", "prometheus"]
        queries = re.findall(r"^        query: (.+)$", text, re.M)
    assert len(queries) == 2
    named = {m for q in queries for m in re.findall(r"\bgreenq_\w+", q)}
    assert named and named <= exported, named - exported
    assert "greenq_queue_oldest_ready_age_seconds" in named and "greenq_queue_ready" in named


# -- scale to zero and back ------------------------------------------------------------

@pytest.mark.parametrize("any_env", ["sqlite", "redis"], indirect=True)
def test_a_worker_is_started_from_zero_when_the_lag_grows_and_ends(pool, any_env):
    """bin/greenq-autoscale-example reads ``greenq queues --watch --json``:
    zero workers while idle; tasks wait until the oldest has waited 1 s (the
    lag grows, still no worker); then one burst worker starts, runs them all
    and exits: zero again.  A second batch starts a second worker."""
    import e2e_tasks
    env = any_env
    env.app()
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--interval", "0.2", "--max-age", "1",
                             "--stop-after", "2", "-Q", "default", "--", "-A", "e2e_tasks", "--pool", pool],
                            cwd=env.tmp, env=env.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    env.procs.append(proc)
    lines = Lines(proc)
    lines.wait_for(lambda line: reading(line).get("workers") == 0 and reading(line).get("ready") == 0,
                   "an idle reading with zero workers")

    first = [e2e_tasks.add.delay(i, i) for i in range(20)]
    started = lines.wait_for(lambda line: line.startswith("start worker 1 "), "worker 1 started")
    waiting = [reading(line) for line in lines.seen if reading(line).get("ready") == 20]
    assert waiting and all(r["workers"] == 0 for r in waiting)
    ages = [r["oldest"] for r in waiting]
    assert ages == sorted(ages) and ages[-1] >= 1.0, lines.seen        # the lag grew to the threshold
    assert float(started.rsplit("oldest=", 1)[1]) >= 1.0
    assert [r.get(timeout=60) for r in first] == [2 * i for i in range(20)]
    lines.wait_for(lambda line: re.match(r"worker 1 \(pid \d+\) exited 0$", line) is not None, "worker 1 exit 0")
    lines.wait_for(lambda line: reading(line).get("workers") == 0 and reading(line).get("ready") == 0,
                   "zero workers again")

    second = [e2e_tasks.add.delay(i, 1) for i in range(5)]
    lines.wait_for(lambda line: line.startswith("start worker 2 "), "worker 2 started")
    assert [r.get(timeout=60) for r in second] == [i + 1 for i in range(5)]
    lines.wait_for(lambda line: re.match(r"worker 2 \(pid \d+\) exited 0$", line) is not None, "worker 2 exit 0")
    assert proc.wait(timeout=60) == 0                      # --stop-after 2: both ran, nothing left
    lines.rest()
    last = [reading(line) for line in lines.seen if reading(line)][-1]
    assert (last["ready"], last["held"], last["workers"]) == (0, 0, 0), lines.seen
    assert sum(line.startswith("start worker") for line in lines.seen) == 2


def test_the_script_scales_from_zero_on_the_dashboards_metrics(pool, sqlite_env):
    """The same script reading the dashboard's /metrics (``--metrics``), as an
    autoscaler reading Prometheus would: a worker starts once 5 messages are
    ready, runs them, and the script ends with zero workers."""
    from tests.e2e.test_dashboard_browser import _start_dashboard
    import e2e_tasks
    env = sqlite_env
    env.app()
    _, base = _start_dashboard(env)
    e2e_tasks.add.delay(0, 0)                 # one ready: below --min-ready
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--interval", "0.2", "--min-ready", "5",
                             "--metrics", base + "/metrics", "--stop-after", "1", "--", "-A", "e2e_tasks",
                             "--pool", pool],
                            cwd=env.tmp, env=env.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    env.procs.append(proc)
    lines = Lines(proc)
    lines.wait_for(lambda line: reading(line).get("ready") == 1, "one ready message")
    results = [e2e_tasks.add.delay(i, 1) for i in range(5)]
    started = lines.wait_for(lambda line: line.startswith("start worker 1 "), "worker 1 started", timeout=60)
    assert "ready=6" in started
    assert [r.get(timeout=60) for r in results] == [1, 2, 3, 4, 5]
    assert proc.wait(timeout=60) == 0
    lines.rest()
    before = [reading(line) for line in lines.seen[:lines.seen.index(started)] if reading(line)]
    assert all(r["workers"] == 0 for r in before) and any(r["ready"] == 1 for r in before), before
    assert any(re.match(r"worker 1 \(pid \d+\) exited 0$", line) for line in lines.seen), lines.seen
    last = [reading(line) for line in lines.seen if reading(line)][-1]
    assert (last["ready"], last["held"], last["workers"]) == (0, 0, 0), lines.seen
