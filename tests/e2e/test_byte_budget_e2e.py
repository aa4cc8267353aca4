"""Oversized messages from a non-greenq producer (issue 17, item 14).

A producer that is not greenq writes messages far over ``max_message_size``
straight into the real broker (a Redis stream entry, a RabbitMQ message, a
SQLite row), interleaved with good tasks sent by greenq.  A real ``-c 10
--burst`` worker must run every good task, dead-letter each big one with the
reason and its original size, keeping only a preview, and never read the big
bodies whole: its peak RSS (the kernel's high-water mark VmHWM, read until
it exits) stays within a few MiB of the same worker's run without them.
Before the fix, the worker fetched them whole, a batch at a time, and its peak
grew by about the size of that batch (tens of MiB here).
"""
from __future__ import annotations

import os
import sqlite3
import threading
import time

import pytest

from greenq.brokers.base import PREVIEW_BYTES

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmHWM (Linux)")]

LIMIT = 64 * 1024                 # max_message_size of the run
BIG = 4 * 1024 * 1024             # each oversized body: 64 times the limit
N_BIG, N_GOOD = 12, 20
#: the peak RSS a run with the big messages may add to the run without them.
#: Reading them whole, the old code grew by 55-65 MiB here.
RSS_MARGIN = 16 * 1024 * 1024


def big_body(i: int) -> bytes:
    head = b"BIG-%02d:" % i
    return head + bytes([65 + i]) * (BIG - len(head))


def write_big(env, app, i: int, body: bytes) -> None:
    """Write one oversized message into the broker as another program would."""
    if env.kind == "redis":
        import redis
        client = redis.Redis.from_url(env.broker_url)
        client.xadd(f"{env.env['GREENQ_KEY_PREFIX']}:q:default:0", {"b": body, "m": f"big-{i}"})
        client.close()
    elif env.kind == "amqp":
        import amqp
        from greenq.transports.amqp.common import connection_params
        conn = amqp.Connection(**connection_params(env.broker_url))
        conn.connect()
        try:
            channel = conn.channel()
            queue = f"{env.env['GREENQ_KEY_PREFIX']}.{env.env['GREENQ_DEFAULT_QUEUE']}"   # P.<q>
            channel.basic_publish(amqp.Message(body, message_id=f"big-{i}", delivery_mode=2), "", queue)
            channel.queue_declare(queue, passive=True)   # routed
        finally:
            conn.close()
    else:
        with sqlite3.connect(env.broker_url[len("sqlite:///"):]) as db:
            db.execute("INSERT INTO messages (queue, priority, visible_at, message_id, body) "
                       "VALUES (?, 0, ?, ?, ?)", ("default", time.time(), f"big-{i}", body))


def peak_rss(pid: int) -> int:
    """The process's peak RSS so far, in bytes (Linux: VmHWM, kept per address
    space and so, unlike ``ru_maxrss``, not inherited from the parent that
    forked it)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0                        # exiting: its memory is gone already


def peak_rss_run(env, pool: str, timeout: float = 120) -> "tuple[int, str, int]":
    """Run a ``-c 10 --burst`` worker to its end: (exit code, output, peak RSS
    in bytes, as last read before it exited; VmHWM only grows)."""
    proc = env.worker(pool, "-c", "10")
    out: list = []
    reader = threading.Thread(target=lambda: out.append(proc.stdout.read()), daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout
    peak = 0
    while proc.poll() is None:
        try:
            peak = max(peak, peak_rss(proc.pid))
        except (OSError, ValueError):   # exiting: the last reading stands
            pass
        if time.monotonic() > deadline:
            proc.kill()
            reader.join(10)
            raise AssertionError(f"worker still running after {timeout} s; it said:\n"
                                 f"{(out[0] if out else '')[-6000:]}")
        time.sleep(0.02)
    reader.join(10)
    return proc.returncode, out[0] if out else "", peak


def test_oversized_messages_are_dead_lettered_by_their_head(pool, any_env):
    import e2e_tasks
    env = any_env
    env.env["GREENQ_MAX_MESSAGE_SIZE"] = str(LIMIT)
    app = env.app()
    queue = env.env.get("GREENQ_DEFAULT_QUEUE", "default")
    app.broker.declare([queue])

    warm = [e2e_tasks.add.delay(i, 1) for i in range(N_GOOD)]     # the run without big messages
    code, out, baseline = peak_rss_run(env, pool)
    assert code == 0, out[-3000:]
    assert [r.get(timeout=30) for r in warm] == [i + 1 for i in range(N_GOOD)]

    good = []
    for i in range(N_GOOD):                   # big and good alternate, then the rest of the good
        if i < N_BIG:
            write_big(env, app, i, big_body(i))
        good.append(e2e_tasks.add.delay(i, 2))
    code, out, peak = peak_rss_run(env, pool)
    assert code == 0, out[-3000:]
    assert [r.get(timeout=30) for r in good] == [i + 2 for i in range(N_GOOD)]

    print(f"{env.kind}: peak RSS {baseline / 2**20:.1f} MiB without the big messages, "
          f"{peak / 2**20:.1f} MiB with {N_BIG} x {BIG // 2**20} MiB")
    dead = {d.message_id: d for d in app.broker.dlq_list(1000) if d.queue == queue}
    try:
        assert sorted(dead) == sorted(f"big-{i}" for i in range(N_BIG)), out[-3000:]
        for i in range(N_BIG):
            d = dead[f"big-{i}"]
            assert d.reason.startswith(f"message is {BIG} bytes, over max_message_size {LIMIT}"), d.reason
            assert bytes(d.body) == big_body(i)[:PREVIEW_BYTES]      # a preview, not the body
        stats = app.broker.queue_stats([queue])[0]
        assert (stats.ready, stats.held) == (0, 0)
    finally:
        app.broker.dlq_purge()   # the amqp run's vhost is shared
    assert peak - baseline < RSS_MARGIN, (
        f"peak RSS grew by {(peak - baseline) / 2**20:.1f} MiB with {N_BIG} oversized messages")
