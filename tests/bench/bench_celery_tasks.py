"""Celery 5 side of the benchmark: the shared bodies as Celery tasks, run by
``celery worker -P gevent``.

Settings are Celery's defaults except:
- ``task_acks_late``: ack after the task ran, the at-least-once delivery
  greenq and dramatiq give by default;
- Redis connection pools sized from the concurrency (``BENCH_CONCURRENCY``):
  with acks_late every green thread acks on its own, and kombu's default of
  10 connections (redis-py >= 6 caps even an unsized pool at 100) fails with
  "Too many connections" under -P gevent;
- on RabbitMQ, ``confirm_publish`` when ``BENCH_CONFIRM=1``.
A result backend is configured only for the round trip (``BENCH_RESULTS=1``):
``BENCH_BACKEND_URL``, Redis db 14 on Redis runs, ``rpc://`` on RabbitMQ.  With
one configured, Celery -P gevent builds a new backend object in every task's
greenlet (``app.backend`` is thread-local), which costs a third of its no-op
throughput even for tasks that ignore their result; the drains are run
without one, Celery's best case.
"""
import os

from celery import Celery

import bench_bodies as bodies

broker_url = os.environ["BENCH_BROKER_URL"]
backend_url = os.environ.get("BENCH_BACKEND_URL") if os.environ.get("BENCH_RESULTS") == "1" else None
app = Celery("bench", broker=broker_url, backend=backend_url or None)
pool_size = int(os.environ.get("BENCH_CONCURRENCY") or 100) + 20
app.conf.update(
    task_acks_late=os.environ.get("BENCH_CELERY_ACKS", "late") == "late",
    broker_connection_retry_on_startup=True,
    redis_max_connections=pool_size,
)
if broker_url.startswith(("amqp", "pyamqp")):
    app.conf.broker_transport_options = {"confirm_publish": os.environ.get("BENCH_CONFIRM") == "1"}
else:
    app.conf.broker_transport_options = {"max_connections": pool_size}

noop = app.task(name="bench.noop", ignore_result=True)(bodies.counted(bodies.noop))
sleep = app.task(name="bench.sleep", ignore_result=True)(bodies.counted(bodies.sleep))
echo = app.task(name="bench.echo")(bodies.counted(bodies.echo))
incr = app.task(name="bench.incr", ignore_result=True)(bodies.counted(bodies.incr_setnx))


def send(task, *args):
    task.delay(*args)


def send_many(task, arglists):
    """Celery has no bulk publish: a loop over one producer connection."""
    with app.producer_or_acquire() as producer:
        for args in arglists:
            task.apply_async(args, producer=producer)


def round_trip(value, timeout):
    return echo.delay(value).get(timeout=timeout)


def left():
    """Messages still in the broker (ready or unacknowledged), after the worker stopped."""
    with app.connection_for_write() as conn:
        if broker_url.startswith("redis"):
            client = conn.default_channel.client
            return client.llen("celery") + client.hlen("unacked")
        return conn.default_channel.queue_declare("celery", passive=True).message_count
