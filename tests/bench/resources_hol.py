"""Head-of-line blocking (issue 20): --slow tasks needing a saturated resource
([resource:slow] limit = --limit, each holding it --sleep seconds) enqueued
ahead of --free tasks needing none, on one greenq worker (-P gevent -c C).
What matters is how long the free tasks wait in the queue (enqueue to start).

    python tests/bench/resources_hol.py [--slow 10000] [--free 1000] [--modes alone,permits,naive]

Modes:
  alone    the free tasks alone on an idle worker: the floor
  permits  slow tasks with resources={"slow": 1} (the admission step: a waiting
           task holds no runner slot and at most `prefetch` wait per resource;
           the rest are deferred back to the broker)
  naive    slow tasks taking the permit inside their body (`with
           app.resource("slow")`), holding their runner slot while they wait:
           what a semaphore in task code does.  The free tasks start only once
           every slow task ahead of them has started: about
           slow x sleep / limit seconds.
The worker is started and answers one task before anything is enqueued, so
start-up is not in the figures.  Per mode: the free tasks' queue wait p50,
p99 and max, the time from the first enqueue until the last free task ran,
and how many slow tasks had run by then.  Redis db 10 (flushed).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[2])]
import resbench as rb  # noqa: E402

MODES = ("alone", "permits", "naive")


def run(mode, opts):
    client = rb.redis_client()
    client.flushdb()
    prefix = f"resbench-{uuid.uuid4().hex[:8]}"
    folder = Path(tempfile.mkdtemp(prefix=f"resbench-hol-{mode}-"))
    rb.greenq_ini(folder, prefix, resources=f"[resource:slow]\nlimit = {opts.limit}\n")
    env = rb.base_env({"RESBENCH_PREFIX": prefix, "RESBENCH_REDIS_URL": rb.REDIS_URL})
    import os
    os.environ.update({k: v for k, v in env.items() if k.startswith("RESBENCH_")})
    t = rb.greenq_tasks(folder)
    log = open(folder / "worker.log", "w")
    cmd = [sys.executable, "-m", "greenq.worker", "-A", "res_greenq_tasks", "-P", "gevent",
           "-c", str(opts.c), "--loglevel", "WARNING"]
    if opts.prefetch:
        cmd += ["--prefetch", str(opts.prefetch)]
    procs = [rb.spawn(cmd, folder, env, log)]
    try:
        t.free.delay(-1, time.time())                      # the worker is up when this ran
        if not rb.wait_for_records(client, prefix, 1, 120, procs, key="free"):
            raise SystemExit(f"the worker did not start; see {folder}/worker.log")
        client.delete(f"{prefix}:free")
        slow_task = t.naive if mode == "naive" else t.slow
        first = time.time()
        if mode != "alone":
            for start in range(0, opts.slow, 1000):
                enq = time.time()
                t.app.enqueue_many([slow_task.s(i, enq, opts.sleep)
                                    for i in range(start, min(opts.slow, start + 1000))])
        for start in range(0, opts.free, 1000):
            enq = time.time()
            t.app.enqueue_many([t.free.s(i, enq) for i in range(start, min(opts.free, start + 1000))])
        enqueued = time.time() - first
        done = rb.wait_for_records(client, prefix, opts.free, opts.timeout, procs, key="free")
    finally:
        rb.stop(procs)
        t.app.close()
    free = rb.read_records(client, prefix, key="free")
    last_free = max((r[2] for r in free), default=float("nan"))
    slow_ran = sum(1 for r in rb.read_records(client, prefix) if r[2] <= last_free)
    client.flushdb()
    log.close()
    if done:
        import shutil
        shutil.rmtree(folder, ignore_errors=True)      # the worker's log: kept only when it failed
    waits = [r[2] - r[1] for r in free]
    return {"mode": mode, "free_done": len(free), "complete": done,
            "wait_p50_s": round(rb.percentile(waits, 50), 3),
            "wait_p99_s": round(rb.percentile(waits, 99), 3),
            "wait_max_s": round(max(waits, default=float("nan")), 3),
            "last_free_after_s": round(last_free - first, 2), "enqueue_s": round(enqueued, 2),
            "slow_run_by_then": slow_ran, "log": None if done else str(folder)}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--slow", type=int, default=10000)
    p.add_argument("--free", type=int, default=1000)
    p.add_argument("--limit", type=int, default=10, help="[resource:slow] limit")
    p.add_argument("--sleep", type=float, default=0.05, help="seconds each slow task holds its permit")
    p.add_argument("-c", type=int, default=200, help="worker concurrency")
    p.add_argument("--prefetch", type=int, default=0, help="greenq-worker --prefetch (0 = auto)")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--timeout", type=float, default=300, help="seconds per mode")
    p.add_argument("--json", metavar="FILE", help="also write the rows to FILE")
    opts = p.parse_args()
    modes = [m.strip() for m in opts.modes.split(",") if m.strip()]
    for m in modes:
        if m not in MODES:
            p.error(f"unknown mode {m!r}; expected {', '.join(MODES)}")
    rb.exit_on_sigterm()
    lock = rb.take_lock()
    rows = []
    try:
        for mode in modes:
            out = run(mode, opts)
            print(out, flush=True)
            rows.append(out)
    finally:
        lock.close()
    if opts.json:
        import json
        Path(opts.json).write_text(json.dumps(rows, indent=1))
    print(f"\n{opts.slow} slow tasks (limit {opts.limit}, {opts.sleep} s each) ahead of {opts.free} free "
          f"tasks, one worker -c {opts.c}; naive drain of the slow ones: "
          f"{opts.slow * opts.sleep / opts.limit:.0f} s")
    rb.print_table(["mode", "free done", "wait p50 s", "wait p99 s", "wait max s", "last free at s",
                    "slow run by then"],
                   [[r["mode"], r["free_done"], r["wait_p50_s"], r["wait_p99_s"], r["wait_max_s"],
                     r["last_free_after_s"], r["slow_run_by_then"] if r["mode"] != "alone" else "-"]
                    for r in rows])


if __name__ == "__main__":
    main()
