"""One chaos run, shared by the CI-sized tests and ``bin/greenq-chaos``.

Real ``python -m greenq.worker`` processes consume a stream of
``chaos.record`` tasks sent at a steady rate over a window of seconds, while
the run kills a random worker with SIGKILL (and starts a replacement) at
random moments, and -- on Redis and RabbitMQ, where the workers reach the
server through a :class:`FaultProxy` -- resets every connection and
blackholes the path mid-run.  The client sends directly, never through the
proxy: the faults are the workers'.

Every execution appends a line to one O_APPEND file as it starts and as it
ends (chaos_tasks.py), so the figures are exact: *sent*, *completed*
(distinct ids done), *lost* (sent - completed), *duplicated* (finished
executions beyond one), *interrupted* (executions a kill cut short), the
fault each duplicate is put down to (one that struck while the task was in
flight: after it was sent, before its first completion was acknowledged) or
none, and the
time between the end of the blackhole and the first completion of a task
sent after it began (such a task cannot have been fetched before).

At the end the workers get SIGTERM, then one ``--burst`` worker connected
directly drains what came back late (a killed worker's leases), so
duplicates still in the queue are counted too.
"""
from __future__ import annotations

import math
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple
from urllib.parse import urlsplit, urlunsplit

from .fault_proxy import FaultProxy

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
SEND_INTERVAL = 0.1         # seconds between two batches of the sender
ACK_SLACK = 5.0             # seconds after a task's first completion in which its ack may still be on the way
NETWORK_BROKERS = ("redis", "amqp")


@dataclass
class Plan:
    """What one run does; the defaults are the CI size."""
    broker: str                  # sqlite, redis or amqp
    pool: str                    # gevent or eventlet
    tasks: int = 2000
    window: float = 0.0          # seconds over which tasks are sent; 0 = from the rate, at least the blackhole + 10 s
    rate: float = 100.0          # tasks sent per second when the window is derived
    workers: int = 2
    kills: int = 3
    resets: int = 1              # reset_all() calls (redis, amqp)
    blackhole: float = 20.0      # seconds (redis, amqp); 0 = none
    concurrency: int = 20
    prefetch: int = 25
    lease: float = 3.0
    pause: float = 0.3           # each task works uniform(0, pause) seconds
    seed: int = 0
    drain_timeout: float = 120.0

    @property
    def networked(self) -> bool:
        return self.broker in NETWORK_BROKERS

    def send_window(self) -> float:
        if self.window:
            return self.window
        return max((self.blackhole if self.networked else 0.0) + 10.0, self.tasks / self.rate)


@dataclass
class Figures:
    """What a run measured."""
    broker: str
    pool: str
    seed: int
    sent: int = 0
    completed: int = 0
    executions: int = 0          # executions that finished
    duplicated: int = 0          # finished executions beyond one per task
    interrupted: int = 0         # executions cut short by a kill (run again elsewhere)
    abandoned: int = 0           # started and never finished by a worker nobody killed
    unexplained: List[int] = field(default_factory=list)   # duplicated ids no fault explains
    causes: Dict[str, int] = field(default_factory=dict)   # duplicates by the fault they are put down to
    bound: int = 0                                         # the most duplicates the faults allow
    kills: int = 0
    resets: int = 0                                        # connections reset
    blackhole: float = 0.0
    resume: Optional[float] = None   # seconds from the blackhole's end to the first new completion
    leaked: int = 0                  # tasks sent during the blackhole that completed before its end
    drained: int = 0                 # executions by the final --burst worker
    left: Tuple[int, int, int, int] = (0, 0, 0, 0)         # ready, delayed, held, dead at the end
    exits: Dict[str, int] = field(default_factory=dict)    # worker -> exit code (the killed: if dead before)
    elapsed: float = 0.0

    @property
    def lost(self) -> int:
        return self.sent - self.completed

    def row(self) -> Dict[str, str]:
        resume = "-" if self.resume is None else f"{self.resume:.2f}"
        return {"broker": self.broker, "pool": self.pool, "sent": str(self.sent),
                "completed": str(self.completed), "lost": str(self.lost),
                "duplicated": str(self.duplicated),
                "by kill/reset/blackhole": "/".join(str(self.causes.get(c, 0))
                                                    for c in ("kill", "reset", "blackhole")),
                "interrupted": str(self.interrupted),
                "unexplained": str(len(self.unexplained)),
                "bound": str(self.bound), "kills": str(self.kills), "resets": str(self.resets),
                "blackhole s": f"{self.blackhole:g}", "resume s": resume,
                "left": "/".join(map(str, self.left)), "seconds": f"{self.elapsed:.0f}"}


def table(rows: List[Dict[str, str]]) -> str:
    """A Markdown table of ``Figures.row()`` dicts."""
    heads = list(rows[0])
    widths = [max(len(h), *(len(r[h]) for r in rows)) for h in heads]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(heads, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(r[h].rjust(w) for h, w in zip(heads, widths)) + " |" for r in rows]
    return "\n".join(lines)


def via_proxy(url: str, port: int) -> str:
    """``url`` with its host and port replaced by 127.0.0.1:``port``."""
    parts = urlsplit(url)
    auth = parts.netloc.rpartition("@")[0]
    netloc = f"{auth}@127.0.0.1:{port}" if auth else f"127.0.0.1:{port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


class Workers:
    """The run's worker processes: started, killed at random, stopped."""

    def __init__(self, plan: Plan, workdir: Path, env: Mapping[str, str]) -> None:
        self.plan = plan
        self.workdir = workdir
        self.env = dict(env)
        self.live: List[subprocess.Popen] = []
        self.killed: List[Tuple[int, float]] = []    # (pid, time of the kill)
        self.died: Dict[str, int] = {}               # log name -> exit code of one dead before its kill
        self.logs: List[Path] = []

    def start(self, *extra: str, env: Optional[Mapping[str, str]] = None) -> subprocess.Popen:
        log = self.workdir / f"worker-{len(self.logs)}.log"
        self.logs.append(log)
        cmd = [sys.executable, "-m", "greenq.worker", "-A", "chaos_tasks", "--pool", self.plan.pool,
               "-c", str(self.plan.concurrency), "--prefetch", str(self.plan.prefetch), *extra]
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, cwd=self.workdir, env=dict(env or self.env), stdout=out,
                                    stderr=subprocess.STDOUT)
        proc.log = log  # type: ignore[attr-defined]
        return proc

    def start_all(self) -> None:
        self.live = [self.start() for _ in range(self.plan.workers)]

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Until every live worker has logged that it is ready (connected and
        consuming), so the first faults find them at work."""
        deadline = time.monotonic() + timeout
        while not all(b"worker ready" in proc.log.read_bytes() for proc in self.live):
            if time.monotonic() > deadline:
                raise RuntimeError(f"workers not ready after {timeout:.0f} s:\n{self.tails()}")
            time.sleep(0.1)

    def kill_one(self, rng: random.Random) -> int:
        """SIGKILL a random worker and start its replacement (last in ``live``);
        returns the killed pid."""
        victim = rng.choice(self.live)
        if victim.poll() is not None:
            self.died[victim.log.name] = victim.returncode
        victim.send_signal(signal.SIGKILL)
        self.killed.append((victim.pid, time.time()))
        victim.wait()
        self.live.remove(victim)
        self.live.append(self.start())
        return victim.pid

    def stop_all(self, timeout: float = 60.0) -> Dict[str, int]:
        """SIGTERM every live worker; their exit codes by log name."""
        for proc in self.live:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        codes = {}
        for proc in self.live:
            try:
                codes[proc.log.name] = proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                codes[proc.log.name] = proc.wait()
        return codes

    def kill_all(self) -> None:
        for proc in self.live:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    def tails(self, lines: int = 30) -> str:
        """The last lines each worker printed, for a failure message."""
        parts = []
        for log in self.logs:
            text = log.read_text(errors="replace").splitlines() if log.exists() else []
            parts.append(f"--- {log.name}\n" + "\n".join(text[-lines:]))
        return "\n".join(parts)


class Ledger:
    """The executions recorded in the O_APPEND file, read incrementally."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.runs: Dict[int, List[Tuple[float, int]]] = {}    # n -> [(time done, pid)]
        self.open: Dict[Tuple[int, int], float] = {}          # (n, pid) started, not done -> start
        self._offset = 0

    def read(self) -> int:
        """Read new complete lines; returns the number of distinct ids done."""
        if self.path.exists():
            with open(self.path, "rb") as fh:
                fh.seek(self._offset)
                data = fh.read()
            end = data.rfind(b"\n") + 1
            self._offset += end
            for line in data[:end].splitlines():
                event, n, pid, at = line.split()
                key = (int(n), int(pid))
                if event == b"s":
                    self.open[key] = float(at)
                else:
                    self.open.pop(key, None)
                    self.runs.setdefault(key[0], []).append((float(at), key[1]))
        return len(self.runs)

    def executions(self) -> int:
        return sum(len(v) for v in self.runs.values())


class Run:
    """One chaos run against ``direct_url``; ``settings`` are ``[greenq]``
    keys both sides share (a Redis key prefix)."""

    def __init__(self, plan: Plan, workdir: Path, direct_url: str,
                 settings: Optional[Mapping[str, str]] = None) -> None:
        self.plan = plan
        self.workdir = workdir
        self.direct_url = direct_url
        self.queue = f"chaos-{uuid.uuid4().hex[:8]}"
        self.settings = {"default_queue": self.queue, "lease_seconds": str(plan.lease), **(settings or {})}
        self.rng = random.Random(plan.seed)                 # the fault schedule and victims
        self.pauses = random.Random(plan.seed + 1)          # the tasks' pauses (sender thread)
        self.timeline: List[str] = []                       # what the run did, when
        self.ledger = Ledger(workdir / "executions.log")
        self.proxy: Optional[FaultProxy] = None
        self.sent_at: List[float] = []          # time each task n was handed to the broker
        self.faults: List[Tuple[float, float, str]] = []   # network faults: (start, end, kind)
        self.blackhole_from: Optional[float] = None
        self.send_error: Optional[BaseException] = None
        self.workers: Optional[Workers] = None
        self.drain_exit: Optional[int] = None

    # -- set-up ------------------------------------------------------------------
    def _client(self):
        from greenq import GreenQ
        from greenq.config import load
        pairs = {("greenq", k): v for k, v in self.settings.items()}
        pairs[("greenq", "broker_url")] = self.direct_url
        return GreenQ("chaos-client", config=load(search=False, env={}, overrides=pairs))

    def _env(self, url: str) -> Dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("GREENQ_") or k.startswith("GREENQ_TEST_")}
        env.update({f"GREENQ_{k.upper()}": v for k, v in self.settings.items()})
        env.update({
            "GREENQ_BROKER_URL": url,
            "GREENQ_WORKER_QUEUES": self.queue,
            "GREENQ_WORKER_LOGLEVEL": "INFO",
            "GREENQ_WORKER_BLOCKING_THRESHOLD": "0",
            "GREENQ_WORKER_SHUTDOWN_TIMEOUT": "10",
            "CHAOS_LOG": str(self.ledger.path),
            "PYTHONPATH": os.pathsep.join([str(HERE), str(ROOT)]),
        })
        return env

    # -- the run -------------------------------------------------------------------
    def execute(self) -> Figures:
        """Run the scenario; returns the figures (the caller asserts on them)."""
        plan = self.plan
        began = time.time()
        worker_url = self.direct_url
        if plan.networked:
            parts = urlsplit(self.direct_url)
            self.proxy = FaultProxy(parts.hostname or "127.0.0.1", parts.port or
                                    {"redis": 6379, "amqp": 5672}[plan.broker])
            worker_url = via_proxy(self.direct_url, self.proxy.port)
        client = self._client()
        try:
            client.broker.declare([self.queue])
            self.workers = Workers(plan, self.workdir, self._env(worker_url))
            self.workers.start_all()
            self.workers.wait_ready()
            sender = threading.Thread(target=self._send, args=(client,), daemon=True)
            start = time.monotonic()
            sender.start()
            self._inject_faults(start)
            sender.join()
            if self.send_error is not None:
                raise RuntimeError(f"sending failed: {self.send_error!r}")
            self._note(f"sent {len(self.sent_at)}")
            if self.proxy is not None and self.proxy.resumed_at:
                self._note("blackhole over", self.proxy.resumed_at)
            self._wait_completed()
            self._note(f"{len(self.ledger.runs)} completed; SIGTERM to the workers")
            exits = self.workers.stop_all()
            self._note(f"workers exited {exits}; draining with --burst")
            drained = self._drain()
            self._note(f"drain worker exited {self.drain_exit} after {drained} executions")
            left = client.broker.queue_stats([self.queue])[0]
            figures = self._figures(exits, drained, (left.ready, left.delayed, left.held, left.dead))
        finally:
            if self.workers is not None:
                self.workers.kill_all()
            if self.proxy is not None:
                self.proxy.close()
            client.close()
        figures.elapsed = time.time() - began
        return figures

    def _schedule(self) -> List[Tuple[float, str]]:
        """(seconds after the start, fault) for every fault of the run.  Kills
        land anywhere in the window, except the first, which lands outside
        the blackhole: a kill inside one mostly finds idle workers (their
        prefetched tasks are done and nothing new can arrive)."""
        w = self.plan.send_window()
        events: List[Tuple[float, str]] = []
        hole = (0.0, 0.0)
        if self.plan.networked:
            events += [(self.rng.uniform(0.05 * w, 0.15 * w), "reset") for _ in range(self.plan.resets)]
            if self.plan.blackhole:
                latest = max(0.15 * w, w - self.plan.blackhole - 3.0)
                begins = self.rng.uniform(0.15 * w, min(0.3 * w, latest))
                hole = (begins, begins + self.plan.blackhole)
                events.append((begins, "blackhole"))
        for i in range(self.plan.kills):
            at = self.rng.uniform(0.05 * w, 0.95 * w)
            while i == 0 and hole[0] <= at <= hole[1]:
                at = self.rng.uniform(0.05 * w, 0.95 * w)
            events.append((at, "kill"))
        return sorted(events)

    def _inject_faults(self, start: float) -> None:
        assert self.workers is not None
        schedule = self._schedule()
        self._note(f"start; schedule {', '.join(f'{fault}@{offset:.1f}s' for offset, fault in schedule)}")
        for offset, fault in schedule:
            delay = start + offset - time.monotonic()
            if delay > 0:
                time.sleep(delay)     # the fault's moment: a schedule, not a synchronisation
            at = time.time()
            if fault == "kill":
                pid = self.workers.kill_one(self.rng)
                self._note(f"kill -9 {pid}, replaced by {self.workers.live[-1].pid}", at)
            elif fault == "reset":
                count = self.proxy.reset_all()
                retry_until = time.monotonic() + 5.0
                while count == 0 and time.monotonic() < retry_until:
                    time.sleep(0.1)            # every worker just killed, none connected again yet: wait for one
                    at = time.time()
                    count = self.proxy.reset_all()
                self.faults.append((at, at, "reset"))
                self._note(f"reset {count} connections", at)
            else:
                self.proxy.blackhole(self.plan.blackhole)
                self.blackhole_from = time.time()
                self.faults.append((at, at + self.plan.blackhole, "blackhole"))
                self._note(f"blackhole {self.plan.blackhole:g} s", at)

    def _note(self, what: str, at: Optional[float] = None) -> None:
        at = time.time() if at is None else at
        self.timeline.append(f"{time.strftime('%H:%M:%S', time.gmtime(at))}.{int(at % 1 * 1000):03d} {what}")

    def _send(self, client) -> None:
        """Send ``plan.tasks`` tasks in batches, evenly over the window."""
        from greenq.task import Signature
        try:
            plan = self.plan
            batches = max(1, int(plan.send_window() / SEND_INTERVAL))
            size = math.ceil(plan.tasks / batches)
            start = time.monotonic()
            for i in range(batches):
                first = len(self.sent_at)
                count = min(size, plan.tasks - first)
                if count <= 0:
                    break
                delay = start + i * SEND_INTERVAL - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                at = time.time()
                client.enqueue_many([
                    Signature("chaos.record", (n, round(self.pauses.uniform(0, plan.pause), 4)),
                              options={"ignore_result": True})
                    for n in range(first, first + count)])
                self.sent_at.extend([at] * count)
        except BaseException as exc:  # reported by execute()
            self.send_error = exc

    def _wait_completed(self) -> None:
        deadline = time.monotonic() + self.plan.drain_timeout
        while self.ledger.read() < len(self.sent_at) and time.monotonic() < deadline:
            time.sleep(0.2)

    def _drain(self) -> int:
        """Run one --burst worker on the direct URL; returns how many executions it added."""
        assert self.workers is not None
        self.ledger.read()
        before = self.ledger.executions()
        proc = self.workers.start("--burst", env=self._env(self.direct_url))
        try:
            code = proc.wait(self.plan.drain_timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        self.drain_exit = code
        self.ledger.read()
        return self.ledger.executions() - before

    # -- figures -------------------------------------------------------------------
    def _figures(self, exits: Dict[str, int], drained: int, left: Tuple[int, int, int, int]) -> Figures:
        plan = self.plan
        assert self.workers is not None
        self.ledger.read()
        runs = self.ledger.runs
        f = Figures(plan.broker, plan.pool, plan.seed, sent=len(self.sent_at),
                    completed=len([n for n in runs if n < len(self.sent_at)]),
                    executions=self.ledger.executions(), kills=len(self.workers.killed),
                    resets=self.proxy.resets if self.proxy else 0,
                    blackhole=plan.blackhole if plan.networked else 0.0,
                    drained=drained, left=left,
                    exits=dict(exits, **self.workers.died, drain=self.drain_exit))
        f.duplicated = f.executions - len(runs)
        killed = {pid for pid, _ in self.workers.killed}
        f.interrupted = sum(1 for _, pid in self.ledger.open if pid in killed)
        f.abandoned = len(self.ledger.open) - f.interrupted
        network_faults = len(self.faults)
        f.bound = plan.prefetch * (f.kills + plan.workers * network_faults)
        for n, execs in runs.items():
            if len(execs) > 1:
                cause = self._cause(self.sent_at[n] if n < len(self.sent_at) else 0.0, min(execs)[0])
                f.causes[cause] = f.causes.get(cause, 0) + len(execs) - 1
                if cause == "none":
                    f.unexplained.append(n)
        f.unexplained.sort()
        if self.blackhole_from is not None and self.proxy is not None and self.proxy.resumed_at:
            resumed = self.proxy.resumed_at
            after = [min(runs[n])[0] for n, at in enumerate(self.sent_at)
                     if at >= self.blackhole_from and n in runs]
            if after:
                f.resume = max(0.0, min(after) - resumed)
                f.leaked = sum(1 for t in after if t < resumed)
        return f

    def _cause(self, sent: float, done: float) -> str:
        """The fault a duplicate is put down to: one that struck while the
        task was in flight -- after it was sent and before its first
        completion was acknowledged (``done`` + ACK_SLACK) -- the one nearest
        to ``done``; ``none`` when no fault struck in that span."""
        assert self.workers is not None
        spans = [(at, at, "kill") for _, at in self.workers.killed] + list(self.faults)
        near = [(max(start - done, done - end, 0.0), kind) for start, end, kind in spans
                if end >= sent and start <= done + ACK_SLACK]
        return min(near)[1] if near else "none"
