"""The limit of the ``limit`` scenario: the benchmark's task body
(``bench_bodies.incr_setnx``: one INCR and one SETNX on Redis) called N times
by C greenlets in a gevent process of its own, with no queue at all.

    python bench_limit.py N C

Environment: ``BENCH_BODY_REDIS_URL`` (the body's Redis) and
``BENCH_CONCURRENCY`` (its connection pool: C + 20), as in the workers.  Each
greenlet calls the body until N calls were started; the span runs from the
first call's start to the last call's end, and no connection is opened before
it (a worker opens its connections during its drain too).  The last line
printed is one JSON object: calls/s and the process's CPU time per call.
"""
from gevent import monkey

monkey.patch_all()

import json  # noqa: E402 - after patching, as in a worker
import sys  # noqa: E402
import time  # noqa: E402

import gevent  # noqa: E402

import bench_bodies as bodies  # noqa: E402


def run(n: int, concurrency: int) -> dict:
    body = bodies.incr_setnx
    left = [n]

    def loop() -> None:
        while left[0] > 0:
            left[0] -= 1
            body()

    cpu0, start = time.process_time(), time.monotonic()
    gevent.joinall([gevent.spawn(loop) for _ in range(concurrency)], raise_error=True)
    end, cpu1 = time.monotonic(), time.process_time()
    seconds = end - start
    return {"n": n, "concurrency": concurrency, "first_start": start, "last_end": end,
            "seconds": seconds, "rate": n / seconds if seconds > 0 else None,
            "cpu_seconds": cpu1 - cpu0, "cpu_us_per_call": (cpu1 - cpu0) * 1e6 / n}


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    n, concurrency = int(args[0]), int(args[1])
    if n < 1 or concurrency < 1:
        print("bench_limit.py: N and C must be at least 1", file=sys.stderr)
        return 2
    print(json.dumps(run(n, concurrency)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
