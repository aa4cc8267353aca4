"""kill -9 of a worker holding cluster permits (issue 20): how long until its
permits come back to the other worker, and that the limit held throughout,
counted by the server (a private PostgreSQL's client backends).

    .bench/venv/bin/python tests/bench/resources_kill.py [--limit 10] [--lease 3]

[resource:pg] limit = --limit, scope = cluster on Redis, [greenq]
lease_seconds = --lease.  Each task holds its permit around a connection of
its own (opened, `SELECT pg_sleep(s)`, closed), so the server's client
connections are at most the permits held.  Steps:
  1. --limit long tasks (--hold seconds the first time they run), then worker
     A (-c 50); wait until the server has --limit connections (A holds every
     permit).
  2. --short more tasks (--sleep seconds each), then worker B (-c 50); B can
     take no permit; wait --settle seconds.
  3. kill -9 A's process group at t0.  PostgreSQL drops A's connections at
     once (client_connection_check_interval = 100ms); A's permits stay
     leased until their lease runs out.
  4. B drains every task (A's messages come back after their lease too; a
     long task run again holds --sleep, not --hold).
Reported: t0 to the first task started by B, t0 to the server back at
--limit connections, the most connections the server ever had (sampled
every 10 ms from its processes, from before A started to the end), and the
connection count around t0, and from the tasks' own records the most
bodies that overlapped (a body holds its connection, inside its permit).
The server's count of processes can exceed the permits for a moment: a
backend whose client closed is still a process while it exits, and the
permit has already gone to the next task.  So each sample also counts the
ESTABLISHED TCP sockets of the server's port, on the server's side and on
the clients' side (the clients run here; a client's close() takes its side
out of ESTABLISHED at once: the connections the clients hold open, which the
permits bound), and the samples above the limit in processes but not in
the server's open sockets are counted apart (a backend still exiting).  Redis db 10 (flushed).
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[2])]
import resbench as rb  # noqa: E402


def wait_until(pred, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.01)
    raise SystemExit(f"timed out waiting for {what}")


def run(opts, pg):
    client = rb.redis_client()
    client.flushdb()
    prefix = f"resbench-{uuid.uuid4().hex[:8]}"
    folder = Path(tempfile.mkdtemp(prefix="resbench-kill-"))
    rb.greenq_ini(folder, prefix, lease_seconds=opts.lease,
                  resources=f"[resource:pg]\nlimit = {opts.limit}\nscope = cluster\n\n"
                            "[resource:slow]\nlimit = 1\n")
    env = rb.base_env({"RESBENCH_PREFIX": prefix, "RESBENCH_REDIS_URL": rb.REDIS_URL,
                       "RESBENCH_PG_PORT": str(pg.port), "RESBENCH_PERMITS": "1",
                       "RESBENCH_POOL": "idle:0"})
    os.environ.update({k: v for k, v in env.items() if k.startswith("RESBENCH_")})
    t = rb.greenq_tasks(folder)
    cmd = [sys.executable, "-m", "greenq.worker", "-A", "res_greenq_tasks", "-P", "gevent", "-c", "50",
           "--loglevel", "WARNING"]
    sampler = rb.ConnSampler(pg, interval=0.01, trace=True)
    sampler.start()
    procs = []
    try:
        enq = time.time()
        t.app.enqueue_many([t.hold.s(i, enq, opts.sleep, opts.hold) for i in range(opts.limit)])
        a = rb.spawn(cmd + ["-n", "A@%h"], folder, env, open(folder / "a.log", "w"))
        procs.append(a)
        wait_until(lambda: sampler.count() >= opts.limit, 120, "worker A to hold every permit")
        enq = time.time()
        t.app.enqueue_many([t.hold.s(i, enq, opts.sleep) for i in range(opts.limit, opts.limit + opts.short)])
        b = rb.spawn(cmd + ["-n", "B@%h"], folder, env, open(folder / "b.log", "w"))
        procs.append(b)
        time.sleep(opts.settle)
        before = sampler.count()
        t0 = time.time()
        os.killpg(a.pid, signal.SIGKILL)
        a.wait()
        total = opts.limit + opts.short
        done = rb.wait_for_records(client, prefix, total, opts.timeout, [b])
    finally:
        sampler.halt.set()
        rb.stop(procs)
        t.app.close()
    recs = rb.read_records(client, prefix)
    client.flushdb()
    if done:
        import shutil
        shutil.rmtree(folder, ignore_errors=True)      # the workers' logs: kept only when it failed
    after = [s for s in sampler.samples if s[0] > t0]
    low = min((n for _, n in after[:200]), default=None)           # within 2 s of the kill
    # back at the limit: the first sample at the limit after the count fell
    # below it (the server drops a dead client's backends within ~0.1 s)
    fell = next((ts for ts, n in after if n < opts.limit), None)
    back = next((ts - t0 for ts, n in after if fell is not None and ts > fell and n >= opts.limit), None)
    first = min((r[2] for r in recs if r[2] > t0), default=None)
    ran_before = sum(1 for r in recs if r[2] <= t0)
    # the most task bodies (each holds its connection, inside its permit) that
    # overlapped, from the records: the client's side of the same count
    events = sorted([(r[2], 1) for r in recs] + [(r[3], -1) for r in recs], key=lambda e: (e[0], e[1]))
    overlap = most = 0
    for _, step in events:
        overlap += step
        most = max(most, overlap)
    over = sum(1 for _, n in sampler.samples if n > opts.limit)
    over_est = sum(1 for _, n in sampler.samples_established if n > opts.limit)
    over_client = sum(1 for _, n in sampler.samples_client if n > opts.limit)
    # a sample above the limit in processes but not in open connections: a
    # backend still exiting after its client closed (and its permit moved on)
    exiting = sum(1 for (_, n), (_, e) in zip(sampler.samples, sampler.samples_established)
                  if n > opts.limit >= e)
    return {"max_bodies_overlapping": most, "samples_over_limit": over, "limit": opts.limit, "lease_seconds": opts.lease, "records": len(recs), "complete": done,
            "errors": sum(1 for r in recs if r[4]), "conns_at_kill": before,
            "conns_low_after_kill": low, "tasks_started_before_kill": ran_before,
            "first_start_after_kill_s": round(first - t0, 2) if first else None,
            "back_at_limit_after_s": round(back, 2) if back is not None else None,
            "max_server_conns": sampler.max, "samples": len(sampler.samples),
            "max_established": sampler.max_established, "samples_over_limit_established": over_est,
            "samples_over_only_exiting": exiting, "max_client": sampler.max_client,
            "samples_over_limit_client": over_client,
            "log": None if done else str(folder)}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--limit", type=int, default=10)
    p.add_argument("--lease", type=int, default=3, help="[greenq] lease_seconds")
    p.add_argument("--hold", type=float, default=30.0, help="seconds A's first tasks hold their permit")
    p.add_argument("--short", type=int, default=200, help="tasks enqueued for B")
    p.add_argument("--sleep", type=float, default=0.1, help="seconds the other tasks hold theirs")
    p.add_argument("--settle", type=float, default=2.0, help="seconds between B's start and the kill")
    p.add_argument("--timeout", type=float, default=120)
    opts = p.parse_args()
    rb.exit_on_sigterm()
    lock = rb.take_lock()
    pg = rb.PrivatePostgres(max_connections=opts.limit + 20,
                            settings="client_connection_check_interval = 100ms\n").start()
    try:
        out = run(opts, pg)
        print(out, flush=True)
    finally:
        pg.stop()
        lock.close()
    print(f"\nkill -9 of worker A holding all {opts.limit} permits of a cluster resource "
          f"(lease_seconds = {opts.lease}); worker B waiting")
    rb.print_table(["figure", "value"], [
        ["server connections at the kill", out["conns_at_kill"]],
        ["lowest within 2 s after", out["conns_low_after_kill"]],
        ["kill -> B's first task started (s)", out["first_start_after_kill_s"]],
        ["kill -> server back at the limit (s)", out["back_at_limit_after_s"]],
        ["most server connections, whole run", f"{out['max_server_conns']} (limit {opts.limit}, "
                                               f"{out['samples']} samples)"],
        ["samples above the limit (processes)", out["samples_over_limit"]],
        ["  of them: only a backend still exiting", out["samples_over_only_exiting"]],
        ["most ESTABLISHED, server's side", out["max_established"]],
        ["samples above the limit (server's side)", out["samples_over_limit_established"]],
        ["most ESTABLISHED, clients' side", out["max_client"]],
        ["samples above the limit (clients' side)", out["samples_over_limit_client"]],
        ["most task bodies overlapping (records)", out["max_bodies_overlapping"]],
        ["tasks done / failed", f"{out['records']} / {out['errors']}"],
    ])


if __name__ == "__main__":
    main()
