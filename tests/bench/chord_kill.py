"""A 1,000-member chord on two workers, one of them killed with SIGKILL twice
mid-way (and restarted after the first kill), on SQLite and Redis (issue 11).

    python tests/bench/chord_kill.py [sqlite|redis ...] [--members 1000]

Prints, per broker: how many times the callback ran (must be 1), its result,
how many member runs there were (above the member count: members that ran
again after their worker died before the ack), and the time taken.
Redis: 127.0.0.1:6379 db 13 under a key prefix of its own, deleted after.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
E2E = ROOT / "tests" / "e2e"


def count(path: Path) -> int:
    return len(path.read_text().split()) if path.exists() else 0


def run(kind: str, members: int, seconds: float) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix=f"chord-kill-{kind}-"))
    markers = tmp / "markers"
    markers.mkdir()
    prefix = f"chordkill-{uuid.uuid4().hex[:8]}"
    url = f"sqlite:///{tmp / 'broker.sqlite3'}" if kind == "sqlite" else "redis://127.0.0.1:6379/13"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GREENQ_")}
    env.update(GREENQ_BROKER_URL=url, GREENQ_KEY_PREFIX=prefix, GREENQ_LEASE_SECONDS="2",
               E2E_MARKERS=str(markers), PYTHONPATH=os.pathsep.join([str(E2E), str(ROOT)]),
               GREENQ_WORKER_LOGLEVEL="WARNING", GREENQ_WORKER_BLOCKING_THRESHOLD="0")
    os.environ.update({k: v for k, v in env.items() if k.startswith("GREENQ_") or k == "E2E_MARKERS"})
    sys.path[:0] = [str(E2E), str(ROOT)]
    import e2e_tasks as t
    from greenq import chord
    from greenq.config import load
    t.app.close()
    t.app.config = load(search=False, env={k: v for k, v in env.items() if k.startswith("GREENQ_")})
    t.app._codec = None

    def worker() -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "greenq.worker", "-A", "e2e_tasks", "-c", "20"],
                                cwd=tmp, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    started = time.monotonic()
    result = chord((t.chord_member.s(i, seconds) for i in range(members)), t.chord_callback.s()).delay()
    victim, survivor = worker(), worker()
    member_marks = markers / "chord_member"
    kills = []
    for fraction in (0.3, 0.6):
        while count(member_marks) < members * fraction:
            time.sleep(0.01)
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        kills.append(count(member_marks))
        victim = worker()
    value = result.get(timeout=300)
    elapsed = time.monotonic() - started
    time.sleep(1.0)            # a second callback, were there one, would have run by now
    for proc in (victim, survivor):
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    if kind == "redis":
        import redis
        client = redis.Redis.from_url(url)
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
    return {"broker": kind, "callbacks": count(markers / "chord_callback"), "result": value,
            "expected": [members, sum(range(members))], "member_runs": count(member_marks),
            "killed_at_member_runs": kills, "seconds": round(elapsed, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("brokers", nargs="*", default=["sqlite", "redis"])
    parser.add_argument("--members", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=0.02, help="each member's sleep")
    args = parser.parse_args()
    for kind in args.brokers:
        print(run(kind, args.members, args.seconds), flush=True)


if __name__ == "__main__":
    main()
