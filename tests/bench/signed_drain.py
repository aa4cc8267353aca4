"""What signing costs per task that stores its result: a client enqueues N
tasks that return their argument, an in-process worker (threads driver) on
Redis runs them and stores each result, signed when $BENCH_KEY is set.

Run it under callgrind with two N; the difference of the totals divided by
the difference of N is the instructions per task, repeatable whatever else
the machine does (docs/protocol.md, "What signing costs")::

    for n in 300 1500; do
      BENCH_KEY=k valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
          python tests/bench/signed_drain.py $n 2>&1 | grep Collected
    done

The keys it writes (Redis database 13, a prefix of its own) are deleted.
"""
import os
import sys
import uuid

import redis

from greenq import GreenQ
from greenq.drivers import get_driver
from greenq.worker.consumer import Worker

URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/13")


def main(n: int) -> None:
    prefix = f"signbench-{uuid.uuid4().hex[:6]}"
    app = GreenQ("b", broker=URL, key_prefix=prefix, signing_key=os.environ.get("BENCH_KEY", ""),
                 config_file=False)
    echo = app.task(name="b.echo")(lambda x: x)
    try:
        for start in range(0, n, 500):
            app.enqueue_many([echo.s(i) for i in range(start, min(n, start + 500))])
        assert Worker(app, get_driver("threads"), queues=["default"], concurrency=20, burst=True,
                      fetch_timeout=0.1).run() == 0
    finally:
        client = redis.Redis.from_url(URL)
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)


if __name__ == "__main__":
    main(int(sys.argv[1]))
