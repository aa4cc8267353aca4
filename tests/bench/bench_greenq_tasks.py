"""greenq side of the benchmark: the shared bodies as greenq tasks, and the
client calls the driver makes through them (see bench_client.py).

Configured from the environment the driver sets: ``BENCH_BROKER_URL``,
``BENCH_BACKEND_URL`` (empty: greenq derives it from the broker) and, on
RabbitMQ, ``GREENQ_AMQP_CONFIRM_PUBLISH``, read by greenq itself;
``GREENQ_TRACING=true`` (kept from the caller's environment) measures traced
runs, with the OpenTelemetry SDK recording and exporting nothing.
"""
import os

import bench_bodies as bodies
from greenq import GreenQ

if os.environ.get("GREENQ_TRACING", "").lower() in ("1", "true", "yes", "on"):
    # traced runs (docs/tracing.md): the OpenTelemetry SDK records every span
    # and exports none, so what is measured is greenq's and the SDK's work
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    trace.set_tracer_provider(TracerProvider())

app = GreenQ("bench", broker=os.environ["BENCH_BROKER_URL"],
             backend=os.environ.get("BENCH_BACKEND_URL") or None)

noop = app.task(name="bench.noop", ignore_result=True)(bodies.counted(bodies.noop))
sleep = app.task(name="bench.sleep", ignore_result=True)(bodies.counted(bodies.sleep))
echo = app.task(name="bench.echo")(bodies.counted(bodies.echo))
incr = app.task(name="bench.incr", ignore_result=True)(bodies.counted(bodies.incr_setnx))


def send(task, *args):
    """One message, one call: what users write."""
    task.delay(*args)


def send_many(task, arglists, chunk=1000):
    """Bulk publish, pipelined."""
    for start in range(0, len(arglists), chunk):
        app.enqueue_many([task.s(*args) for args in arglists[start:start + chunk]])


def round_trip(value, timeout):
    return echo.delay(value).get(timeout=timeout)


def left():
    """Messages still in the broker: ready, delayed, held or dead."""
    return sum(q.ready + q.delayed + q.held + q.dead for q in app.broker.queue_stats())
