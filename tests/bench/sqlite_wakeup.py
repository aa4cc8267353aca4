"""SQLite, the embedded default: ``delay().get()`` round trips and an idle
worker's CPU, greenq beside Huey's ``SqliteHuey`` in the same run
(docs/performance.md, "SQLite (the embedded default)").

    bin/greenq-bench --setup-only && .bench/venv/bin/pip install huey
    .bench/venv/bin/python tests/bench/sqlite_wakeup.py [--roundtrips 300] [--idle 10]

Each system: one worker process on a fresh database file in a temporary
folder (greenq: ``greenq-worker --pool gevent -c 100``; Huey:
``huey_consumer -w 1 -k thread``), a plain client process making sequential
round trips (after 5 untimed ones), then the worker left idle for ``--idle``
seconds while psutil reads its CPU time (its whole process tree).  Huey runs
twice: with its default polling, and polling every millisecond (see
bench_huey_tasks.py).  Prints a markdown table; ``--json`` writes the figures.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import bench_systems as bs  # noqa: E402


def _percentile(ordered: List[float], pct: float) -> float:
    rank = max(1, int(round(pct / 100.0 * len(ordered) + 0.4999)))
    return ordered[min(rank, len(ordered)) - 1]


def huey_client(n: int, warmup: int, timeout: float) -> Dict[str, Any]:
    """Run inside a client process: sequential Huey round trips."""
    import bench_huey_tasks as tasks
    for i in range(warmup):
        tasks.round_trip(i, 120.0 if i == 0 else timeout)
    latencies = []
    for i in range(n):
        start = time.perf_counter()
        value = tasks.round_trip(i, timeout)
        latencies.append((time.perf_counter() - start) * 1000.0)
        if value != i:
            raise SystemExit(f"round trip {i} returned {value!r}")
    return {"n": n, "latencies_ms": latencies}


def measure(label: str, worker_argv: List[str], env: Dict[str, str], client_argv: List[str],
            folder: str, idle: float, timeout: float) -> Dict[str, Any]:
    import psutil
    worker = bs.Worker(worker_argv, env, os.path.join(folder, f"{label}-worker.log")).start()
    try:
        done = subprocess.run(client_argv, env=env, cwd=HERE, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise bs.BenchError(f"{label} client exited {done.returncode}:\n{done.stderr[-2000:]}\n"
                                f"worker log:\n{worker.log_tail()}")
        lat = sorted(json.loads(done.stdout.strip().splitlines()[-1])["latencies_ms"])
        time.sleep(2.0)                      # settle: the last task's work is over
        root = psutil.Process(worker.proc.pid)
        _, cpu0 = bs.tree_usage(root)
        t0 = time.monotonic()
        time.sleep(idle)
        _, cpu1 = bs.tree_usage(root)
        idle_pct = 100.0 * (cpu1 - cpu0) / (time.monotonic() - t0)
        if not worker.alive():
            raise bs.BenchError(f"{label}: the worker exited:\n{worker.log_tail()}")
    finally:
        worker.stop(timeout=15)
    out = {"system": label, "n": len(lat), "p50_ms": _percentile(lat, 50), "p99_ms": _percentile(lat, 99),
           "mean_ms": statistics.fmean(lat), "max_ms": lat[-1], "idle_cpu_percent": idle_pct}
    print(f"  {label}: p50 {out['p50_ms']:.2f} ms, p99 {out['p99_ms']:.2f} ms, idle CPU {idle_pct:.2f} %",
          file=sys.stderr, flush=True)
    return out


def flush_latency(folder: str, n: int = 30) -> float:
    """Median ms of one fdatasync of a 4 KiB write in ``folder``: the disk's
    flush, which every commit of a synchronous=full file waits for."""
    path = os.path.join(folder, "flush-probe")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    times = []
    try:
        for _ in range(n):
            os.write(fd, b"x" * 4096)
            start = time.perf_counter()
            os.fdatasync(fd)
            times.append((time.perf_counter() - start) * 1000.0)
    finally:
        os.close(fd)
        os.remove(path)
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--roundtrips", type=int, default=300)
    p.add_argument("--idle", type=float, default=10.0, help="seconds the idle worker's CPU is read over")
    p.add_argument("--systems", default="greenq,huey,huey-fast")
    p.add_argument("--synchronous", choices=("full", "normal", "off"), default="full",
                   help="greenq's ?synchronous= (Huey: full = its default, normal/off = its fsync=False, "
                        "which is synchronous=off: Huey has no 'normal')")
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--json", metavar="FILE")
    p.add_argument("huey_client", nargs="*", help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    if opts.huey_client:                    # internal: the Huey client process
        n, warmup, timeout = (float(x) for x in opts.huey_client)
        print(json.dumps(huey_client(int(n), int(warmup), timeout)), flush=True)
        return 0
    import importlib.util
    missing = [m for m in ("huey", "psutil") if importlib.util.find_spec(m) is None]
    if missing:
        print(f"sqlite_wakeup: {', '.join(missing)} not installed: run it with the bench's venv "
              "(bin/greenq-bench --setup-only; .bench/venv/bin/pip install huey)", file=sys.stderr)
        return 2
    folder = tempfile.mkdtemp(prefix="greenq-sqlite-bench-")
    load = os.getloadavg()
    results: List[Dict[str, Any]] = []
    flush_ms = [flush_latency(folder)]
    try:
        for system in [s.strip() for s in opts.systems.split(",") if s.strip()]:
            db = os.path.join(folder, f"{system}.sqlite3")
            if system == "greenq":
                url = f"sqlite:///{db}?synchronous={opts.synchronous}"
                env = bs.system_env("greenq", url, "", concurrency=100, results=True)
                argv = bs.worker_argv("greenq", url, "", 100, "gevent")
                client = [sys.executable, os.path.join(HERE, "bench_client.py"), "greenq", "roundtrip",
                          str(opts.roundtrips)]
            elif system in ("huey", "huey-fast"):
                env = bs.system_env("greenq", "", "")
                env.update(BENCH_HUEY_DB=db, BENCH_HUEY_POLL="fast" if system == "huey-fast" else "default",
                           BENCH_HUEY_FSYNC="1" if opts.synchronous == "full" else "0")
                argv = [sys.executable, "-m", "huey.bin.huey_consumer", "bench_huey_tasks.huey",
                        "-w", "1", "-k", "thread", "-q"]
                if system == "huey-fast":
                    argv += ["-d", "0.001", "-m", "0.001", "-b", "1"]
                client = [sys.executable, os.path.abspath(__file__), str(opts.roundtrips), "5", "10"]
            else:
                raise SystemExit(f"unknown system {system!r}: greenq, huey, huey-fast")
            results.append(measure(system, argv, env, client, folder, opts.idle, opts.timeout))
        flush_ms.append(flush_latency(folder))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    load_after = os.getloadavg()
    labels = {"greenq": "greenq (gevent, -c 100)", "huey": "Huey SqliteHuey, default polling",
              "huey-fast": "Huey SqliteHuey, 1 ms polling"}
    lines = [f"SQLite (synchronous={opts.synchronous}) round trip, {opts.roundtrips} sequential delay().get(); "
             f"idle worker CPU over "
             f"{opts.idle:g} s; load average {load[0]:.2f} before, {load_after[0]:.2f} after; the disk's "
             f"fdatasync p50 {flush_ms[0]:.2f} ms before, {flush_ms[-1]:.2f} ms after", "",
             "| system | p50, ms | p99, ms | idle worker CPU, % |", "|---|---|---|---|"]
    for r in results:
        lines.append(f"| {labels[r['system']]} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
                     f"{r['idle_cpu_percent']:.2f} |")
    print("\n".join(lines))
    if opts.json:
        with open(opts.json, "w") as out:
            json.dump({"load_before": load, "load_after": load_after, "fdatasync_ms": flush_ms, "results": results}, out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
