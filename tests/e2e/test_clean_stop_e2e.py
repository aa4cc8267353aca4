"""Clean stops on every broker (issue 7, deliverable 4): at SIGTERM the worker
stops receiving at once, and the messages it held but never started are back
in the queue as soon as it exits (not at lease expiry), with their delivery
count not raised."""
from __future__ import annotations

import signal
import time


def test_warm_stop_returns_held_unstarted_messages_at_once(pool, any_env):
    import e2e_tasks
    app = any_env.app()
    queue = app.config.default_queue
    slow = e2e_tasks.slow.delay("stop", 1.0)
    waiting = [e2e_tasks.add.delay(i, i) for i in range(6)]
    proc = any_env.worker(pool, "-c", "1", "--prefetch", "7", burst=False)
    any_env.wait_marker("stop.started", timeout=30)
    proc.send_signal(signal.SIGTERM)
    more = [e2e_tasks.add.delay(i, 100) for i in range(5)]   # sent during the warm stop: not taken
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert slow.get(timeout=5) == "stop"
    broker = app.broker
    broker.declare([queue])
    start = time.monotonic()
    got = []
    while len(got) < 11 and time.monotonic() - start < 5:
        got.extend(broker.fetch([queue], 20, 0.5))
    elapsed = time.monotonic() - start
    counts = sorted(d.deliveries for d in got)
    broker.stop_consuming()             # (AMQP: or this consumer would take them straight back)
    broker.requeue(got, started=False)
    assert len(got) == 11 - sum(r.ready() for r in waiting), (len(got), out)
    assert elapsed < 4, f"held messages came back only after {elapsed:.1f} s (the lease is 30 s)"
    assert counts == [1] * len(got), f"delivery counts raised by an unstarted return: {counts}\n{out}"
    code, out = any_env.run_worker(pool)
    assert code == 0, out
    assert [r.get(timeout=10) for r in waiting] == [2 * i for i in range(6)]
    assert [r.get(timeout=10) for r in more] == [i + 100 for i in range(5)]
