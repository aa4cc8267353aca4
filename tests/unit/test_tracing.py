"""OpenTelemetry traces ([greenq] tracing, docs/tracing.md) with the real SDK:
in-memory span exporter and metric reader, memory:// broker, in-process
burst workers with the threads driver.  The real worker process is
tests/e2e/test_tracing_e2e.py."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

import pytest

pytest.importorskip("opentelemetry.sdk", reason="the test extra installs opentelemetry-sdk")

from opentelemetry import metrics, trace  # noqa: E402
from opentelemetry.sdk.metrics import MeterProvider  # noqa: E402
from opentelemetry.sdk.metrics.export import InMemoryMetricReader  # noqa: E402
from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402
from opentelemetry.trace import SpanKind, StatusCode  # noqa: E402

from greenq import GreenQ, chain, chord, group  # noqa: E402
from greenq.drivers import get_driver  # noqa: E402
from greenq.exceptions import BrokerError  # noqa: E402
from greenq.message import Codec, TaskMessage  # noqa: E402
from greenq.worker.consumer import Worker  # noqa: E402

FETCH_TIMEOUT = 0.1
EXPORTER = InMemorySpanExporter()
READER = InMemoryMetricReader()


@pytest.fixture(autouse=True)
def sdk():
    """The SDK set up once per process (OpenTelemetry's providers are set once); spans cleared per test."""
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(EXPORTER))
        trace.set_tracer_provider(provider)
        metrics.set_meter_provider(MeterProvider(metric_readers=[READER]))
    assert isinstance(trace.get_tracer_provider(), TracerProvider), "another test set a tracer provider"
    EXPORTER.clear()
    yield EXPORTER


def make_app(**kw):
    kw.setdefault("tracing", True)
    return GreenQ("t", broker=f"memory://{time.monotonic_ns()}", config_file=False, eager=False, **kw)


def run_worker(app, **kw):
    kw.setdefault("concurrency", 1)
    kw.setdefault("fetch_timeout", FETCH_TIMEOUT)
    return Worker(app, get_driver("threads"), queues=["default"], burst=True, **kw).run()


def spans(kind=None, name=None):
    out = [s for s in EXPORTER.get_finished_spans() if (kind is None or s.kind == kind)
           and (name is None or s.name == name)]
    return sorted(out, key=lambda s: s.start_time)


def by_message(kind, message_id):
    found = [s for s in spans(kind) if s.attributes.get("messaging.message.id") == message_id]
    return sorted(found, key=lambda s: s.start_time)


def histogram_points(name="messaging.process.duration"):
    data = READER.get_metrics_data()
    points = []
    for resource in data.resource_metrics if data else ():
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name == name:
                    assert metric.unit == "s"
                    points.extend(metric.data.data_points)
    return points


def test_a_send_and_its_run_are_one_trace_with_the_messaging_attributes():
    app = make_app()

    @app.task
    def add(x, y):
        return x + y
    result = add.delay(2, 3)
    assert run_worker(app) == 0
    assert result.get(timeout=1) == 5
    (send,), (process,) = spans(SpanKind.PRODUCER), spans(SpanKind.CONSUMER)
    assert (send.name, process.name) == ("send default", "process default")
    assert process.context.trace_id == send.context.trace_id
    assert process.parent.span_id == send.context.span_id and send.parent is None
    common = {"messaging.system": "greenq", "messaging.destination.name": "default",
              "messaging.message.id": result.id, "messaging.greenq.task.name": add.name,
              "messaging.greenq.message.retry_count": 0, "messaging.message.conversation_id": result.id}
    assert dict(send.attributes) == {**common, "messaging.operation.type": "send",
                                     "messaging.operation.name": "send"}
    assert dict(process.attributes) == {**common, "messaging.operation.type": "process",
                                        "messaging.operation.name": "process",
                                        "messaging.greenq.message.delivery_count": 1,
                                        "messaging.greenq.task.state": "SUCCESS"}
    assert process.status.status_code == StatusCode.UNSET


def test_the_send_span_lasts_until_the_broker_has_the_message_or_failed_to_take_it(tmp_path):
    app = GreenQ("t", broker=f"sqlite:///{tmp_path / 'missing' / 'broker.sqlite3'}", config_file=False,
                 tracing=True)

    @app.task
    def add(x, y):
        return x + y
    with pytest.raises(BrokerError, match="unable to open database file"):
        add.delay(1, 2)
    (send,) = spans(SpanKind.PRODUCER)
    assert send.status.status_code == StatusCode.ERROR
    assert send.attributes["error.type"] == "BrokerError"
    assert [e.name for e in send.events] == ["exception"]
    assert "unable to open database file" in send.events[0].attributes["exception.message"]


def test_the_callers_span_is_the_parent_and_the_task_runs_under_its_consumer_span():
    app = make_app()
    inner = []

    @app.task
    def child():
        return "child"

    @app.task
    def parent():
        with trace.get_tracer("user").start_as_current_span("user work") as span:
            inner.append(span.get_span_context())
        return child.delay().id
    with trace.get_tracer("user").start_as_current_span("web request") as request_span:
        first = parent.delay()
    assert run_worker(app) == 0
    child_id = first.get(timeout=1)
    web = request_span.get_span_context()
    (send_parent,), (run_parent,) = by_message(SpanKind.PRODUCER, first.id), by_message(SpanKind.CONSUMER, first.id)
    (send_child,), (run_child,) = by_message(SpanKind.PRODUCER, child_id), by_message(SpanKind.CONSUMER, child_id)
    assert send_parent.parent.span_id == web.span_id
    assert run_parent.parent.span_id == send_parent.context.span_id
    (user,) = spans(name="user work")
    assert user.parent.span_id == run_parent.context.span_id       # current while the task runs
    assert send_child.parent.span_id == run_parent.context.span_id  # sent from inside the task
    assert run_child.parent.span_id == send_child.context.span_id
    assert {s.context.trace_id for s in spans()} == {web.trace_id}
    assert run_child.attributes["messaging.message.conversation_id"] == first.id


def test_a_failure_sets_the_error_status_and_the_duration_metric_says_so():
    app = make_app()

    @app.task
    def boom():
        raise KeyError("nope")

    @app.task
    def fine():
        return 1
    before = {tuple(sorted(p.attributes.items())): p.count for p in histogram_points()}
    bad, good = boom.delay(), fine.delay()
    assert run_worker(app) == 0
    assert bad.state == "FAILURE" and good.get(timeout=1) == 1
    (process,) = by_message(SpanKind.CONSUMER, bad.id)
    assert process.status.status_code == StatusCode.ERROR
    assert process.attributes["error.type"] == "KeyError"
    assert process.attributes["messaging.greenq.task.state"] == "FAILURE"
    assert [e.name for e in process.events] == ["exception"]
    after = {tuple(sorted(p.attributes.items())): p.count for p in histogram_points()}
    base = {"messaging.system": "greenq", "messaging.destination.name": "default",
            "messaging.operation.type": "process", "messaging.operation.name": "process"}
    failed, succeeded = tuple(sorted({**base, "error.type": "KeyError"}.items())), tuple(sorted(base.items()))
    assert after[failed] - before.get(failed, 0) == 1
    assert after[succeeded] - before.get(succeeded, 0) == 1


def test_a_retry_stays_in_the_trace_under_the_attempt_that_asked_for_it():
    app = make_app()

    @app.task(bind=True, max_retries=2)
    def flaky(self):
        if self.request.retries < 2:
            raise self.retry(countdown=0)
        return "third time"
    result = flaky.delay()
    assert run_worker(app) == 0
    assert result.get(timeout=1) == "third time"
    sends, runs = by_message(SpanKind.PRODUCER, result.id), by_message(SpanKind.CONSUMER, result.id)
    assert len(sends) == 3 and len(runs) == 3
    assert [s.attributes["messaging.greenq.message.retry_count"] for s in sends] == [0, 1, 2]
    assert [s.attributes["messaging.greenq.message.retry_count"] for s in runs] == [0, 1, 2]
    assert [s.attributes["messaging.greenq.task.state"] for s in runs] == ["RETRY", "RETRY", "SUCCESS"]
    assert [e.name for e in runs[0].events] == ["retry"]
    assert len({s.context.trace_id for s in sends + runs}) == 1
    for attempt in range(3):        # send, run, send (the retry, from the run), run...
        assert runs[attempt].parent.span_id == sends[attempt].context.span_id
        if attempt:
            assert sends[attempt].parent.span_id == runs[attempt - 1].context.span_id


def test_a_chain_is_one_trace_each_step_under_the_one_before():
    app = make_app()

    @app.task
    def add(x, y):
        return x + y
    result = chain(add.s(1, 2), add.s(3), add.s(4)).apply_async()
    assert run_worker(app) == 0
    assert result.get(timeout=1) == 10
    runs = spans(SpanKind.CONSUMER)
    sends = spans(SpanKind.PRODUCER)
    assert len(runs) == 3 and len(sends) == 3
    assert len({s.context.trace_id for s in runs + sends}) == 1
    ids = [s.attributes["messaging.message.id"] for s in runs]
    assert ids[-1] == result.id
    for step in (1, 2):   # step N's send span is a child of step N-1's run
        (send,) = by_message(SpanKind.PRODUCER, ids[step])
        assert send.parent.span_id == runs[step - 1].context.span_id
        assert runs[step].parent.span_id == send.context.span_id


def test_a_group_sent_under_a_span_is_one_trace():
    app = make_app()

    @app.task
    def double(x):
        return 2 * x
    with trace.get_tracer("user").start_as_current_span("batch") as batch:
        result = group(double.s(i) for i in range(3)).apply_async()
    assert run_worker(app) == 0
    assert result.get(timeout=1) == [0, 2, 4]
    assert len(spans(SpanKind.PRODUCER)) == 3 and len(spans(SpanKind.CONSUMER)) == 3
    assert {s.context.trace_id for s in spans()} == {batch.get_span_context().trace_id}
    assert all(s.attributes["messaging.greenq.group.id"] == result.id for s in spans(SpanKind.CONSUMER))


def chord_trace():
    """The trace of a chord's run, one line per span, in start order (for reading)."""
    names = {s.context.span_id: s.name for s in spans()}
    lines = []
    for s in spans():
        parent = names.get(s.parent.span_id, "-") if s.parent else "-"
        lines.append(f"{s.name:<16} {s.kind.name:<9} id={s.context.span_id:016x} parent={parent:<16} "
                     f"task={s.attributes.get('messaging.greenq.task.name', '').rsplit('.', 1)[-1]} "
                     f"links={[f'{link.context.span_id:016x}' for link in s.links]}")
    return "\n".join(lines)


def test_a_chords_callback_is_linked_to_its_members():
    app = make_app()

    @app.task
    def square(x):
        return x * x

    @app.task
    def total(values):
        return sum(values)
    with trace.get_tracer("user").start_as_current_span("report") as report:
        result = chord([square.s(i) for i in range(1, 4)], total.s()).apply_async()
    assert run_worker(app) == 0
    assert result.get(timeout=1) == 14
    print(chord_trace())
    member_sends = [s for s in spans(SpanKind.PRODUCER) if s.attributes["messaging.greenq.task.name"] == square.name]
    assert len(member_sends) == 3 and all(s.name == "send default" for s in member_sends)
    member_contexts = {(s.context.trace_id, s.context.span_id) for s in member_sends}
    (callback_send,) = by_message(SpanKind.PRODUCER, result.id)
    (callback_run,) = by_message(SpanKind.CONSUMER, result.id)
    for span in (callback_send, callback_run):
        assert {(link.context.trace_id, link.context.span_id) for link in span.links} == member_contexts
    member_runs = [s for s in spans(SpanKind.CONSUMER) if s.attributes["messaging.greenq.task.name"] == square.name]
    assert callback_send.parent.span_id in {s.context.span_id for s in member_runs}   # sent by the last member
    assert callback_run.parent.span_id == callback_send.context.span_id
    assert {s.context.trace_id for s in spans()} == {report.get_span_context().trace_id}


def test_the_trace_field_travels_signed_and_a_bad_one_is_dropped():
    signed = Codec(signing_key="k")
    carrier = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
    msg = TaskMessage("t.add", [1], trace=carrier)
    plain = signed.encode(msg)
    assert b"trace" not in plain                              # untraced: the envelope is unchanged
    from greenq.message import TRACED_FIELDS
    data = signed.encode(msg, TRACED_FIELDS)
    assert signed.decode(data).trace == carrier
    env = json.loads(data)
    env["trace"]["traceparent"] = "00-" + "1" * 32 + "-" + "2" * 16 + "-01"
    with pytest.raises(Exception, match="forged"):              # the signature covers it
        signed.decode(json.dumps(env).encode())
    codec = Codec()
    for bad in ("text", {"traceparent": 5}, {"links": "x"}, {"links": [1]}, {str(i): "" for i in range(17)}):
        env = json.loads(codec.encode(msg))
        env["trace"] = bad
        back = codec.decode(json.dumps(env).encode())
        assert back.trace is None and back.args == [1]             # the task runs, untraced


def test_a_worker_without_tracing_runs_a_traced_message():
    client, worker_app = make_app(), None

    @client.task(name="t.add")
    def add(x, y):
        return x + y
    result = add.delay(1, 2)
    worker_app = GreenQ("t", broker=client.config.broker_url, config_file=False)
    worker_app.task(name="t.add")(lambda x, y: x + y)
    EXPORTER.clear()
    assert run_worker(worker_app) == 0
    assert result.get(timeout=1) == 3
    assert spans() == []


OFF_SCRIPT = textwrap.dedent("""
    import sys, time
    block = sys.argv[1] == "block"
    if block:
        sys.modules["greenq.tracing"] = None    # import of it fails: "absent"
    from greenq import GreenQ
    from greenq.drivers import get_driver
    from greenq.worker.consumer import Worker
    app = GreenQ("t", broker="memory://off", config_file=False)

    @app.task
    def add(x, y):
        return x + y
    add.delay(0, 0)                              # first call: connections, caches
    calls, where = [0], set()

    def profile(frame, event, arg):
        if event == "call":
            calls[0] += 1
            where.add(frame.f_code.co_filename)
    sys.setprofile(profile)
    for i in range(5):
        add.delay(i, i)
    sys.setprofile(None)
    delay_calls = calls[0]
    import threading
    threading.setprofile(profile)
    sys.setprofile(profile)
    Worker(app, get_driver("threads"), queues=["default"], burst=True, concurrency=1, fetch_timeout=0.1).run()
    sys.setprofile(None)
    threading.setprofile(None)
    otel = sorted(m for m, module in sys.modules.items()
                  if module is not None and (m.startswith("opentelemetry") or m == "greenq.tracing"))
    traced = sorted(f for f in where if "opentelemetry" in f or f.endswith("tracing.py"))
    print(delay_calls, len(otel), len(traced))
""")


def test_off_imports_nothing_and_calls_nothing():
    def run(mode):
        out = subprocess.run([sys.executable, "-c", OFF_SCRIPT, mode], capture_output=True, text=True,
                             timeout=60, cwd=".")
        assert out.returncode == 0, out.stderr
        return [int(x) for x in out.stdout.split()]
    present, absent = run("present"), run("block")
    assert present[1:] == [0, 0], "tracing off: opentelemetry and greenq.tracing neither imported nor called"
    assert absent[1:] == [0, 0]
    assert present[0] == absent[0] > 0, "delay() makes the same calls whether greenq.tracing exists or not"


MISSING_SCRIPT = textwrap.dedent("""
    import sys
    sys.modules["opentelemetry"] = None         # not installed
    from greenq import GreenQ
    from greenq.drivers import get_driver
    from greenq.exceptions import ConfigError
    from greenq.worker.consumer import Worker
    app = GreenQ("t", broker="memory://missing", config_file=False, tracing=True)
    for start in (lambda: app.codec, lambda: Worker(app, get_driver("threads"), queues=["default"], concurrency=1,
                                                          burst=True).run()):
        try:
            start()
        except ConfigError as exc:
            print(exc)
        else:
            print("no error")
""")


def test_tracing_without_opentelemetry_is_a_config_error_at_start():
    out = subprocess.run([sys.executable, "-c", MISSING_SCRIPT], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 2, out.stdout
    for line in lines:
        assert "[greenq] tracing = true needs the opentelemetry-api package" in line
        assert "pip install 'greenq[otel]'" in line
