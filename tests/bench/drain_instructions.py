"""Instructions per no-op task of an in-process gevent worker on Redis, the
worker's process only (issue 22, item 3; docs/performance.md):

    python tests/bench/drain_instructions.py [--root PATH] [--small 1000] [--large 4000]
        [--redis redis://127.0.0.1:6379/15]

Runs itself twice under ``valgrind --tool=callgrind``: each run enqueues N
no-op tasks (``ignore_result``) from a child process that is not traced,
then drains them with a worker built as ``greenq-worker`` builds it
(``build_worker``: control agent and heartbeats on, ``-c 100``, ``--burst``)
and deletes its keys (a key prefix of its own).  Instructions per task =
(total at LARGE - total at SMALL) / (LARGE - SMALL): start-up, imports and
the burst's stop cancel out.  ``--root`` runs the worker from another
checkout of greenq (``git archive REV greenq | tar -x -C DIR``).  Unlike
``bin/greenq-bench --instructions`` it needs no lock on the shared db 14.
"""
import argparse
import os
import re
import subprocess
import sys
import uuid


def _app(redis_url, tag):
    from greenq import GreenQ
    app = GreenQ("bench", broker=redis_url)
    app.config.set("greenq", "key_prefix", tag, origin="drain_instructions")

    def noop(*args):
        return None
    return app, app.task(name="bench.noop", ignore_result=True)(noop)


def enqueue(redis_url, tag, n):
    app, noop = _app(redis_url, tag)
    for start in range(0, n, 1000):
        app.enqueue_many([noop.s() for _ in range(min(1000, n - start))])


def drain(redis_url, n):
    from gevent import monkey
    monkey.patch_all()
    from greenq.cli.worker import build_worker
    from greenq.drivers import get_driver
    tag = "drainbench" + uuid.uuid4().hex[:8]
    subprocess.run([sys.executable, __file__, "--enqueue", tag, str(n), "--redis", redis_url], check=True)
    app, _ = _app(redis_url, tag)
    worker = build_worker(app, get_driver("gevent"), queues=["default"], concurrency=100, burst=True)
    try:
        worker.run()
        assert worker.stats.succeeded == n, worker.stats.as_dict()
    finally:
        import redis
        client = redis.Redis.from_url(redis_url)
        keys = list(client.scan_iter(match=f"{tag}*", count=1000))
        for start in range(0, len(keys), 1000):
            client.delete(*keys[start:start + 1000])
        client.close()


def count(root, n, redis_url):
    env = dict(os.environ, PYTHONPATH=os.path.abspath(root))
    done = subprocess.run(["valgrind", "--tool=callgrind", "--trace-children=no", "--callgrind-out-file=/dev/null",
                           sys.executable, os.path.abspath(__file__), "--drain", str(n), "--redis", redis_url],
                          env=env, capture_output=True, text=True, timeout=900)
    found = re.search(r"Collected : (\d+)", done.stderr)
    if done.returncode or not found:
        raise SystemExit(f"the drain of {n} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return int(found.group(1))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    parser.add_argument("--small", type=int, default=1000)
    parser.add_argument("--large", type=int, default=4000)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/15")
    parser.add_argument("--drain", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--enqueue", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.enqueue:
        return enqueue(args.redis, args.enqueue[0], int(args.enqueue[1]))
    if args.drain:
        return drain(args.redis, args.drain)
    small, large = count(args.root, args.small, args.redis), count(args.root, args.large, args.redis)
    print(f"{args.root}: {small:,} instructions at {args.small} tasks, {large:,} at {args.large}: "
          f"{(large - small) / (args.large - args.small):,.0f} per task")


if __name__ == "__main__":
    main()
