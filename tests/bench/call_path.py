"""The path of ``add.delay(2, 3)`` to ``get()`` through greenq's modules.

Runs one task end to end in one process against a real broker (a client
sends it, a burst ``Worker`` on the threads driver runs it, the client gets
the result) under ``sys.setprofile``, and counts the greenq modules entered
and the distinct calls from a function of one greenq module to a function of
another.  The first run of each path (imports, connections, script loads) is
not counted: the figures are those of a warm second call, the one every
request pays.

    python tests/bench/call_path.py [--broker redis://127.0.0.1:6379/15] [--list]

Prints ``modules N calls M`` for the client (delay + get) and the worker
side, and with --list every module and call.  Issue 19's closing note gives
the figures before and after the transports move.
"""
from __future__ import annotations

import argparse
import sys
import threading
import uuid


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--broker", default="redis://127.0.0.1:6379/15")
    parser.add_argument("--list", action="store_true")
    args = parser.parse_args()

    from greenq import GreenQ
    from greenq.drivers import get_driver
    from greenq.worker.consumer import Worker

    prefix = "gqpath-" + uuid.uuid4().hex[:8]
    app = GreenQ(broker=args.broker, key_prefix=prefix, config_file=False)

    @app.task(name="path.add")
    def add(x: int, y: int) -> int:
        return x + y

    edges = {"client": set(), "worker": set()}
    modules = {"client": set(), "worker": set()}
    counting = [False]
    main_thread = threading.get_ident()

    def profile(frame, event, arg):
        if event != "call" or not counting[0]:
            return
        where = "client" if threading.get_ident() == main_thread else "worker"
        callee = frame.f_globals.get("__name__", "")
        if not callee.startswith("greenq"):
            return
        modules[where].add(callee)
        caller = frame.f_back
        while caller is not None and not caller.f_globals.get("__name__", "").startswith("greenq"):
            caller = caller.f_back   # through the standard library and drivers to greenq's caller
        if caller is None:
            return
        caller_mod = caller.f_globals.get("__name__", "")
        if caller_mod != callee:
            edges[where].add((f"{caller_mod}.{caller.f_code.co_name}", f"{callee}.{frame.f_code.co_name}"))

    # a running worker (threads driver), warmed by one task; then one task counted
    worker = Worker(app, get_driver("threads"), queues=["default"], concurrency=1, fetch_timeout=0.2)
    threading.setprofile(profile)
    sys.setprofile(profile)
    runner = threading.Thread(target=worker.run, daemon=True)
    runner.start()
    try:
        assert add.delay(2, 3).get(timeout=10) == 5
        counting[0] = True
        assert add.delay(2, 3).get(timeout=10) == 5
        counting[0] = False
    finally:
        sys.setprofile(None)
        threading.setprofile(None)
        worker.request_stop() if hasattr(worker, "request_stop") else worker.stop()
        runner.join(10)
        _clean(args.broker, prefix)
    for where in ("client", "worker"):
        print(f"{where}: modules {len(modules[where])} calls {len(edges[where])}")
        if args.list:
            for m in sorted(modules[where]):
                print("  module", m)
            for a, b in sorted(edges[where]):
                print("  call", a, "->", b)
    both_m = modules["client"] | modules["worker"]
    both_e = edges["client"] | edges["worker"]
    print(f"total: modules {len(both_m)} calls {len(both_e)}")
    return 0


def _clean(url: str, prefix: str) -> None:
    """Delete what the run made: its Redis keys, or its RabbitMQ queues and
    exchanges (listed by rabbitmqctl, all named ``<prefix>.*``)."""
    if url.startswith(("amqp", "pyamqp")):
        import subprocess
        import amqp
        from greenq.transports.amqp.common import connection_params
        names = {}
        for kind in ("queues", "exchanges"):
            listed = subprocess.run(["rabbitmqctl", "-q", f"list_{kind}", "name"], capture_output=True,
                                    text=True, timeout=60).stdout.split()
            names[kind] = [n for n in listed if n.startswith(prefix + ".")]
        conn = amqp.Connection(**connection_params(url))
        conn.connect()
        try:
            channel = conn.channel()
            for name in names["queues"]:
                channel.queue_delete(name)
            for name in names["exchanges"]:
                channel.exchange_delete(name)
        finally:
            conn.close()
    if url.startswith("redis"):
        import redis
        client = redis.Redis.from_url(url)
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        if keys:
            client.delete(*keys)


if __name__ == "__main__":
    sys.exit(main())
