"""OpenTelemetry traces and the process-duration metric, with ``[greenq]
tracing = true`` and the ``opentelemetry-api`` package (docs/tracing.md).

Two halves, each made only when tracing is on, so that nothing here (and
nothing of OpenTelemetry) is imported or called when it is off:

* :class:`Producer`, the app codec's ``tracer``: every message a process sends
  goes through ``Codec.outgoing``, which hands it here.  A PRODUCER span
  ``send <queue>`` is made for it, and that span's context is written in the
  message's ``trace`` field (the W3C ``traceparent``, with ``tracestate`` and
  ``baggage`` when set: what the configured propagator writes).  A message
  that already carries a context (what follows a task: its retry, the next
  step of its chain, its callbacks) is sent under that context; any other
  under the caller's current span, or as a new trace.
* :class:`Consumer`, subscribed to the worker's hooks: a CONSUMER span
  ``process <queue>`` around each run, child of the message's context and
  current while the task runs (spans the task makes, and tasks it sends, are
  its children), and a ``messaging.process.duration`` histogram.  When the
  task ends, its message's context becomes the consumer span's, so its retry
  and what follows it are sent under it: a chain is one trace, step after step.

A chord's callback is sent by whichever member finishes last, under that
member's context; its spans also *link* to the producer spans of every member
(at most ``MAX_LINKS``), which are made as the chord is sent so that their
contexts can be stored with the callback.

Failures of tracing are never the task's: a malformed ``trace`` field is
dropped by the decoder (greenq/message.py), and hooks that fail are logged.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

from .brokers.base import Outgoing
from .exceptions import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from opentelemetry.context import Context
    from opentelemetry.trace import Link, Span

    from .brokers.base import Broker
    from .hooks import Hooks
    from .message import Codec, TaskMessage
    from .task import Request, Task


#: the value of ``messaging.system`` on every span and measurement
SYSTEM = "greenq"
#: the most members a chord's callback links to (OpenTelemetry's default span link limit)
MAX_LINKS = 128
#: the most chord members' spans waiting for their message to be sent
MAX_EARLY = 100000
#: the process-duration histogram's buckets, in seconds (the semantic conventions' advice)
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)

# attribute names (OpenTelemetry messaging semantic conventions; greenq's own under messaging.greenq.)
SYSTEM_KEY = "messaging.system"
DESTINATION = "messaging.destination.name"
MESSAGE_ID = "messaging.message.id"
CONVERSATION_ID = "messaging.message.conversation_id"
OPERATION_TYPE = "messaging.operation.type"
OPERATION_NAME = "messaging.operation.name"
TASK_NAME = "messaging.greenq.task.name"
RETRY_COUNT = "messaging.greenq.message.retry_count"
GROUP_ID = "messaging.greenq.group.id"
DELIVERY_COUNT = "messaging.greenq.message.delivery_count"
TASK_STATE = "messaging.greenq.task.state"
ERROR_TYPE = "error.type"


def check() -> None:
    """ConfigError unless opentelemetry-api can be imported (at start-up, with tracing on)."""
    try:
        from opentelemetry import metrics, propagate, trace
    except ImportError as exc:
        raise ConfigError(f"[greenq] tracing = true needs the opentelemetry-api package ({exc}): "
                          "pip install 'greenq[otel]', or set tracing = false") from None
    del metrics, propagate, trace


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("greenq")
    except Exception:
        return "0"


def _links(carrier: Optional[Dict[str, Any]]) -> List["Link"]:
    """The span links a message carries (a chord callback's: its members)."""
    links = carrier.get("links") if carrier else None
    if not links:
        return []
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
    propagator = TraceContextTextMapPropagator()
    out = []
    for traceparent in links[:MAX_LINKS]:
        ctx = trace.get_current_span(propagator.extract({"traceparent": traceparent})).get_span_context()
        if ctx.is_valid:
            out.append(trace.Link(ctx))
    return out


def _extract(carrier: Optional[Dict[str, Any]]) -> Optional["Context"]:
    """The context a message carries; None when it carries none."""
    if not carrier or "traceparent" not in carrier:
        return None
    from opentelemetry import propagate
    return propagate.extract({k: v for k, v in carrier.items() if k != "links"})


def _inject(span: "Span", parent: Optional["Context"] = None) -> Dict[str, Any]:
    """``span``'s context as a message's ``trace`` field (with ``parent``'s baggage)."""
    from opentelemetry import propagate, trace
    carrier: Dict[str, Any] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(span, parent))
    return carrier


def _traceparent(span: "Span") -> str:
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
    carrier: Dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier, context=trace.set_span_in_context(span))
    return carrier["traceparent"]


class Producer:
    """Makes the PRODUCER span of each message sent (``Codec.outgoing``)."""

    def __init__(self) -> None:
        check()
        from opentelemetry import trace
        self._tracer = trace.get_tracer("greenq", _version())
        #: chord members' spans, made as the chord is sent (``chord``), by task id
        self._early: Dict[str, "Span"] = {}

    def outgoing(self, codec: "Codec", msg: "TaskMessage", sent: bool) -> "Outgoing":
        """``codec.outgoing(msg, sent)`` under a producer span, the message
        carrying the span's context.  A message moved to wait for its eta
        (``sent`` false) keeps the context it had, and makes no span."""
        from opentelemetry.trace import SpanKind

        from .message import TRACED_FIELDS
        if not sent:
            return Outgoing(msg.queue, codec.encode(msg, TRACED_FIELDS), msg.id, msg.priority, msg.eta)
        name = f"send {msg.queue}"
        span = self._early.pop(msg.id, None)
        carried = msg.trace
        parent = _extract(carried)
        if span is None:
            span = self._tracer.start_span(name, context=parent, kind=SpanKind.PRODUCER, links=_links(carried))
        else:
            span.update_name(name)
        try:
            if span.is_recording():
                span.set_attributes(_attributes(msg, "send"))
            trace_field = _inject(span, parent)
            if carried and carried.get("links"):       # the consumer span links to them too
                trace_field["links"] = carried["links"]
            msg.trace = trace_field
            eta = None if codec.celery_queues and msg.queue in codec.celery_queues else msg.eta   # as outgoing
            out = TracedOutgoing(msg.queue, codec.encode(msg, TRACED_FIELDS), msg.id, msg.priority, eta, span)
        except BaseException as exc:
            _ended(span, exc)
            raise
        if codec.sent_sink is not None:
            codec.tell_sent(msg)
        return out

    def chord(self, members: Sequence[Dict[str, Any]], callback: Dict[str, Any]) -> None:
        """Before a chord is stored and sent: start the producer span of each
        member (``members``: their signature records, task ids fixed) and put
        their contexts in ``callback``'s options, whence the worker that sends
        the callback gives them to its spans as links."""
        from opentelemetry.trace import SpanKind
        links: List[str] = []
        for record in members:
            task_id = (record.get("options") or {}).get("task_id")
            if not isinstance(task_id, str):
                continue
            span = self._tracer.start_span("send", kind=SpanKind.PRODUCER)   # named when sent
            self._early[task_id] = span
            while len(self._early) > MAX_EARLY:  # chords whose sending failed: forget the oldest
                self._early.pop(next(iter(self._early)))
            if len(links) < MAX_LINKS and span.get_span_context().is_valid:
                links.append(_traceparent(span))
        if links:
            callback.setdefault("options", {})["trace"] = {"links": links}


@dataclass
class TracedOutgoing(Outgoing):
    """A message to publish, with its producer span: ended once the broker
    has it (``watch``; the asyncio publisher: greenq/aio/base.py).  One never
    published has no span (it is not ended,
    so not exported)."""
    span: Optional["Span"] = None


def _ended(span: "Span", exc: Optional[BaseException] = None) -> None:
    if exc is not None:
        from opentelemetry import trace
        span.record_exception(exc)
        span.set_status(trace.Status(trace.StatusCode.ERROR, str(exc)[:1000]))
        span.set_attribute(ERROR_TYPE, type(exc).__qualname__)
    span.end()


def published(messages: Sequence[Outgoing], exc: Optional[BaseException] = None) -> None:
    """End the producer spans of ``messages`` (published, or failed with ``exc``)."""
    for message in messages:
        span = getattr(message, "span", None)
        if span is not None:
            message.span = None  # type: ignore[attr-defined]  # a TracedOutgoing: its span ends once
            _ended(span, exc)


def watch(broker: "Broker") -> None:
    """Make ``broker``'s publish calls end the producer spans of the messages
    they publish, so that a span lasts until the broker has its message."""
    publish, publish_many = broker.publish, broker.publish_many

    def traced_publish(message: Outgoing) -> None:
        try:
            publish(message)
        except BaseException as exc:
            published([message], exc)
            raise
        published([message])

    def traced_publish_many(messages: Sequence[Outgoing]) -> None:
        try:
            publish_many(messages)
        except BaseException as exc:
            published(messages, exc)
            raise
        published(messages)
    broker.publish = traced_publish  # type: ignore[method-assign]  # this broker's own, tracing on
    broker.publish_many = traced_publish_many  # type: ignore[method-assign]


def _attributes(msg: "TaskMessage", operation: str) -> Dict[str, Any]:
    attributes: Dict[str, Any] = {
        SYSTEM_KEY: SYSTEM, OPERATION_TYPE: operation, OPERATION_NAME: operation,
        DESTINATION: msg.queue, MESSAGE_ID: msg.id, CONVERSATION_ID: msg.root_id or msg.id,
        TASK_NAME: msg.task, RETRY_COUNT: msg.retries}
    if msg.group_id:
        attributes[GROUP_ID] = msg.group_id
    return attributes


class Consumer:
    """The worker's half: a CONSUMER span around each task run, and the
    ``messaging.process.duration`` histogram (``subscribe`` to a worker's hooks)."""

    def __init__(self) -> None:
        check()
        from opentelemetry import metrics, trace
        self._tracer = trace.get_tracer("greenq", _version())
        self._duration = metrics.get_meter("greenq", _version()).create_histogram(
            "messaging.process.duration", unit="s",
            description="Duration of processing operation (one task run)",
            explicit_bucket_boundaries_advisory=BUCKETS)
        #: messages received, not yet started, by task id
        self._received: Dict[str, "TaskMessage"] = {}
        #: runs under way: (span, context token, monotonic start, message), by id(request)
        self._running: Dict[int, Tuple["Span", object, float, Optional["TaskMessage"]]] = {}

    def subscribe(self, hooks: "Hooks") -> None:
        hooks.on("task_received", self.received)
        hooks.on("task_prerun", self.prerun)
        hooks.on("task_postrun", self.postrun)
        hooks.on("task_revoked", self.dropped)
        hooks.on("message_dead_lettered", self.dropped)

    def received(self, job: Any) -> None:
        if job.msg is not None:
            self._received[job.msg.id] = job.msg

    def dropped(self, job: Any, reason: Optional[str] = None) -> None:
        self._received.pop(job.id, None)

    def prerun(self, task: "Task", request: "Request") -> None:
        from opentelemetry import context, trace
        from opentelemetry.trace import SpanKind
        msg = self._received.pop(request.id, None)
        carried = msg.trace if msg is not None else None
        parent = _extract(carried)
        if parent is None:
            parent = context.Context()           # a new trace, whatever this greenlet had
        queue = _queue(request)
        span = self._tracer.start_span(f"process {queue}", context=parent, kind=SpanKind.CONSUMER,
                                       links=_links(carried))
        if span.is_recording():
            attributes: Dict[str, Any] = {SYSTEM_KEY: SYSTEM, OPERATION_TYPE: "process", OPERATION_NAME: "process",
                          DESTINATION: queue, MESSAGE_ID: request.id, CONVERSATION_ID: request.root_id,
                          TASK_NAME: request.task, RETRY_COUNT: request.retries}
            deliveries = request.delivery_info.get("deliveries")
            if isinstance(deliveries, int):
                attributes[DELIVERY_COUNT] = deliveries
            if request.group_id:
                attributes[GROUP_ID] = request.group_id
            span.set_attributes(attributes)
        token = context.attach(trace.set_span_in_context(span, parent))
        self._running[id(request)] = (span, token, time.monotonic(), msg)

    def postrun(self, task: "Task", request: "Request", state: str, retval: Any) -> None:
        entry = self._running.pop(id(request), None)
        if entry is None:
            return
        from opentelemetry import context, trace
        span, token, start, msg = entry
        error = None
        try:
            span.set_attribute(TASK_STATE, state)
            if state == "FAILURE":
                error = type(retval).__qualname__ if isinstance(retval, BaseException) else "FAILURE"
                span.set_attribute(ERROR_TYPE, error)
                span.set_status(trace.Status(trace.StatusCode.ERROR, str(retval)[:1000]))
                if isinstance(retval, BaseException):
                    span.record_exception(retval)
            elif state == "RETRY":
                span.add_event("retry", {"reason": str(retval)[:1000]})
            if msg is not None:     # its retry, chain and callbacks are sent under this span
                msg.trace = _inject(span, context.get_current())
        finally:
            context.detach(token)   # type: ignore[arg-type]  # the token attach gave
            span.end()
            attributes = {SYSTEM_KEY: SYSTEM, DESTINATION: _queue(request),
                          OPERATION_TYPE: "process", OPERATION_NAME: "process"}
            if error is not None:
                attributes[ERROR_TYPE] = error
            self._duration.record(time.monotonic() - start, attributes)


def _queue(request: "Request") -> str:
    """The queue the task's message came from."""
    return str(request.delivery_info.get("queue") or request.queue or "default")


def instrument_worker(hooks: "Hooks") -> Consumer:
    """Subscribe a :class:`Consumer` to a worker's ``hooks`` (ConfigError when
    OpenTelemetry is missing)."""
    consumer = Consumer()
    consumer.subscribe(hooks)
    return consumer
