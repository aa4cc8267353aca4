"""Peak RSS of a ``-c 10 --burst`` worker fed oversized messages by a program
that is not greenq (issue 17, item 14: 12 messages of 30 MiB took a worker
to 970 MiB before each was refused for its size):

    python tests/bench/big_messages_rss.py [redis|amqp|sqlite ...] [--root PATH]
        [--count 12] [--mib 30] [--good 20] [--pool gevent]

The big messages are written raw (XADD, basic.publish, INSERT) before the
good tasks (``e2e.add``), so the worker's first fetch meets all of them; the
default ``max_message_size`` (1 MiB) applies.  ``--root`` runs the worker
(and the client) from another checkout, e.g. the code before the fix:
``git worktree add /tmp/bytes-before 6ecde31``.  Prints, per broker, the
worker's peak RSS (VmHWM, read until it exits), its exit code, the dead
letters and the time taken.  Redis: db 13 under a key prefix of its own,
deleted afterwards; RabbitMQ: guest@127.0.0.1 on a vhost of its own, deleted
afterwards (rabbitmqctl); SQLite: a temporary file.
"""
from __future__ import annotations

import argparse
import os
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parents[2]
REDIS = "redis://127.0.0.1:6379/13"


def peak_rss(pid: int) -> int:
    """VmHWM of a live process, in bytes (0 once it is exiting)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class Run:
    """One broker's run: its namespace, environment and clean-up."""

    def __init__(self, kind: str, root: Path, tmp: Path) -> None:
        self.kind, self.root, self.tmp = kind, root, tmp
        self.tag = f"bigrss{uuid.uuid4().hex[:8]}"
        self.queue = self.tag
        self.vhost = self.tag
        url = {"redis": REDIS, "amqp": f"amqp://guest:guest@127.0.0.1:5672/{self.vhost}",
               "sqlite": f"sqlite:///{tmp / 'broker.sqlite3'}"}[kind]
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("GREENQ_")}
        self.env.update(GREENQ_BROKER_URL=url, GREENQ_KEY_PREFIX=self.tag, GREENQ_DEFAULT_QUEUE=self.queue,
                        GREENQ_WORKER_QUEUES=self.queue, GREENQ_WORKER_BLOCKING_THRESHOLD="0",
                        PYTHONPATH=os.pathsep.join([str(root / "tests" / "e2e"), str(root)]))
        if kind == "amqp":
            subprocess.run(["rabbitmqctl", "add_vhost", self.vhost], check=True, capture_output=True)
            subprocess.run(["rabbitmqctl", "set_permissions", "-p", self.vhost, "guest", ".*", ".*", ".*"],
                           check=True, capture_output=True)

    def client(self, code: str) -> str:
        done = subprocess.run([sys.executable, "-c", "import e2e_tasks\napp = e2e_tasks.app\n" + code],
                              cwd=self.tmp, env=self.env, capture_output=True, text=True, timeout=300)
        if done.returncode:
            raise SystemExit(f"client failed:\n{done.stderr}")
        return done.stdout

    def write_big(self, count: int, size: int) -> None:
        """Write ``count`` bodies of ``size`` bytes straight into the queue."""
        url = self.env["GREENQ_BROKER_URL"]
        bodies = (b"BIG-%02d:" % i + b"x" * (size - 7) for i in range(count))
        if self.kind == "redis":
            import redis
            client = redis.Redis.from_url(url)
            for i, body in enumerate(bodies):
                client.xadd(f"{self.tag}:q:{self.queue}:0", {"b": body, "m": f"big-{i}"})
            client.close()
        elif self.kind == "amqp":
            import amqp
            conn = amqp.Connection(host="127.0.0.1:5672", userid="guest", password="guest",
                                   virtual_host=self.vhost)
            conn.connect()
            channel = conn.channel()
            for i, body in enumerate(bodies):
                channel.basic_publish(amqp.Message(body, message_id=f"big-{i}", delivery_mode=2), "", self.queue)
            channel.queue_declare(self.queue, passive=True)     # a round trip: all routed
            conn.close()
        else:
            with sqlite3.connect(url[len("sqlite:///"):]) as db:
                for i, body in enumerate(bodies):
                    db.execute("INSERT INTO messages (queue, priority, visible_at, message_id, body) "
                               "VALUES (?, 0, ?, ?, ?)", (self.queue, time.time(), f"big-{i}", body))

    def worker(self, pool: str) -> "tuple[int, int, str]":
        """Run the worker to its end: (exit code, peak RSS, output)."""
        proc = subprocess.Popen([sys.executable, "-m", "greenq.worker", "-A", "e2e_tasks", "-P", pool,
                                 "-c", "10", "--burst"], cwd=self.tmp, env=self.env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        out: list = []
        reader = threading.Thread(target=lambda: out.append(proc.stdout.read()), daemon=True)
        reader.start()
        peak = 0
        while proc.poll() is None:
            peak = max(peak, peak_rss(proc.pid))
            time.sleep(0.01)
        reader.join(10)
        return proc.returncode, peak, out[0] if out else ""

    def cleanup(self) -> None:
        if self.kind == "redis":
            import redis
            client = redis.Redis.from_url(REDIS)
            keys = list(client.scan_iter(match=f"{self.tag}*", count=1000))
            if keys:
                client.delete(*keys)
            client.close()
        elif self.kind == "amqp":
            subprocess.run(["rabbitmqctl", "delete_vhost", self.vhost], capture_output=True)


def measure(kind: str, args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=f"big-rss-{kind}-"))
    run = Run(kind, Path(args.root).resolve(), tmp)
    try:
        run.client(f"app.broker.declare([{run.queue!r}])")
        run.write_big(args.count, args.mib * 1024 * 1024)
        run.client(f"rs = [e2e_tasks.add.delay(i, 1) for i in range({args.good})]")
        start = time.monotonic()
        code, peak, out = run.worker(args.pool)
        took = time.monotonic() - start
        report = run.client(
            f"d = [x for x in app.broker.dlq_list(1000) if x.queue == {run.queue!r}]\n"
            f"s = app.broker.queue_stats([{run.queue!r}])[0]\n"
            "print(len(d), max((len(x.body) for x in d), default=0), s.ready, s.held, "
            "repr(d[0].reason) if d else '')")
        dead, kept, ready, held, reason = report.strip().split(" ", 4)
        print(f"{kind}: {args.count} x {args.mib} MiB + {args.good} good, -c 10 --burst ({args.root}): "
              f"peak RSS {peak / 2**20:.0f} MiB, exit {code}, {took:.1f} s; {dead} dead-lettered "
              f"(largest body kept {kept} bytes), left ready {ready}, held {held}; reason {reason}")
        if code:
            print(out[-2000:])
    finally:
        run.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("brokers", nargs="*", default=["redis", "amqp"], choices=["redis", "amqp", "sqlite"])
    parser.add_argument("--root", default=str(HERE), help="greenq checkout to run the worker from")
    parser.add_argument("--count", type=int, default=12)
    parser.add_argument("--mib", type=int, default=30)
    parser.add_argument("--good", type=int, default=20)
    parser.add_argument("--pool", default="gevent")
    args = parser.parse_args()
    for kind in args.brokers:
        measure(kind, args)


if __name__ == "__main__":
    main()
