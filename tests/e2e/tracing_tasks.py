"""Tasks for tests/e2e/test_tracing_e2e.py: a traced app ([greenq] tracing from
GREENQ_TRACING) whose processes export their spans, one JSON object a line, to
$TRACE_DIR/spans.<pid>.jsonl with the OpenTelemetry SDK (set up in
worker_process_init in a worker, by ``export_spans()`` in a client)."""
from __future__ import annotations

import json
import os

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

from greenq import GreenQ

app = GreenQ.from_config(name="traced")


class FileExporter(SpanExporter):
    """Each finished span as a JSON line (what the test compares)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def export(self, spans):
        with open(self.path, "a") as fh:
            for s in spans:
                fh.write(json.dumps({
                    "name": s.name, "kind": s.kind.name, "pid": os.getpid(),
                    "trace_id": f"{s.context.trace_id:032x}", "span_id": f"{s.context.span_id:016x}",
                    "parent": f"{s.parent.span_id:016x}" if s.parent else None,
                    "attributes": dict(s.attributes),
                    "links": [f"{link.context.span_id:016x}" for link in s.links]}) + "\n")
        return SpanExportResult.SUCCESS


def export_spans() -> None:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(
        FileExporter(os.path.join(os.environ["TRACE_DIR"], f"spans.{os.getpid()}.jsonl"))))
    trace.set_tracer_provider(provider)


@app.on("worker_process_init")
def tracing_init(worker):
    export_spans()


@app.task(name="traced.add")
def add(x, y):
    return x + y


@app.task(name="traced.total")
def total(values):
    return sum(values)
