"""A Flask app under ``gunicorn -k gevent`` that enqueues with greenq: how its
Redis connections behave before, during and after load (issue 8, item 6).

    python tests/bench/bench_web.py [--ref REV] [--seconds 10] [--clients 50]

Starts one greenq worker (-c 100) and one gunicorn gevent worker serving
``/enqueue`` (``add.delay(1, 2)``) and ``/roundtrip`` (``add.delay(1, 2).get()``),
then drives both with ``--clients`` client threads for ``--seconds`` each.  It
counts the web process's Redis connections (``CLIENT LIST``, by the process's
client name) before the load, at the end of it, and ``--idle`` seconds after
it, and prints requests, errors, p50/p99 latency and those counts as one JSON
line.  ``--ref REV`` runs greenq as of that git revision (exported to a
temporary folder), for a before/after comparison.  Needs flask and gunicorn
(not greenq dependencies: pip install flask gunicorn) and Redis; uses db 12,
flushed.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

APP = '''
import os
from flask import Flask
from greenq import GreenQ

q = GreenQ("web", broker=os.environ["BENCH_REDIS"])

@q.task(name="web.add")
def add(x, y):
    return x + y

web = Flask(__name__)

@web.route("/enqueue")
def enqueue():
    return add.delay(1, 2).id

@web.route("/roundtrip")
def roundtrip():
    return str(add.delay(1, 2).get(timeout=10))
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def connections(redis_url: str, pid: int) -> int:
    """Redis connections of process ``pid``: redis-py names none, so count by the
    peer ports that process holds open (psutil)."""
    import psutil
    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    procs = [psutil.Process(pid)] + psutil.Process(pid).children(recursive=True)
    return sum(1 for p in procs for c in p.net_connections(kind="tcp")
               if c.raddr and c.raddr.port == port and c.status == "ESTABLISHED")


def load(port: int, path: str, clients: int, seconds: float) -> dict:
    latencies, errors = [], [0]
    stop = time.monotonic() + seconds

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
        while time.monotonic() < stop:
            start = time.perf_counter()
            try:
                conn.request("GET", path)
                resp = conn.getresponse()
                resp.read()
                if resp.status != 200:
                    errors[0] += 1
                else:
                    latencies.append(time.perf_counter() - start)
            except Exception:
                errors[0] += 1
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
        conn.close()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    latencies.sort()
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [0.0] * 99
    return {"requests": len(latencies), "errors": errors[0], "rps": round(len(latencies) / seconds),
            "p50_ms": round(q[49] * 1000, 2), "p99_ms": round(q[98] * 1000, 2)}


def export(ref: str) -> str:
    folder = tempfile.mkdtemp(prefix="greenq-web-")
    archive = subprocess.run(["git", "-C", REPO, "archive", ref, "greenq"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", folder], input=archive, check=True)
    return folder


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ref", help="greenq as of this git revision (default: the working tree)")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--idle", type=float, default=65.0, help="seconds to wait before the last count")
    p.add_argument("--redis", default="redis://127.0.0.1:6379/12")
    opts = p.parse_args(argv)
    src = export(opts.ref) if opts.ref else REPO
    work = tempfile.mkdtemp(prefix="greenq-webapp-")
    with open(os.path.join(work, "webapp.py"), "w") as fh:
        fh.write(APP)
    env = dict(os.environ, BENCH_REDIS=opts.redis, PYTHONPATH=os.pathsep.join([work, src]),
               GREENQ_BROKER_URL=opts.redis)
    import redis
    redis.Redis.from_url(opts.redis).flushdb()
    port = free_port()
    worker = subprocess.Popen([sys.executable, "-m", "greenq.worker", "-A", "webapp:q", "-c", "100"],
                              cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    web = subprocess.Popen([sys.executable, "-m", "gunicorn", "-k", "gevent", "-w", "1",
                            "--worker-connections", "1000", "-b", f"127.0.0.1:{port}", "webapp:web"],
                           cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)
        load(port, "/enqueue", 2, 1.0)                      # warm up
        result = {"ref": opts.ref or "working tree", "connections_before": connections(opts.redis, web.pid)}
        result["enqueue"] = load(port, "/enqueue", opts.clients, opts.seconds)
        result["connections_during_enqueue_end"] = connections(opts.redis, web.pid)
        result["roundtrip"] = load(port, "/roundtrip", opts.clients, opts.seconds)
        result["connections_during_roundtrip_end"] = connections(opts.redis, web.pid)
        time.sleep(opts.idle)
        load(port, "/enqueue", 1, 0.2)                      # one request: idle connections are closed on use
        result[f"connections_after_{opts.idle:.0f}s_idle"] = connections(opts.redis, web.pid)
        print(json.dumps(result))
    finally:
        for proc in (web, worker):
            proc.send_signal(signal.SIGTERM)
        for proc in (web, worker):
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
