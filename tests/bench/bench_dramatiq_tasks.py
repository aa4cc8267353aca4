"""dramatiq side of the benchmark: the shared bodies as dramatiq actors, run
by ``dramatiq-gevent --processes 1 --threads C``.

dramatiq's default middleware, plus the Results middleware for the round trip
only (``BENCH_RESULTS=1``); dramatiq has no AMQP result backend, so results go
to Redis (``BENCH_BACKEND_URL``, db 14) on both brokers.  On RabbitMQ,
``BENCH_CONFIRM=1`` turns on ``confirm_delivery``.  Redis connection pools are
sized from the concurrency (``BENCH_CONCURRENCY``): each green thread acks on
its own connection, and redis-py >= 6 caps a pool at 100 by default.
"""
import os

import dramatiq
import redis
from dramatiq.results import Results
from dramatiq.results.backends import RedisBackend

import bench_bodies as bodies

broker_url = os.environ["BENCH_BROKER_URL"]
pool_size = int(os.environ.get("BENCH_CONCURRENCY") or 100) + 20
if broker_url.startswith("redis"):
    from dramatiq.brokers.redis import RedisBroker
    broker = RedisBroker(connection_pool=redis.ConnectionPool.from_url(broker_url, max_connections=pool_size))
else:
    from dramatiq.brokers.rabbitmq import RabbitmqBroker
    broker = RabbitmqBroker(url=broker_url, confirm_delivery=os.environ.get("BENCH_CONFIRM") == "1")
if os.environ.get("BENCH_RESULTS") == "1":
    results_pool = redis.ConnectionPool.from_url(os.environ["BENCH_BACKEND_URL"], max_connections=pool_size)
    broker.add_middleware(Results(backend=RedisBackend(connection_pool=results_pool)))
dramatiq.set_broker(broker)

noop = dramatiq.actor(bodies.counted(bodies.noop), actor_name="bench_noop")
sleep = dramatiq.actor(bodies.counted(bodies.sleep), actor_name="bench_sleep")
echo = dramatiq.actor(bodies.counted(bodies.echo), actor_name="bench_echo",
                      **({"store_results": True} if os.environ.get("BENCH_RESULTS") == "1" else {}))
incr = dramatiq.actor(bodies.counted(bodies.incr_setnx), actor_name="bench_incr")


def send(task, *args):
    task.send(*args)


def send_many(task, arglists):
    """dramatiq has no bulk publish: a loop."""
    for args in arglists:
        task.send(*args)


def round_trip(value, timeout):
    return echo.send(value).get_result(block=True, timeout=int(timeout * 1000))


def left():
    """Messages still in the broker (queued, delayed, unacknowledged or dead)."""
    if broker_url.startswith("redis"):
        client = broker.client
        return sum(client.hlen(f"dramatiq:default{suffix}.msgs") for suffix in ("", ".DQ", ".XQ"))
    return sum(broker.get_queue_message_counts("default"))
