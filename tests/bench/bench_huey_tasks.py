"""Huey side of the SQLite round-trip bench (tests/bench/sqlite_wakeup.py):
``SqliteHuey`` on the file ``BENCH_HUEY_DB``, one echo task.

``BENCH_HUEY_POLL=default`` keeps Huey's defaults (the consumer polls an
empty queue every 0.1 s growing to 10 s; ``Result.get(blocking=True)``
polls from 50 ms growing to 1 s); ``fast`` polls every millisecond on both
sides (consumer ``-d 0.001 -m 0.001 -b 1``, ``get(backoff=1, max_delay=0.001)``,
whose first pause is still Huey's fixed 50 ms): Huey has no wake-up, so
latency is bought with polling."""
import os

from huey import SqliteHuey

# BENCH_HUEY_FSYNC=1: Huey's default (SQLite's synchronous=full in WAL mode); 0: fsync=False (off)
huey = SqliteHuey("bench", filename=os.environ["BENCH_HUEY_DB"],
                  **({} if os.environ.get("BENCH_HUEY_FSYNC", "1") == "1" else {"fsync": False}))
FAST = os.environ.get("BENCH_HUEY_POLL") == "fast"


@huey.task()
def echo(value):
    return value


def round_trip(value, timeout):
    result = echo(value)
    if FAST:
        return result.get(blocking=True, timeout=timeout, backoff=1.0, max_delay=0.001)
    return result.get(blocking=True, timeout=timeout)
