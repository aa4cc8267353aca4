"""Queues in ``[greenq] celery_queues`` on RabbitMQ (``amqp://``,
``pyamqp://``, ``amqps://``): Celery's topology and message format, so Celery
clients, Celery workers and greenq workers share the queues (docs/celery.md,
RabbitMQ).  Every other queue keeps greenq's own (``common.py``).

Celery's topology, as Celery 5 (kombu) declares it for a queue ``<q>``:

* the exchange ``<q>`` (Celery's default queue ``celery`` has the exchange
  ``celery``; a queue Celery makes on demand gets an exchange of its own
  name), durable, of type ``[amqp] celery_exchange_type`` (``direct``, or
  ``topic`` as Celery's quorum setups need), bound to the queue ``<q>`` with
  the routing key ``<q>``;
* the queue ``<q>`` (its plain name whatever ``key_prefix``), durable, with
  Celery's arguments: none, ``x-queue-type: quorum`` (``[amqp]
  celery_queue_type``, Celery's ``task_default_queue_type``) or
  ``x-max-priority`` (``[amqp] celery_max_priority``, Celery's
  ``task_queue_max_priority``).  No dead-letter exchange: greenq
  dead-letters Celery messages itself, into ``P.dlq`` with the reason;
* with a quorum queue on a topic exchange, Celery 5.5+'s native delayed
  delivery, declared as its worker declares it: ``celery_delayed_<L>`` for
  L in 0..27 (a topic exchange and a queue of TTL 2**L s each, dead-lettering
  to the level below, level 0 to ``celery_delayed_delivery``), and the queue's
  exchange bound to ``celery_delayed_delivery`` (and the queue to its
  exchange) with ``#.<q>``.  A Celery client sends a countdown there (routing
  key: the delay in seconds, 28 binary digits, then ``<q>``); it reaches the
  queue at its eta.

Messages: the body as the serializer wrote it; ``content_type`` and
``content_encoding``, Celery's headers as the ``application_headers``,
``correlation_id``, ``reply_to``, ``priority``, ``delivery_mode`` as AMQP
properties (``protocol.parse_amqp``).  Inside greenq a Celery message is
carried as kombu's JSON element (``protocol.redis_element``: what the Codec
writes for a Celery queue, and the body of a ``CeleryDelivery``), so a copy
published again (a redelivery counted, a task given back, a deferral, a dead
letter requeued) keeps every property: ``celery_publish`` turns it back into
Celery's AMQP message.

A message greenq defers (it came before its eta) goes through greenq's own
delay cascade (``P.delay.<q>.*``, ending in the queue through the default
exchange) with the Celery headers as they were, or, on a quorum queue on a
topic exchange, through Celery's native delayed delivery.
"""
from __future__ import annotations

import logging
import math
import time
from typing import Any, Dict, Optional, Tuple

from amqp.exceptions import PreconditionFailed

from ...brokers.base import Delivery, Outgoing
from ...celery import protocol
from ...exceptions import BrokerError, MessageError, describe
from . import celery_rpc
from .meta import H_ETA, fit_short_string
from .wire import encode_properties

log = logging.getLogger("greenq.amqp.celery")

#: kombu's native delayed delivery (kombu/transport/native_delayed_delivery.py)
DELAY_BITS = 28
DELIVERY_EXCHANGE = "celery_delayed_delivery"
MAX_NATIVE_DELAY = 2 ** DELAY_BITS - 1


def level_name(level: int) -> str:
    return f"celery_delayed_{level}"


def celery_arguments(settings: Any) -> Dict[str, Any]:
    """The queue arguments Celery declares its queues with."""
    queue_type, _, max_priority = settings.celery
    if queue_type == "quorum":
        return {"x-queue-type": "quorum"}
    if max_priority:
        return {"x-max-priority": max_priority}
    return {}


def native_delays(settings: Any) -> bool:
    """Celery's native delayed delivery applies: quorum queues, topic exchanges."""
    return settings.celery[0] == "quorum" and settings.celery[1] == "topic"


def declare_celery_queue(channel: Any, queue: str, settings: Any) -> None:
    """Declare Celery's exchange, queue and binding of ``queue`` (module
    docstring), and the native delayed delivery topology where it applies."""
    exchange_type = settings.celery[1]
    try:
        channel.exchange_declare(queue, exchange_type, durable=True, auto_delete=False)
        channel.queue_declare(queue, durable=True, auto_delete=False, arguments=celery_arguments(settings))
        channel.queue_bind(queue, queue, queue)
        if native_delays(settings):
            declare_native_delays(channel)
            channel.exchange_bind(queue, DELIVERY_EXCHANGE, f"#.{queue}")
            channel.queue_bind(queue, queue, f"#.{queue}")
    except PreconditionFailed as exc:
        raise BrokerError(
            f"Celery queue {queue!r} (or its exchange) exists on the broker with other arguments "
            f"({exc.reply_text}): set [amqp] celery_queue_type, celery_exchange_type and "
            f"celery_max_priority as the Celery app declares it (task_default_queue_type, "
            f"task_default_exchange_type, task_queue_max_priority)") from None


def declare_native_delays(channel: Any) -> None:
    """kombu's ``declare_native_delayed_delivery_exchanges_and_queues`` for
    quorum queues: the same names, types and arguments, so either side may
    declare it first."""
    key = "1.#"
    for level in range(DELAY_BITS - 1, -1, -1):
        name = level_name(level)
        channel.exchange_declare(name, "topic", durable=True, auto_delete=False)
        args = {"x-queue-type": "quorum", "x-overflow": "reject-publish", "x-message-ttl": 2 ** level * 1000,
                "x-dead-letter-exchange": level_name(level - 1) if level else DELIVERY_EXCHANGE,
                "x-dead-letter-strategy": "at-least-once"}
        channel.queue_declare(name, durable=True, auto_delete=False, arguments=args)
        channel.queue_bind(name, name, key)
        key = "*." + key
    key = "0.#"
    for level in range(DELAY_BITS - 1, 0, -1):
        channel.exchange_bind(level_name(level - 1), level_name(level), key)
        key = "*." + key
    channel.exchange_declare(DELIVERY_EXCHANGE, "topic", durable=True, auto_delete=False)
    channel.exchange_bind(DELIVERY_EXCHANGE, level_name(0), key)


def native_route(seconds: int, queue: str) -> Tuple[str, str]:
    """(exchange, routing key) of kombu's native delayed delivery for a delay
    of ``seconds`` (``calculate_routing_key``)."""
    seconds = max(1, min(seconds, MAX_NATIVE_DELAY))
    return level_name(DELAY_BITS - 1), ".".join(format(seconds, f"0{DELAY_BITS}b")) + "." + queue


# -- publishing -----------------------------------------------------------------------
def amqp_properties(env: protocol.Envelope, priority: int, headers: Dict[str, Any]) -> Dict[str, Any]:
    props: Dict[str, Any] = {"content_type": env.content_type, "content_encoding": env.content_encoding,
                             "application_headers": headers,
                             "delivery_mode": env.properties.get("delivery_mode") or 2}
    for name in ("correlation_id", "reply_to"):
        value = env.properties.get(name)
        if isinstance(value, str) and value:
            props[name] = fit_short_string(value)
    if priority:
        props["priority"] = priority
    return props


def celery_publish(m: Outgoing, now: float, names: Any,
                   headers: Optional[Dict[str, Any]] = None) -> Tuple[bytes, bytes, str, str]:
    """The ``basic.publish`` (body, encoded properties, exchange, routing key)
    of ``m``, a Celery message for a Celery queue carried as kombu's JSON
    element: Celery's AMQP message routed as Celery's client routes it
    (the default exchange for a direct exchange type); through a delay
    when ``m.eta`` is ahead (a deferral), or through the native delayed
    delivery when the eta header is and that applies (a countdown sent).
    ``now`` is not used (the hot path passes 0.0): the clock is read here."""
    queue = m.queue
    try:
        env = protocol.parse_redis(m.body)
    except MessageError:      # not an element (a dead letter requeued as it came): as it is
        return m.body, encode_properties({"delivery_mode": 2}), queue, queue
    table = dict(env.headers)
    if headers:
        table.update(headers)
    # Celery's client: a direct exchange's queue through the default exchange, else the queue's exchange
    exchange, key = ("" if names.celery[1] == "direct" else queue), queue
    now = time.time()
    wait_ms = max(0, math.ceil((m.eta - now) * 1000)) if m.eta is not None else 0
    if wait_ms and native_delays(names):
        exchange, key = native_route(math.ceil(wait_ms / 1000), queue)
    elif wait_ms:
        exchange, key = names.delay_route(queue, wait_ms)
        table[H_ETA] = float(m.eta or 0)
    elif native_delays(names):
        try:
            eta = protocol._iso_epoch("eta", table.get("eta"))
        except (TypeError, ValueError):     # the worker that takes it says why
            eta = None
        if eta is not None and eta - now >= 1:      # whole seconds, rounded up: never early
            exchange, key = native_route(math.ceil(eta - now), queue)
    priority = m.priority or env.properties.get("priority") or 0
    props = amqp_properties(env, priority if isinstance(priority, int) else 0, table)
    return env.body, encode_properties(props), exchange, key


# -- consuming ------------------------------------------------------------------------
class CeleryDelivery(Delivery):
    """A Celery message handed out: ``body`` is kombu's JSON element of it
    (or the raw body when it is not a kombu message); decoded at delivery
    (``message``) or not (``problem``, raised by ``decode``)."""

    __slots__ = ("message", "problem")

    def __init__(self, queue: str, body: bytes, message_id: str, deliveries: int, token: Any,
                 priority: int, error: Optional[str], message: Optional[protocol.CeleryMessage],
                 problem: Optional[MessageError]) -> None:
        super().__init__(queue, body, message_id, deliveries, token, priority, error)
        self.message = message
        self.problem = problem

    def decode(self, codec: Any) -> Any:
        if self.message is None:
            raise self.problem or MessageError("undecodable Celery message")
        return self.message


def celery_delivery(queue: str, props: Dict[str, Any], body: bytes, meta: Any, token: Any, settings: Any,
                    max_size: Optional[int]) -> Delivery:
    """The Delivery of a message consumed from Celery queue ``queue``: decoded
    here (``protocol.parse_amqp`` and ``decode``); never raises.  A Celery
    chord member is refused (dead-lettered with the reason) where the app's
    results are ``rpc://``, which cannot count it (``celery_rpc.CHORDLESS``)."""
    message: Optional[protocol.CeleryMessage] = None
    problem: Optional[MessageError] = None
    data = body
    try:
        env = protocol.parse_amqp(body, props, "" if settings.celery[1] == "direct" else queue, queue)
        try:
            data = protocol.redis_element(env, tag=str(token[1]))
        except (TypeError, ValueError, RecursionError) as exc:
            raise protocol.CeleryMessageError(f"headers greenq cannot carry: {describe(exc)}") from None
        message = protocol.decode(env, settings.accept, queue, max_size)
        if message.chord is not None and message.group_id and settings in celery_rpc.CHORDLESS:
            message = None
            raise protocol.CeleryMessageError(celery_rpc.NO_CHORDS)
    except MessageError as exc:
        problem = exc
    except Exception as exc:          # decode raises only CeleryMessageError; this keeps the loop alive
        problem = protocol.CeleryMessageError(f"malformed Celery message: {describe(exc)}")
    if message is not None:
        reply_to = message.properties.get("reply_to")
        if isinstance(reply_to, str) and reply_to and reply_to != message.reply_to:  # greenq's client: its record
            corr = message.properties.get("correlation_id")
            celery_rpc.remember(message.id, reply_to, corr if isinstance(corr, str) and corr else message.id)
        mid = message.id
    else:
        headers = props.get("application_headers")
        hid = headers.get("id") if isinstance(headers, dict) else None
        mid = hid if isinstance(hid, str) and hid else (meta.message_id or f"celery-{token[1]}")
    priority = message.priority if message is not None else meta.priority
    if not isinstance(priority, int):
        priority = 0
    return CeleryDelivery(queue, data, mid, meta.deliveries, token, priority, meta.error, message, problem)
