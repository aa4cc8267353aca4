"""Resource permits against a real PostgreSQL (issue 20): N tasks each running
`SELECT pg_sleep(0.005)` through pg8000 (pure Python: cooperative under
gevent), 2 worker processes x -c 500 on Redis, against a private PostgreSQL
with max_connections = 50.

    .bench/venv/bin/python tests/bench/resources_pg.py [--n 20000] [--configs ...]

(`bin/greenq-bench --setup-only` builds .bench/venv with Celery and pg8000.)

Configurations (--configs, comma-separated, in this order by default):
  celery      Celery 5 -P gevent -c 500 x 2 workers, a blocking pool of 25
              connections per process (the usual hand-tuned setup)
  none        greenq --processes 2 -c 500, no permits: a connection per task
  limit45     the same with [resource:pg] limit = 45, scope = cluster
  adaptive    the same with adaptive = true, limit = 200, scope = cluster,
              errors = pg8000.exceptions.DatabaseError ("too many clients")
  limitN      (not by default) a fixed cluster limit of N (limit20, limit30...)
  host45      (not by default) limit = 45, scope = host: the same limit
              without the broker (flock files), to tell the cluster pool's
              cost from the rest
Connections: Celery's tasks take one from the blocking pool.  greenq with
permits (limit45, adaptive, host45) uses app.resource_pool("pg"): each open
connection keeps a permit, so connections stay open between tasks and the
server never sees more than the limit (greenq/resources/connections.py);
--greenq-pool idle keeps the former pool instead (take an idle connection
or open one, at most --idle per process kept idle: up to limit + 2 x --idle
connections).  greenq without permits (none) always uses that idle pool.
Failed tasks are not retried.

Per configuration: tasks recorded, "too many clients" errors tasks met,
connections the server refused (counted in its own log: an adaptive pool
tries a refused open again, so these can exceed what tasks met), failed tasks,
throughput (tasks / (last end - first start)), p50/p99 of the task body's
time (Celery's includes waiting for a pooled connection; greenq's permit wait
comes before the body), p99 from enqueue to end, and the most client
connections the server had, sampled every 20 ms: "max server conns" counts
its backend processes (one still exiting after its client closed counts),
"max open conns" the clients' ESTABLISHED sockets to it (resbench.ConnSampler).
The queue is filled before the workers start.  Redis db 10, flushed.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[2])]
import resbench as rb  # noqa: E402

CONFIGS = ("celery", "none", "limit45", "adaptive", "host45")
DEFAULT = ("celery", "none", "limit45", "adaptive")
RESOURCES = {
    "none": "",
    "limit45": "[resource:pg]\nlimit = 45\nscope = cluster\n",
    "host45": "[resource:pg]\nlimit = 45\nscope = host\n",
    "adaptive": ("[resource:pg]\nlimit = 200\nscope = cluster\nadaptive = true\n"
                 "errors = pg8000.exceptions.DatabaseError\n"),
}


def enqueue_greenq(folder, n, sleep):
    t = rb.greenq_tasks(folder)
    for start in range(0, n, 1000):
        enq = time.time()
        t.app.enqueue_many([t.pg.s(i, enq, sleep) for i in range(start, min(n, start + 1000))])
    t.app.close()


def enqueue_celery(n, sleep):
    import res_celery_tasks as t
    with t.app.producer_or_acquire() as producer:
        for i in range(n):
            t.pg.apply_async((i, time.time(), sleep), producer=producer)


def server_refusals(pg):
    """Connections the server refused so far ("too many clients" in its own
    log): with an adaptive limit, opens it refused that the pool tried again
    (OPEN_RETRIES) count here though no task saw them."""
    try:
        with open(pg.dir / "log", errors="replace") as f:
            return sum(line.count("too many clients") for line in f)
    except OSError:
        return 0


def run(config, opts, pg):
    client = rb.redis_client()
    client.flushdb()
    prefix = f"resbench-{uuid.uuid4().hex[:8]}"
    folder = Path(tempfile.mkdtemp(prefix=f"resbench-{config}-"))
    env = rb.base_env({"RESBENCH_PREFIX": prefix, "RESBENCH_REDIS_URL": rb.REDIS_URL,
                       "RESBENCH_PG_PORT": str(pg.port), "RESBENCH_CONCURRENCY": str(opts.c)})
    os.environ.update({k: v for k, v in env.items() if k.startswith("RESBENCH_")})
    log = open(folder / "workers.log", "w")
    if config == "celery":
        env["RESBENCH_POOL"] = f"blocking:{opts.pool}"
        enqueue_celery(opts.n, opts.sleep)
        celery = str(Path(sys.executable).parent / "celery")
        procs = [rb.spawn([celery, "-A", "res_celery_tasks", "worker", "-P", "gevent", "-c", str(opts.c),
                           "--loglevel", "WARNING", "-n", f"w{k}-{prefix}@%h", "--without-gossip",
                           "--without-mingle", "--without-heartbeat"], folder, env, log)
                 for k in range(2)]
    else:
        rb.greenq_ini(folder, prefix, resources=RESOURCES[config] + "[resource:slow]\nlimit = 1\n")
        env["RESBENCH_PERMITS"] = "0" if config == "none" else "1"
        env["RESBENCH_TRACE"] = "1" if opts.trace else "0"
        env["RESBENCH_POOL"] = ("permit" if config != "none" and opts.greenq_pool == "permit"
                                else f"idle:{opts.idle}")
        enqueue_greenq(folder, opts.n, opts.sleep)
        procs = [rb.spawn([sys.executable, "-m", "greenq.worker", "-A", "res_greenq_tasks", "-P", "gevent",
                           "-c", str(opts.c), "--processes", "2", "--loglevel", "WARNING"],
                          folder, env, log)]
    refused_before = server_refusals(pg)
    sampler = rb.ConnSampler(pg)
    sampler.start()
    began = time.monotonic()
    try:
        complete = rb.wait_for_records(client, prefix, opts.n, opts.timeout, procs)
    finally:
        wall = time.monotonic() - began
        sampler.halt.set()
        rb.stop(procs)
    recs = rb.read_records(client, prefix)
    if opts.trace and config != "celery":
        trace_path = Path(opts.trace) / f"trace-{config}.txt"
        trace_path.parent.mkdir(parents=True, exist_ok=True)
        rows = [raw.decode() for raw in client.lrange(f"{prefix}:trace", 0, -1)]
        trace_path.write_text("time pid limit in_use parked estimate rtt_noload_ms probing\n"
                              + "\n".join(rows) + "\n")
    client.flushdb()
    log.close()
    if not complete:
        print(f"  {config}: only {len(recs)} of {opts.n} tasks recorded; log in {folder}", flush=True)
    else:
        shutil.rmtree(folder, ignore_errors=True)      # the workers' log: kept only when it failed
    refused = server_refusals(pg) - refused_before
    toomany = sum(1 for r in recs if r[4] == "toomany")
    failed = sum(1 for r in recs if r[4])
    other = sorted({r[4] for r in recs if r[4] and r[4] != "toomany"})
    span = (max(r[3] for r in recs) - min(r[2] for r in recs)) if recs else float("nan")
    body = [r[3] - r[2] for r in recs]
    sojourn = [r[3] - r[1] for r in recs]
    return {"config": config, "tasks": len(recs), "too_many_clients": toomany, "server_refused": refused,
            "failed": failed,
            "other_errors": other, "tasks_per_s": round(len(recs) / span, 1) if recs else 0,
            "body_p50_ms": round(rb.percentile(body, 50) * 1000, 1),
            "body_p99_ms": round(rb.percentile(body, 99) * 1000, 1),
            "sojourn_p99_s": round(rb.percentile(sojourn, 99), 2),
            "max_server_conns": sampler.max, "max_established": sampler.max_client,
            "wall_s": round(wall, 1),
            "log": None if complete else str(folder)}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=5000, help="tasks per configuration (the issue's size: 20000)")
    p.add_argument("--configs", default=",".join(DEFAULT))
    p.add_argument("-c", type=int, default=500, help="concurrency of each worker process")
    p.add_argument("--pool", type=int, default=25, help="Celery's connections per process")
    p.add_argument("--idle", type=int, default=2, help="greenq's idle connections kept per process")
    p.add_argument("--greenq-pool", choices=("permit", "idle"), default="permit",
                   help="greenq's connections under permits: app.resource_pool, or the idle pool")
    p.add_argument("--trace", metavar="FOLDER", default="",
                   help="write FOLDER/trace-CONFIG.txt: every 10th greenq task's limit in force, permits in "
                        "use and parked, and the adaptive estimate, no-load latency and probing flag")
    p.add_argument("--sleep", type=float, default=0.005, help="pg_sleep seconds")
    p.add_argument("--max-connections", type=int, default=50)
    p.add_argument("--timeout", type=float, default=600, help="seconds per configuration")
    opts = p.parse_args()
    configs = [c.strip() for c in opts.configs.split(",") if c.strip()]
    for c in configs:
        if c.startswith("limit") and c[5:].isdigit():   # limitN: a fixed cluster limit of N
            RESOURCES.setdefault(c, f"[resource:pg]\nlimit = {int(c[5:])}\nscope = cluster\n")
            continue
        if c not in CONFIGS:
            p.error(f"unknown configuration {c!r}; expected {', '.join(CONFIGS)}")
    if "celery" in configs:
        try:
            import celery  # noqa: F401
        except ImportError:
            print("Celery is not installed here (bin/greenq-bench --setup-only); skipping it", flush=True)
            configs.remove("celery")
    rb.exit_on_sigterm()
    lock = rb.take_lock()
    pg = rb.PrivatePostgres(opts.max_connections).start()
    rows = []
    try:
        for config in configs:
            out = run(config, opts, pg)
            print(out, flush=True)
            rows.append(out)
    finally:
        pg.stop()
        lock.close()
    print(f"\n{opts.n} tasks x SELECT pg_sleep({opts.sleep}), 2 processes x -c {opts.c}, "
          f"max_connections = {opts.max_connections}, load average {os.getloadavg()[0]:.1f}")
    rb.print_table(["config", "tasks", "too many clients", "refused by the server", "failed", "tasks/s", "body p50 ms",
                    "body p99 ms", "enqueue->end p99 s", "max server conns", "max open conns"],
                   [[r["config"], r["tasks"], r["too_many_clients"], r["server_refused"], r["failed"], r["tasks_per_s"],
                     r["body_p50_ms"], r["body_p99_ms"], r["sojourn_p99_s"], r["max_server_conns"], r["max_established"]]
                    for r in rows])


if __name__ == "__main__":
    main()
