"""A worker's memory with 10,000 tasks in flight (issue 22, item 4: < 150 MB
RSS under gevent, < 180 MB under eventlet), and where it goes:

    python tests/bench/inflight_memory.py [--pools gevent,eventlet] [--tasks 10000]
        [--top 10] [--frames 1] [--no-trace] [--root PATH] [--redis URL] [--json FILE]
        [--worker-env NAME=VALUE ...] [--keep]

Per pool, three runs of a real ``greenq-worker -A inflight_tasks -P POOL``
on Redis (db 13 unless ``--redis``, under a key prefix of its own, whose keys
and ``greenq:apps`` entry are deleted afterwards):

1. ``-c 10``, idle: the RSS of a worker with few runners;
2. ``-c TASKS``: the RSS once its TASKS runners have all started and wait for
   work (0 in flight), then once TASKS ``inflight.hold(600)`` tasks (a
   cooperative ``time.sleep``) all run at once, as the worker's ``/healthz``
   reports them (``running``): bytes per task in flight =
   (RSS at TASKS in flight - RSS at 0) / TASKS;
3. the same with tracemalloc started in the worker (``worker_process_init``,
   tests/bench/inflight_tasks.py), a dump asked for by SIGUSR2 at 0 and at
   TASKS in flight: the top allocation sites of the difference, by
   file:line, and the greenlets' saved C stacks (greenlet's, not greenq's).

The prefetch is left to the worker: auto is the concurrency plus a quarter
(12,500 at -c 10,000), and the default ``prefetch_bytes`` (8 x the largest
message, 8 MiB) holds 10,000 of these ~300-byte messages with room to
spare; the run checks that ``held`` reaches TASKS.  The worker is stopped
cold (SIGQUIT: its tasks go back to the queue) and the queue deleted.
``--root`` runs the worker from another checkout of greenq (the code before
a change: ``git archive COMMIT | tar -x -C /tmp/before``); the tasks module
is always this one's.  Every wait is bounded (``--timeout``, 240 s a run).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import psutil

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
REDIS = "redis://127.0.0.1:6379/13"
HOLD_SECONDS = 600          # far longer than a run: the tasks are in flight until the cold stop
MiB = 1024 * 1024


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(what: str, check: Callable[[], Any], deadline: float, proc: subprocess.Popen,
             interval: float = 0.05) -> Any:
    """``check()``'s first true value; SystemExit when the worker exits or the deadline passes."""
    while True:
        value = check()
        if value:
            return value
        if proc.poll() is not None:
            raise SystemExit(f"the worker exited ({proc.returncode}) while waiting for {what}")
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(interval)


class Run:
    """One worker process, its prefix, its files and its clean-up."""

    def __init__(self, pool: str, concurrency: int, args: argparse.Namespace, trace: bool = False) -> None:
        self.pool, self.concurrency, self.args = pool, concurrency, args
        self.tag = f"inflight{uuid.uuid4().hex[:8]}"
        self.tmp = Path(tempfile.mkdtemp(prefix=f"inflight-{pool}-"))
        self.port = free_port()
        self.ready = self.tmp / "ready"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("GREENQ_", "INFLIGHT_"))}
        self.env.update(GREENQ_BROKER_URL=args.redis, GREENQ_KEY_PREFIX=self.tag, GREENQ_DEFAULT_QUEUE=self.tag,
                        GREENQ_WORKER_QUEUES=self.tag, GREENQ_WORKER_BLOCKING_THRESHOLD="0",
                        INFLIGHT_READY=str(self.ready),
                        PYTHONPATH=os.pathsep.join([str(HERE), str(Path(args.root).resolve())]))
        self.env.update(item.split("=", 1) for item in args.worker_env)
        if trace:
            self.env.update(INFLIGHT_TRACEMALLOC=str(args.frames), INFLIGHT_DUMPS=str(self.tmp))
        self.log = open(self.tmp / "worker.log", "w")
        self.proc: Optional[subprocess.Popen] = None
        self.deadline = time.monotonic() + args.timeout

    def __enter__(self) -> "Run":
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "greenq.worker", "-A", "inflight_tasks", "-P", self.pool,
             "-c", str(self.concurrency), "--http", f"127.0.0.1:{self.port}", "-l", "INFO"],
            cwd=self.tmp, env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            self.stop()
        finally:
            self.cleanup()
            self.log.close()
            if not self.args.keep:
                shutil.rmtree(self.tmp, ignore_errors=True)

    # -- the worker ----------------------------------------------------------
    def wait_ready(self) -> None:
        """Until every runner started and waits for work (the tasks module's marker)."""
        assert self.proc is not None
        wait_for("the worker's runners", self.ready.exists, self.deadline, self.proc)

    def health(self) -> Dict[str, Any]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=5) as resp:
                return json.load(resp)
        except urllib.error.HTTPError as exc:       # 503 still carries the figures
            return json.load(exc)
        except OSError:
            return {}

    def wait_running(self, count: int) -> Dict[str, Any]:
        """Until the worker reports ``count`` tasks running (its /healthz)."""
        assert self.proc is not None
        return wait_for(f"{count} tasks running", lambda: (lambda h: h if h.get("running") == count else None)(
            self.health()), self.deadline, self.proc, interval=0.25)

    def rss(self) -> int:
        assert self.proc is not None
        return psutil.Process(self.proc.pid).memory_info().rss

    def dump(self, index: int) -> Dict[str, Any]:
        """Ask the worker for tracemalloc dump ``index`` and read it."""
        assert self.proc is not None
        path = self.tmp / f"dump-{index}.json"
        self.proc.send_signal(signal.SIGUSR2)
        wait_for(f"tracemalloc dump {index}", path.exists, self.deadline, self.proc)
        return json.loads(path.read_text())

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGQUIT)          # cold: the tasks go back to the queue
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    # -- the client side -------------------------------------------------------
    def send(self, count: int) -> None:
        """``count`` inflight.hold tasks, published in batches by a plain client process."""
        code = ("import inflight_tasks as t\n"
                f"for start in range(0, {count}, 1000):\n"
                f"    t.app.enqueue_many([t.hold.s({HOLD_SECONDS}) for _ in range(min(1000, {count} - start))])\n")
        done = subprocess.run([sys.executable, "-c", code], cwd=self.tmp, env=self.env,
                              capture_output=True, text=True, timeout=120)
        if done.returncode:
            raise SystemExit(f"client failed:\n{done.stderr}")

    def cleanup(self) -> None:
        import redis
        client = redis.Redis.from_url(self.args.redis)
        try:
            keys = list(client.scan_iter(match=f"{self.tag}*", count=1000))
            for start in range(0, len(keys), 1000):
                client.delete(*keys[start:start + 1000])
            fields = [f for f in client.hkeys("greenq:apps") if f.decode("utf-8", "replace").endswith(f" {self.tag}")]
            if fields:
                client.hdel("greenq:apps", *fields)
        finally:
            client.close()

    def tail(self) -> str:
        self.log.flush()
        return (self.tmp / "worker.log").read_text()[-3000:]


FLOOR = """
import sys
pool, n = sys.argv[1], int(sys.argv[2])
if pool == "gevent":
    from gevent import monkey
    monkey.patch_all()
    import gevent, gevent.event, gevent.queue
    spawn, queue, event = gevent.spawn, gevent.queue.Queue, gevent.event.Event
else:
    import eventlet
    eventlet.monkey_patch()
    import eventlet.event, eventlet.queue
    spawn, queue, event = eventlet.spawn, eventlet.queue.LightQueue, eventlet.event.Event
import json, time, psutil
rss = lambda: psutil.Process().memory_info().rss
q, state = queue(), {"started": 0, "running": 0}
started, running = event(), event()
def runner():
    state["started"] += 1
    if state["started"] == n:
        started.set() if pool == "gevent" else started.send()
    while True:
        q.get()()
def hold():
    state["running"] += 1
    if state["running"] == n:
        running.set() if pool == "gevent" else running.send()
    time.sleep(600)
base = rss()
for _ in range(n):
    spawn(runner)
started.wait()
time.sleep(0)
idle = rss()
for _ in range(n):
    q.put(hold)
running.wait()
time.sleep(0)
print(json.dumps({"base": base, "idle": idle, "n": rss()}))
"""


def floor(pool: str, n: int) -> Dict[str, Any]:
    """The same shape without greenq: ``n`` bare greenlets that wait on a
    queue, then each run a function that does ``time.sleep(600)``: what
    the green library and CPython cost per greenlet, idle and in flight."""
    done = subprocess.run([sys.executable, "-c", FLOOR, pool, str(n)], capture_output=True, text=True,
                          timeout=120)
    if done.returncode:
        raise SystemExit(f"floor run failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(pool: str, args: argparse.Namespace) -> Dict[str, Any]:
    n = args.tasks
    out: Dict[str, Any] = {"pool": pool, "tasks": n}
    bare = floor(pool, n)
    out["floor_per_greenlet"] = (bare["idle"] - bare["base"]) / n
    out["floor_per_task"] = (bare["n"] - bare["idle"]) / n
    with Run(pool, 10, args) as run:
        run.wait_ready()
        out["rss_idle_c10"] = run.rss()
    with Run(pool, n, args) as run:
        try:
            run.wait_ready()
            out["rss_0"] = run.rss()
            start = time.monotonic()
            run.send(n)
            health = run.wait_running(n)
            out["seconds_to_fill"] = round(time.monotonic() - start, 2)
            out["rss_n"] = run.rss()
            if health.get("held") != n:
                raise SystemExit(f"held {health.get('held')} messages, not {n}")
        except SystemExit:
            print(run.tail(), file=sys.stderr)
            raise
    out["per_task"] = (out["rss_n"] - out["rss_0"]) / n
    out["per_runner"] = (out["rss_0"] - out["rss_idle_c10"]) / (n - 10)
    if not args.no_trace:
        with Run(pool, n, args, trace=True) as run:
            try:
                run.wait_ready()
                before = run.dump(1)            # dump-0: written before the runners started
                run.send(n)
                run.wait_running(n)
                after = run.dump(2)
                init = json.loads((run.tmp / "dump-0.json").read_text())
            except SystemExit:
                print(run.tail(), file=sys.stderr)
                raise
        out["traced_0"], out["traced_n"] = before["traced"], after["traced"]
        out["greenlets_0"], out["greenlets_n"] = before["greenlets"], after["greenlets"]
        out["stack_saved_0"], out["stack_saved_n"] = before["stack_saved"], after["stack_saved"]
        out["top"] = after["top"]
        out["traced_init"], out["stack_saved_init"] = init["traced"], init["stack_saved"]
        out["top_runners"] = before["top"]
    return out


def report(r: Dict[str, Any], top: int) -> None:
    n = r["tasks"]
    print(f"{r['pool']}: RSS idle -c 10 {r['rss_idle_c10'] / MiB:.1f} MiB; -c {n}: "
          f"0 in flight {r['rss_0'] / MiB:.1f} MiB ({r['per_runner']:.0f} B per idle runner), "
          f"{n} in flight {r['rss_n'] / MiB:.1f} MiB (filled in {r['seconds_to_fill']} s): "
          f"{r['per_task']:.0f} B per task in flight")
    print(f"  without greenq ({r['pool']} alone, bare greenlets on a queue, then sleeping): "
          f"{r['floor_per_greenlet']:.0f} B per idle greenlet, {r['floor_per_task']:.0f} B more per one sleeping")
    if "top" not in r:
        return
    traced = (r["traced_n"] - r["traced_0"]) / n
    stacks = (r["stack_saved_n"] - r["stack_saved_0"]) / n
    print(f"  tracemalloc: {r['traced_0'] / MiB:.1f} -> {r['traced_n'] / MiB:.1f} MiB traced, "
          f"{traced:.0f} B per task; greenlets {r['greenlets_0']} -> {r['greenlets_n']}, saved C stacks "
          f"{r['stack_saved_0'] / MiB:.1f} -> {r['stack_saved_n'] / MiB:.1f} MiB ({stacks:.0f} B per task, "
          "greenlet's; counted by tracemalloc where greenlet copies them)")
    print(f"  {'B/task':>7} {'objs/task':>9}  site")
    for site in r["top"][:top]:
        print(f"  {site['size'] / n:7.1f} {site['count'] / n:9.2f}  {site['site']}")
    print(f"  the {n} runners, idle (traced {(r['traced_0'] - r['traced_init']) / n:.0f} B per runner, of which "
          f"saved C stacks {(r['stack_saved_0'] - r['stack_saved_init']) / n:.0f} B):")
    for site in r["top_runners"][:top]:
        print(f"  {site['size'] / n:7.1f} {site['count'] / n:9.2f}  {site['site']}")


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pools", default="gevent,eventlet")
    parser.add_argument("--tasks", type=int, default=10000, help="tasks in flight (and the concurrency)")
    parser.add_argument("--top", type=int, default=10, help="allocation sites listed")
    parser.add_argument("--frames", type=int, default=1, help="frames tracemalloc keeps per allocation")
    parser.add_argument("--no-trace", action="store_true", help="skip the tracemalloc run")
    parser.add_argument("--root", default=str(ROOT), help="greenq checkout to run the worker from")
    parser.add_argument("--redis", default=REDIS)
    parser.add_argument("--timeout", type=float, default=240.0, help="seconds one run may take")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--worker-env", action="append", default=[], metavar="NAME=VALUE",
                        help="set in the workers' environment (e.g. GEVENT_TRACK_GREENLET_TREE=0)")
    parser.add_argument("--keep", action="store_true", help="keep each run's directory (worker log, dumps)")
    args = parser.parse_args(argv)
    results = []
    for pool in args.pools.split(","):
        result = measure(pool, args)
        report(result, args.top)
        results.append(result)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
