"""How much of the time a host-scope permit of limit 1 is held when two
worker processes (``--processes 2 -P gevent -c 4 --prefetch 4``) share it on
one Redis queue:

    python tests/bench/permit_utilisation.py [--tasks 100] [--seconds 0.02] [--runs 3]

Each task (tests/e2e/resource_tasks.py, ``res.db``) sleeps ``--seconds``
inside its permit and logs its start and end; printed per run: the wall time
from the first start to the last end, the utilisation (the sum of the tasks'
times over that wall time), the tasks run per process, the gaps between one
task's end and the next start, and the load average.  Redis: db 13 under a
prefix of its own, deleted afterwards; the host permits in the run's own
temporary directory (``$GREENQ_PERMITS_DIR``), removed with it.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
E2E = os.path.join(ROOT, "tests", "e2e")
URL = "redis://127.0.0.1:6379/13"


def one_run(tasks: int, seconds: float) -> str:
    tmp = tempfile.mkdtemp(prefix="permit-util-")
    markers = os.path.join(tmp, "markers")
    os.mkdir(markers)
    with open(os.path.join(tmp, "greenq.ini"), "w") as f:
        f.write("[resource:db]\nlimit = 1\nscope = host\n\n[resource:api]\nlimit = 1\n")
    prefix = f"permitutil{uuid.uuid4().hex[:8]}"
    env = dict(os.environ, GREENQ_BROKER_URL=URL, GREENQ_RESULT_BACKEND=URL, GREENQ_KEY_PREFIX=prefix,
               PYTHONPATH=os.pathsep.join([E2E, ROOT]), E2E_MARKERS=markers,
               GREENQ_WORKER_LOGLEVEL="WARNING", GREENQ_WORKER_BLOCKING_THRESHOLD="0",
               GREENQ_PERMITS_DIR=os.path.join(tmp, "permits"))     # removed with tmp, not left in /dev/shm
    proc = subprocess.Popen([sys.executable, "-m", "greenq.worker", "-A", "resource_tasks", "--pool", "gevent",
                             "-c", "4", "--prefetch", "4", "--processes", "2"], env=env, cwd=tmp,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while len([n for n in os.listdir(markers) if n.startswith("ready-")]) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.stdout else ""
            time.sleep(0.05)
        os.environ.update({k: v for k, v in env.items() if k.startswith(("GREENQ_", "E2E_"))})
        if E2E not in sys.path:
            sys.path[:0] = [E2E, ROOT]
        from greenq.config import load
        import resource_tasks
        app = resource_tasks.app
        app.close()
        app.config = load(search=False, env={k: v for k, v in env.items() if k.startswith("GREENQ_")})
        app._codec = None
        sent = [app.tasks["res.db"].delay(n, seconds) for n in range(tasks)]
        assert [r.get(timeout=300) for r in sent] == list(range(tasks))
        app.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
        import redis
        client = redis.Redis.from_url(URL)
        for key in client.scan_iter(f"{prefix}*"):
            client.delete(key)
        client.close()
    with open(os.path.join(markers, "permits.log")) as f:
        rows = [line.split() for line in f]
    shutil.rmtree(tmp)
    starts = [float(r[3]) for r in rows if r[0] == "start"]
    ends = [float(r[3]) for r in rows if r[0] == "end"]
    wall = max(ends) - min(starts)
    per: dict = {}
    for r in rows:
        if r[0] == "start":
            per[r[1]] = per.get(r[1], 0) + 1
    events = sorted((float(r[3]), r[0]) for r in rows)
    gaps = sorted(b[0] - a[0] for a, b in zip(events, events[1:]) if a[1] == "end" and b[1] == "start")
    return (f"tasks {tasks} x {seconds * 1000:.0f} ms: wall {wall:.2f} s, utilisation "
            f"{(sum(ends) - sum(starts)) / wall:.0%}, per process {sorted(per.values())}, gaps end->start "
            f"sum {sum(gaps):.2f} s max {gaps[-1]:.3f} s, load {os.getloadavg()[0]:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=0.02)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    for _ in range(args.runs):
        print(one_run(args.tasks, args.seconds), flush=True)


if __name__ == "__main__":
    main()
