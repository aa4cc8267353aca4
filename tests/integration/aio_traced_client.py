"""Run by test_aio_suite.py as ``python aio_traced_client.py BROKER_URL KEY_PREFIX QUEUE``:
the asyncio client with ``[greenq] tracing`` on (docs/tracing.md), the
OpenTelemetry SDK's in-memory exporter set up in this process of its own
(a tracer provider is set once per process).

Sends three tasks with ``adelay``, ``aapply_async`` and ``asend_task`` inside
a span of the caller's, then runs them with a burst worker (threads driver)
of the same broker, and prints one JSON line: per message, its ``send``
span's parent and whether its ``process`` span is that send's child.
"""
import asyncio
import json
import sys

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from greenq import GreenQ
from greenq.aio import aclose
from greenq.drivers import get_driver
from greenq.worker.consumer import Worker

URL, PREFIX, QUEUE = sys.argv[1:4]
EXPORTER = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(EXPORTER))
trace.set_tracer_provider(provider)


def make_app() -> GreenQ:
    app = GreenQ("aio-traced", broker=URL, config_file=False, key_prefix=PREFIX, default_queue=QUEUE,
                 tracing=True)

    @app.task(name="aio.add")
    def add(x, y):
        return x + y
    return app


client, worker_app = make_app(), make_app()


async def send():
    add = client.tasks["aio.add"]
    try:
        with trace.get_tracer("caller").start_as_current_span("request"):
            return [(await add.adelay(1, 2)).id, (await add.aapply_async((3, 4))).id,
                    (await client.asend_task("aio.add", (5, 6))).id]
    finally:
        await aclose(client)

ids = asyncio.run(send())
sent_before_worker = sorted(s.name for s in EXPORTER.get_finished_spans())
Worker(worker_app, get_driver("threads"), queues=[QUEUE], burst=True, concurrency=1, fetch_timeout=0.2).run()
spans = EXPORTER.get_finished_spans()
names = {s.context.span_id: s.name for s in spans}
seen = {}
for task_id in ids:
    sends = [s for s in spans if s.kind == SpanKind.PRODUCER and s.attributes["messaging.message.id"] == task_id]
    runs = [s for s in spans if s.kind == SpanKind.CONSUMER and s.attributes["messaging.message.id"] == task_id]
    seen[task_id] = {
        "sends": [s.name for s in sends],
        "send_parent": names.get(sends[0].parent.span_id) if sends and sends[0].parent else None,
        "run_under_send": len(runs) == 1 and len(sends) == 1 and runs[0].parent is not None
        and runs[0].parent.span_id == sends[0].context.span_id,
    }
client.close()
worker_app.close()
print(json.dumps({"before_worker": sent_before_worker, "messages": list(seen.values()),
                  "traces": len({s.context.trace_id for s in spans})}))
