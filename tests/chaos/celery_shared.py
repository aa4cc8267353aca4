"""A Celery queue shared by Celery and greenq workers under kill -9, shared
by tests/chaos/test_celery_shared_queue.py (CI size) and
``bin/greenq-celery-shared`` (full size).  docs/celery.md, "Sharing a queue
under failure".

A real Celery client process sends ``shared.record`` tasks (task id
``shared-<n>``) at a steady rate to one queue listed in greenq's
``celery_queues``; real ``celery worker`` processes (celery_shared_celery.py:
``task_acks_late``, ``task_reject_on_worker_lost``, prefetch multiplier 1) and
real greenq workers (celery_shared_greenq.py) consume it at the same time.
Once a quarter of the tasks ran, one greenq worker gets SIGKILL (at a moment it
holds tasks); once half ran, one Celery worker does (its whole process group:
with the prefork pool, its children too); each is replaced at once.  The run waits until every task
ran and nothing is left on the queue's lists or in kombu's ``unacked``, then
stops the workers with SIGTERM.

Each victim is stopped (SIGSTOP) at a moment it holds tasks, what it holds is
read, and it is killed (SIGKILL) -- frozen in between, so what was read is
what it held when it died: for a greenq
worker, the ``unacked`` entries whose greenq holder key names its pid; for a
Celery worker, every ``unacked`` entry no live greenq worker holds (an upper
bound, exact with one Celery worker).  Those are the tasks in flight on the
killed workers: the only ones that may run twice (at-least-once: one that
ran to its end but was not yet acknowledged runs again).

The run needs a Redis database of its own: kombu's ``unacked_index`` is one
per database and both kinds of worker restore *every* entry of it older than
their visibility timeout, so workers with a short one (10 s here) would hand
out what other apps' workers on the same database hold.  Callers give it a
private ``redis-server`` (:func:`private_redis`).
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent

SEND = r"""
import json, os, random, sys, time
from celery import Celery
url, queue, n, rate, pause, seed = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), \
    float(sys.argv[5]), int(sys.argv[6])
app = Celery("celery-shared-client", broker=url)
app.conf.broker_transport_options = {"visibility_timeout": float(os.environ["SHARED_VT"])}
rng = random.Random(seed)
start, sent, step = time.monotonic(), 0, 0.1
with app.producer_or_acquire() as producer:
    while sent < n:
        due = min(n, int((time.monotonic() - start) / step + 1) * max(1, int(rate * step)))
        while sent < due:
            app.send_task("shared.record", args=[sent, round(rng.uniform(0, pause), 3)], queue=queue,
                          task_id=f"shared-{sent}", producer=producer)
            sent += 1
        time.sleep(max(0.0, start + (sent / rate) - time.monotonic()))
print(json.dumps({"sent": sent, "seconds": time.monotonic() - start}), flush=True)
"""


@dataclass
class SharedPlan:
    """What one run does; the defaults are the CI size."""
    tasks: int = 1000
    rate: float = 100.0              # tasks sent per second
    greenq_workers: int = 1
    celery_workers: int = 1
    celery_pool: str = "gevent"      # or prefork
    concurrency: int = 10            # of every worker, both kinds
    prefetch: int = 12               # greenq's; Celery holds its concurrency (prefetch multiplier 1)
    lease: float = 3.0               # greenq's lease_seconds
    visibility_timeout: float = 10.0  # kombu's, on both sides
    pause: float = 0.5               # each task sleeps uniform(0, pause) s
    kills: str = "greenq,celery"     # which kinds get their kill -9 (the first at 1/4, the second at 1/2)
    seed: int = 0
    timeout: float = 120.0           # seconds to wait for the last task once all are sent
    broker: str = "redis"            # or amqp (RabbitMQ: a vhost of the run's own, private_vhost)


@dataclass
class SharedFigures:
    sent: int = 0
    run: int = 0                     # distinct tasks that ran to their end
    executions: int = 0              # executions that ran to their end
    interrupted: int = 0             # executions begun and never finished (cut short by a kill)
    by: Dict[str, int] = field(default_factory=dict)       # executions by kind of worker
    held: Dict[str, int] = field(default_factory=dict)     # tasks in flight on each victim at its kill
    unexplained: List[int] = field(default_factory=list)   # duplicated ids not in flight on a victim
    missing: List[int] = field(default_factory=list)       # ids that never ran to their end
    never_started: List[int] = field(default_factory=list)  # of those, the ones no worker began
    left: int = 0                    # messages on the lists or in unacked at the end
    dead: int = 0                    # greenq's dead letters
    exits: Dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def lost(self) -> int:
        return self.sent - self.run

    @property
    def duplicated(self) -> int:
        return self.executions - self.run

    @property
    def in_flight(self) -> int:
        return sum(self.held.values())

    def row(self) -> Dict[str, str]:
        return {"sent": str(self.sent), "run": str(self.run), "lost": str(self.lost),
                "duplicated": str(self.duplicated), "unexplained": str(len(self.unexplained)),
                "in flight on the killed (greenq/Celery)": f"{self.held.get('greenq', 0)}/"
                                                           f"{self.held.get('celery', 0)}",
                "interrupted": str(self.interrupted),
                "ran on greenq/Celery": f"{self.by.get('greenq', 0)}/{self.by.get('celery', 0)}",
                "left": str(self.left), "seconds": f"{self.seconds:.0f}"}


@contextlib.contextmanager
def private_vhost(host: str = "127.0.0.1", port: int = 5672, user: str = "guest",
                  password: str = "guest") -> Iterator[str]:
    """A RabbitMQ vhost of the run's own (its URL; made and deleted with
    rabbitmqctl): the run's queue, exchange and nothing else's."""
    vhost = f"greenq-celery-shared-{uuid.uuid4().hex[:8]}"

    def ctl(*args: str) -> None:
        subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=120)
    ctl("add_vhost", vhost)
    try:
        ctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")
        yield f"amqp://{user}:{password}@{host}:{port}/{vhost}"
    finally:
        ctl("delete_vhost", vhost)


@contextlib.contextmanager
def private_redis() -> Iterator[str]:
    """A redis-server of the run's own on a free port (its URL), killed afterwards."""
    from tests.clusters.servers import REDIS_SERVER, Servers, free_ports
    if REDIS_SERVER is None:
        raise RuntimeError("redis-server is not installed: the shared-queue run needs a private one")
    servers = Servers()
    try:
        [port] = free_ports(1)
        servers.start(port)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        servers.stop()


def celery_python() -> str:
    """The interpreter with Celery: $GREENQ_TEST_CELERY_PYTHON when set, else this one."""
    import importlib.util
    other = os.environ.get("GREENQ_TEST_CELERY_PYTHON")
    if other:
        return other
    if importlib.util.find_spec("celery") is not None:
        return sys.executable
    raise RuntimeError("Celery is not installed (pip install -e '.[test]', or set GREENQ_TEST_CELERY_PYTHON)")


class SharedRun:
    """One run against the private Redis at ``url`` (the ledger, and the
    broker unless ``broker_url``, a RabbitMQ vhost of the run's own, is
    given); logs in ``workdir``.

    On RabbitMQ nothing like kombu's ``unacked`` says who holds what: a
    victim's tasks in flight are what its process group is running at its
    kill (``<key>:active:<group>``, recorded by the tasks), and a duplicate is
    explained when the process group that began the task first is a killed
    one (``<key>:first``).  A killed consumer's unacknowledged messages,
    running or prefetched, come back at once when RabbitMQ sees its
    connection close, for both kinds of worker."""

    def __init__(self, plan: SharedPlan, workdir: Path, url: str, python: Optional[str] = None,
                 broker_url: Optional[str] = None) -> None:
        import redis
        self.plan, self.workdir, self.url = plan, workdir, url
        self.broker_url = broker_url or url
        self.amqp = self.broker_url.startswith(("amqp://", "pyamqp://"))
        self._channel = None
        self.python = python or celery_python()
        tag = uuid.uuid4().hex[:8]
        self.queue = f"shared-{tag}"
        self.prefix = f"gqshared-{tag}"
        self.key = f"{self.prefix}:ledger"
        self.rng = random.Random(plan.seed)
        self.redis = redis.Redis.from_url(url)
        self.procs: Dict[str, List[subprocess.Popen]] = {"greenq": [], "celery": []}
        self.logs: List[Path] = []
        self.killed: Dict[str, Dict[str, int]] = {}   # kind -> what its victim held (tag -> n)
        self.killed_groups: List[int] = []
        self.timeline: List[str] = []
        self._last = (-1, 0.0)                # (tasks done, when that figure last changed)

    # -- processes -----------------------------------------------------------------
    def _env(self) -> Dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("GREENQ_", "CELERY_")) or k.startswith("GREENQ_TEST_")}
        env.update(SHARED_REDIS_URL=self.url, SHARED_BROKER_URL=self.broker_url, SHARED_KEY=self.key,
                   SHARED_VT=f"{self.plan.visibility_timeout:g}",
                   SHARED_CONCURRENCY=str(self.plan.concurrency), PYTHONUNBUFFERED="1")
        return env

    def start(self, kind: str) -> subprocess.Popen:
        log = self.workdir / f"{kind}-{len(self.logs)}.log"
        self.logs.append(log)
        env = self._env()
        c = str(self.plan.concurrency)
        if kind == "greenq":
            if self.amqp:     # the tasks store no result; a backend that needs nothing of the vhost
                env["GREENQ_RESULT_BACKEND"] = self.url
            env.update(GREENQ_BROKER_URL=self.broker_url, GREENQ_KEY_PREFIX=self.prefix,
                       GREENQ_CELERY_QUEUES=self.queue, GREENQ_WORKER_QUEUES=self.queue,
                       GREENQ_DEFAULT_QUEUE=self.queue,
                       GREENQ_CELERY_VISIBILITY_TIMEOUT=f"{self.plan.visibility_timeout:g}",
                       GREENQ_LEASE_SECONDS=f"{self.plan.lease:g}", GREENQ_WORKER_LOGLEVEL="INFO",
                       GREENQ_WORKER_BLOCKING_THRESHOLD="0", GREENQ_WORKER_SHUTDOWN_TIMEOUT="10",
                       PYTHONPATH=os.pathsep.join([str(HERE), str(ROOT)]))
            cmd = [sys.executable, "-m", "greenq.worker", "-A", "celery_shared_greenq", "--pool", "gevent",
                   "-c", c, "--prefetch", str(self.plan.prefetch)]
        else:
            env["PYTHONPATH"] = str(HERE)
            cmd = [self.python, "-m", "celery", "-A", "celery_shared_celery", "worker", "-P",
                   self.plan.celery_pool, "-c", c, "-Q", self.queue, "-n", f"shared{len(self.logs)}@%h",
                   "--without-heartbeat", "--without-gossip", "--without-mingle", "-l", "INFO"]
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, cwd=HERE, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        proc.log = log  # type: ignore[attr-defined]
        self.procs[kind].append(proc)
        return proc

    def wait_ready(self, procs: List[subprocess.Popen], timeout: float = 60.0) -> None:
        marks = {"greenq": b"worker ready", "celery": b" ready."}
        deadline = time.monotonic() + timeout
        for kind in ("greenq", "celery"):
            for proc in procs:
                if proc not in self.procs[kind]:
                    continue
                while marks[kind] not in proc.log.read_bytes():
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"{kind} worker not ready:\n{self.tails()}")
                    time.sleep(0.05)

    def kill(self, kind: str, after: int, budget: float) -> int:
        """Once ``after`` tasks ran and a random live worker of ``kind`` holds
        tasks, SIGKILL it (its process group), read what it held, start its
        replacement; returns how many tasks it held."""
        victim = self.rng.choice([p for p in self.procs[kind] if p.poll() is None])
        held: Dict[str, int] = {}

        def caught() -> bool:
            """SIGSTOP it (its session, ours: start_new_session), read what it
            holds: frozen, it can take or settle nothing more; go on if nothing."""
            nonlocal held
            if self.done() < after:
                return False
            os.killpg(victim.pid, signal.SIGSTOP)
            held = self.held_by(kind, victim.pid)
            if not held:
                os.killpg(victim.pid, signal.SIGCONT)
            return bool(held)
        self._until(caught, budget, f"{after} tasks run and the {kind} worker {victim.pid} holding some")
        os.killpg(victim.pid, signal.SIGKILL)      # the moment it was stopped is the moment it died
        victim.wait()
        self.killed[kind] = held
        self.killed_groups.append(victim.pid)
        self.procs[kind].remove(victim)
        self.note(f"kill -9 {kind} worker {victim.pid}: it held {len(held)} task(s)")
        self.wait_ready([self.start(kind)])
        self.note(f"{kind} replacement ready")
        return len(held)

    def held_by(self, kind: str, pid: int) -> Dict[str, int]:
        """Delivery tag -> task number of the entries of kombu's ``unacked``
        held by the greenq worker ``pid`` (``kind`` greenq), or held by no
        greenq worker, live or killed (``kind`` celery).  On RabbitMQ: tag ->
        task number of what the worker's process group is running."""
        if self.amqp:
            return {k.decode(): int(k) for k in self.redis.hkeys(f"{self.key}:active:{pid}")}
        unacked = self.redis.hgetall("unacked")
        holders = {}
        for key in self.redis.scan_iter(match=f"{self.prefix}:celery:held:*", count=1000):
            holders[key.decode().rpartition(":held:")[2]] = (self.redis.get(key) or b"").decode()
        greenq_killed = self.killed.get("greenq", {})     # their holder keys expire with the lease
        out = {}
        for tag, raw in unacked.items():
            name = tag.decode()
            holder = holders.get(name)
            if kind == "greenq":
                mine = holder is not None and f":{pid}:" in holder
            else:
                mine = holder is None and name not in greenq_killed
            if mine:
                task_id = json.loads(raw)[0]["headers"]["id"]
                out[name] = int(task_id.rpartition("-")[2])
        return out

    def state(self) -> str:
        """What is left in the broker, for a failure message."""
        if self.amqp:
            return f"done {self.done()}; ready on the queue {self.pending()}"
        from greenq.transports.redis.celery_broker import list_keys
        now = time.time()
        lists = ", ".join(f"{k!r}: {self.redis.llen(k)}" for k in list_keys(self.queue))
        lines = [f"done {self.done()}; lists {lists}"]
        for tag, raw in list(self.redis.hgetall("unacked").items())[:20]:
            payload, exchange, routing_key = json.loads(raw)
            score = self.redis.zscore("unacked_index", tag)
            holder = self.redis.get(f"{self.prefix}:celery:held:{tag.decode()}")
            lines.append(f"unacked {tag.decode()} {payload['headers'].get('id')} exchange={exchange!r} "
                         f"rk={routing_key!r} score=now{'' if score is None else f'{score - now:+.1f}'} "
                         f"holder={holder!r}")
        lines.append(f"bindings {self.redis.smembers(f'_kombu.binding.{self.queue}')!r}")
        return "\n".join(lines)

    def tails(self, lines: int = 25) -> str:
        parts = []
        for log in self.logs:
            text = log.read_text(errors="replace").splitlines() if log.exists() else []
            parts.append(f"--- {log.name}\n" + "\n".join(text[-lines:]))
        return "\n".join(parts)

    def note(self, what: str) -> None:
        self.timeline.append(f"{time.strftime('%H:%M:%S')} {what}")

    # -- the run -------------------------------------------------------------------
    def done(self) -> int:
        return self.redis.hlen(f"{self.key}:runs")

    def settled(self, sent: int) -> bool:
        """Every task ran and nothing is left; or nothing is left anywhere a
        task could come back from (the lists, kombu's unacked) and no task
        ended for 2 s: what did not run by then is lost."""
        done, pending, now = self.done(), self.pending(), time.monotonic()
        if pending or done != self._last[0]:
            self._last = (done, now)
            return False
        if self.amqp and (done >= sent or now - self._last[1] > 5.0) and self._held() > 0:
            self._last = (done, time.monotonic())     # copies the live workers took (a killed worker's, back)
            return False
        return done >= sent or now - self._last[1] > (5.0 if self.amqp else 2.0)

    def _held(self) -> int:
        """RabbitMQ: the queue's messages ready and unacknowledged (rabbitmqctl:
        the protocol tells the ready ones only), -1 when it cannot say."""
        from urllib.parse import unquote, urlsplit
        vhost = unquote(urlsplit(self.broker_url).path[1:]) or "/"
        try:
            out = subprocess.run(["rabbitmqctl", "list_queues", "-p", vhost, "--no-table-headers", "-q",
                                  "name", "messages"], capture_output=True, text=True, timeout=60, check=True).stdout
        except (OSError, subprocess.SubprocessError):
            return -1
        for line in out.splitlines():
            name, _, count = line.strip().partition("\t")
            if name == self.queue:
                return int(count)
        return 0

    def pending(self) -> int:
        """Messages on the queue's lists and in kombu's unacked (Redis); on
        RabbitMQ the messages ready on the queue (the held ones are not
        counted: once the workers stopped, every one is ready)."""
        if self.amqp:
            return self._ready()
        from greenq.transports.redis.celery_broker import list_keys
        pipe = self.redis.pipeline(transaction=False)
        for key in list_keys(self.queue):
            pipe.llen(key)
        pipe.hlen("unacked")
        return sum(pipe.execute())

    def _ready(self) -> int:
        import amqp
        from greenq.transports.amqp.common import connection_params
        for attempt in (0, 1):
            try:
                if self._channel is None:
                    conn = amqp.Connection(**connection_params(self.broker_url))
                    conn.connect()
                    self._channel = conn.channel()
                return int(self._channel.queue_declare(self.queue, passive=True).message_count)
            except amqp.exceptions.NotFound:
                self._channel = None
                return 0          # not declared yet
            except (OSError, amqp.exceptions.AMQPError):
                self._channel = None
                if attempt:
                    raise
        return 0

    def _dead(self) -> int:
        """greenq's dead letters: its stream on Redis, its queue ``<prefix>.dlq`` on RabbitMQ."""
        if not self.amqp:
            return self.redis.xlen(f"{self.prefix}:dead") if self.redis.exists(f"{self.prefix}:dead") else 0
        import amqp
        from greenq.transports.amqp.common import connection_params
        conn = amqp.Connection(**connection_params(self.broker_url))
        conn.connect()
        try:
            return int(conn.channel().queue_declare(f"{self.prefix}.dlq", passive=True).message_count)
        except amqp.exceptions.NotFound:
            return 0
        finally:
            try:
                conn.close()
            except Exception:
                pass

    def _close_channel(self) -> None:
        if self._channel is not None:
            try:
                self._channel.connection.close()
            except Exception:
                pass
            self._channel = None

    def _until(self, check, timeout: float, what: str, fail: bool = True) -> bool:
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline:
                if not fail:
                    self.note(f"timed out after {timeout:g} s waiting for {what}\n{self.state()}")
                    return False
                raise RuntimeError(f"timed out after {timeout:g} s waiting for {what}\n{self.state()}\n"
                                   + "\n".join(self.timeline) + "\n" + self.tails())
            time.sleep(0.05)
        return True

    def execute(self) -> SharedFigures:
        plan, began = self.plan, time.time()
        sender: Optional[subprocess.Popen] = None
        try:
            first = [self.start("greenq") for _ in range(plan.greenq_workers)]
            first += [self.start("celery") for _ in range(plan.celery_workers)]
            self.wait_ready(first)
            self.note("workers ready; sending")
            sender = subprocess.Popen(
                [self.python, "-c", SEND, self.broker_url, self.queue, str(plan.tasks), str(plan.rate), str(plan.pause),
                 str(plan.seed)], env=self._env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            send_budget = plan.tasks / plan.rate + 60
            for i, kind in enumerate(k for k in plan.kills.split(",") if k):
                self.kill(kind, plan.tasks * (i + 1) // 4, send_budget)
            out, err = sender.communicate(timeout=send_budget)
            if sender.returncode != 0:
                raise RuntimeError(f"the Celery client failed:\n{err[-2000:]}")
            sent = json.loads(out.splitlines()[-1])["sent"]
            self.note(f"sent {sent}")
            # every task ran, and what the killed held came back and ran (a greenq
            # worker's when its lease ran out, a Celery worker's after the visibility timeout)
            if self._until(lambda: self.settled(sent), plan.timeout,
                           "every task to run and the queue to empty", fail=False):
                self.note(f"{self.done()} ran, nothing left; SIGTERM to the workers")
            exits = self.stop_all()
            figures = self.figures(sent, exits)
        finally:
            if sender is not None and sender.poll() is None:
                sender.kill()
                sender.wait()
            self.kill_all()
            self._close_channel()
            self.redis.close()
        figures.seconds = time.time() - began
        return figures

    def stop_all(self, timeout: float = 60.0) -> Dict[str, int]:
        live = [(kind, p) for kind, procs in self.procs.items() for p in procs]
        for _, proc in live:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        exits = {}
        for kind, proc in live:
            try:
                exits[proc.log.name] = proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                exits[proc.log.name] = proc.wait()
        return exits

    def kill_all(self) -> None:
        for procs in self.procs.values():
            for proc in procs:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()

    def figures(self, sent: int, exits: Dict[str, int]) -> SharedFigures:
        runs = {int(k): int(v) for k, v in self.redis.hgetall(f"{self.key}:runs").items()}
        starts = sum(int(v) for v in self.redis.hvals(f"{self.key}:starts"))
        f = SharedFigures(sent=sent, run=len([n for n in runs if n < sent]), executions=sum(runs.values()),
                          by={k.decode(): int(v) for k, v in self.redis.hgetall(f"{self.key}:by").items()},
                          held={kind: len(held) for kind, held in self.killed.items()},
                          left=self.pending(), exits=exits)
        f.interrupted = starts - f.executions
        f.missing = sorted(set(range(sent)) - set(runs))
        begun = {int(k) for k in self.redis.hkeys(f"{self.key}:starts")}
        f.never_started = [n for n in f.missing if n not in begun]
        in_flight = {n for held in self.killed.values() for n in held.values()}
        if self.amqp:           # began first by a killed worker: it may have run to its end unacknowledged
            first = {int(k): int(v) for k, v in self.redis.hgetall(f"{self.key}:first").items()}
            f.unexplained = sorted(n for n, count in runs.items()
                                   if count > 1 and first.get(n) not in self.killed_groups)
        else:
            f.unexplained = sorted(n for n, count in runs.items() if count > 1 and n not in in_flight)
        f.dead = self._dead()
        return f


def table(rows: List[Dict[str, str]]) -> str:
    heads = list(rows[0])
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    lines += ["| " + " | ".join(r[h] for h in heads) + " |" for r in rows]
    return "\n".join(lines)
