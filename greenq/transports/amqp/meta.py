"""Reading what RabbitMQ hands over beside a message body, without trusting it.

Anyone with write access to a queue can publish anything: a ``message_id``
that is not UTF-8, ``greenq-eta: "abc"``, a header table py-amqp cannot
parse.  Every property and header the RabbitMQ broker reads is read here, in
one place, and nothing here raises: a value that is not what greenq wrote
becomes a reason (``Meta.error``) that the worker dead-letters the message
with, and the consumer loop goes on (docs/brokers.md, "Bad input").

The names of the headers greenq sets live here too.  No sockets here: these
functions take bytes and dicts (tests call them alone).
"""
from __future__ import annotations

import hashlib
import math
from datetime import datetime, timezone
from decimal import Decimal
from struct import unpack_from
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

from amqp.serialization import loads

from ...brokers.base import DeadLetter

#: RabbitMQ's ``message_id`` is an AMQP short string: at most 255 bytes of
#: UTF-8.  greenq sends the task id there, so a longer task id cannot be sent.
MAX_MESSAGE_ID_BYTES = 255
#: Longest task queue name under the default key_prefix, in bytes of UTF-8.
#: AMQP allows 255, but greenq declares ``greenq.delay.<queue>.31`` for
#: delayed tasks, which must fit too (``Settings.max_queue_name_bytes``: any prefix's).
MAX_QUEUE_NAME_BYTES = 255 - len("greenq.delay..31")

DLQ = "greenq.dlq"                    # the dead-letter store of the default key_prefix (Settings.dlq)
H_ETA = "greenq-eta"                  # the headers greenq sets and reads
H_DELIVERIES = "greenq-deliveries"
H_QUEUE = "greenq-queue"              # (these four: on dead letters)
H_REASON = "greenq-reason"
H_FAILED_AT = "greenq-failed-at"
H_DEAD_ID = "greenq-dead-id"
#: set by ``amqp_wire.readable_header`` on a message whose properties it had to rewrite
H_BAD_PROPERTIES = "greenq-bad-properties"
H_QUORUM_COUNT = "x-delivery-count"
#: highest delivery count (and base count) taken as genuine
MAX_COUNT = 2 ** 31 - 1
#: latest ``greenq-eta`` taken as genuine (the envelope's rule: year 9999)
MAX_ETA = 253402300799

#: the basic class's properties in the order of the content header:
#: (flag bit, name, AMQP type)
_LAYOUT = (
    (0x8000, "content_type", "s"), (0x4000, "content_encoding", "s"),
    (0x2000, "application_headers", "F"), (0x1000, "delivery_mode", "B"),
    (0x0800, "priority", "B"), (0x0400, "correlation_id", "s"), (0x0200, "reply_to", "s"),
    (0x0100, "expiration", "s"), (0x0080, "message_id", "s"), (0x0040, "timestamp", "Q"),
    (0x0020, "type", "s"), (0x0010, "user_id", "s"), (0x0008, "app_id", "s"),
    (0x0004, "cluster_id", "s"),
)
_LAYOUTS: Dict[int, List[Tuple[str, str]]] = {}   # property flags -> the (name, type) present


class Meta(NamedTuple):
    """What the consumer needs from a delivery's properties."""
    message_id: str
    deliveries: int          # this hand-out's count, 1 on the first
    priority: int
    eta: Optional[float]     # greenq-eta, epoch seconds
    error: Optional[str]     # why the metadata is unusable, None when it is fine


def as_bytes(body: Any) -> bytes:
    """A body as bytes: py-amqp hands over an empty body as ``''`` (a str)."""
    if isinstance(body, bytes):
        return body
    if isinstance(body, (bytearray, memoryview)):
        return bytes(body)
    if isinstance(body, str):
        return body.encode("utf-8", "surrogatepass")
    return b"" if body is None else str(body).encode("utf-8", "surrogatepass")


def check_message_id(message_id: str) -> None:
    """Raise ValueError when ``message_id`` (the task id) cannot be a RabbitMQ ``message_id``."""
    if len(message_id) > MAX_MESSAGE_ID_BYTES // 4:   # cheap test first: <= 63 chars always fit
        size = len(message_id.encode("utf-8", "surrogatepass"))
        if size > MAX_MESSAGE_ID_BYTES:
            raise ValueError(f"task_id is {size} bytes of UTF-8; RabbitMQ's message_id holds at most "
                             f"{MAX_MESSAGE_ID_BYTES} (task_id {message_id[:40]!r}...)")


def fit_short_string(text: str) -> str:
    """``text`` cut to the 255 bytes of an AMQP short string: a property read
    with its bad bytes escaped (``read_properties``) may have grown past it,
    and must still fit when the message is published again."""
    raw = text.encode("utf-8", "surrogatepass")
    if len(raw) <= 255:
        return text
    return raw[:255].decode("utf-8", "ignore")


def read_properties(buf: bytes, offset: int) -> Tuple[Dict[str, Any], List[str]]:
    """The basic properties of a content header starting at ``offset`` (the
    property flags), like py-amqp's ``decode_properties_basic``, and the
    problems met.  A short string that is not UTF-8 is read with its bad bytes
    escaped (``\\xff``) and reported; a header table that cannot be parsed at
    all is reported and left out.  Never raises."""
    props: Dict[str, Any] = {}
    problems: List[str] = []
    try:
        flags, = unpack_from(">H", buf, offset)
        offset += 2
        layout = _LAYOUTS.get(flags)
        if layout is None:
            layout = [(name, kind) for bit, name, kind in _LAYOUT if flags & bit]
            if len(_LAYOUTS) < 1024:   # (flags are the sender's to choose: bounded)
                _LAYOUTS[flags] = layout
        for name, kind in layout:
            if kind == "s":
                size = buf[offset]
                raw = buf[offset + 1:offset + 1 + size]
                offset += 1 + size
                try:
                    props[name] = raw.decode("utf-8", "surrogatepass")
                except UnicodeDecodeError:
                    props[name] = raw.decode("utf-8", "backslashreplace")
                    problems.append(f"property {name}: {bytes(raw[:60])!r} is not UTF-8")
            elif kind == "F":
                (props[name],), offset = loads("F", buf, offset)
            elif kind == "B":
                props[name] = buf[offset]
                offset += 1
            else:
                props[name], = unpack_from(">Q", buf, offset)
                offset += 8
    except Exception as exc:   # a truncated or malformed property list
        problems.append(f"unreadable properties ({type(exc).__name__}: {exc})")
    return props, problems


def _count(headers: Dict[Any, Any], name: str) -> Tuple[int, Optional[str]]:
    """A non-negative integer header (0 when absent) and the problem, if any."""
    value = headers.get(name)
    if value is None:
        return 0, None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_COUNT:
        return 0, f"bad header {name}: {_show(value)} is not a delivery count (an integer 0-{MAX_COUNT})"
    return value, None


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def read_eta(headers: Any) -> Tuple[Optional[float], Optional[str]]:
    """``greenq-eta`` (epoch seconds) of a header table, or None, and the problem, if any."""
    value = headers.get(H_ETA) if isinstance(headers, dict) else None
    if value is None:
        return None, None
    if isinstance(value, bool) or not isinstance(value, (int, float, Decimal)):
        return None, f"bad header {H_ETA}: {_show(value)} is not a number"
    try:
        eta = float(value)
    except (ValueError, OverflowError, ArithmeticError):
        eta = math.nan
    if not math.isfinite(eta):
        return None, f"bad header {H_ETA}: {_show(value)} is not a finite number"
    if eta > MAX_ETA:
        return None, f"bad header {H_ETA}: {_show(value)} is after the year 9999"
    return eta, None


def read_meta(props: Dict[str, Any], problems: List[str], quorum: bool) -> Meta:
    """The delivery metadata from properties read by ``read_properties``.

    The delivery count is ``greenq-deliveries`` (the hand-outs counted before
    this message was last published by greenq, 0 when absent) plus one, plus
    RabbitMQ's own ``x-delivery-count`` on a quorum queue.  A wrong type
    anywhere makes ``error`` say which field and what it held."""
    message_id = props.get("message_id") or ""
    headers = props.get("application_headers")
    if not headers and not problems and type(message_id) is str:   # every task greenq sends
        return Meta(message_id, 1, props.get("priority") or 0, None, None)
    errors = list(problems)
    if not isinstance(message_id, str):   # (only from a caller bypassing read_properties)
        message_id = as_bytes(message_id).decode("utf-8", "backslashreplace")
    priority = props.get("priority") or 0
    if headers is None:
        headers = {}
    elif not isinstance(headers, dict):
        errors.append(f"bad application headers: {_show(headers)} is not a table")
        headers = {}
    if H_BAD_PROPERTIES in headers:   # read by py-amqp after amqp_wire.readable_header
        errors.append(_text(headers[H_BAD_PROPERTIES]) or "bad properties")
    base, problem = _count(headers, H_DELIVERIES)
    if problem:
        errors.append(problem)
    extra = 0
    if quorum:
        extra, problem = _count(headers, H_QUORUM_COUNT)
        if problem:
            errors.append(problem)
    eta, problem = read_eta(headers)
    if problem:
        errors.append(problem)
    deliveries = min(base + extra, MAX_COUNT - 1) + 1
    return Meta(message_id, deliveries, priority, eta, "; ".join(errors) if errors else None)


def read_dead_letter(props: Dict[str, Any], body: Any, routing_key: Any,
                     logical: Optional[Callable[[str], Optional[str]]] = None) -> DeadLetter:
    """A message of ``P.dlq`` (its properties, body and routing key) as a
    DeadLetter.  Never raises: anyone may write there, so a header of the
    wrong type is shown as text, a bad time as 0.0, and a queue name that
    cannot be one as "" (``dlq_requeue`` leaves such a dead letter where it is).

    greenq's own dead letters name their logical queue in ``greenq-queue``;
    one RabbitMQ dead-lettered names RabbitMQ's queue, which ``logical``
    (``Settings.logical``; by default: the default prefix's) maps back."""
    headers = props.get("application_headers")
    headers = headers if isinstance(headers, dict) else {}
    body = as_bytes(body)
    message_id = _text(props.get("message_id"))
    if H_DEAD_ID in headers:
        return DeadLetter(id=_text(headers[H_DEAD_ID]), queue=_queue_name(headers.get(H_QUEUE)), body=body,
                          reason=_text(headers.get(H_REASON)), message_id=message_id,
                          failed_at=_seconds(headers.get(H_FAILED_AT)))
    # dead-lettered by RabbitMQ itself (a reject without requeue, a quorum delivery limit)
    deaths = headers.get("x-death")
    death = deaths[0] if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict) else {}
    when = death.get("time")
    queue = _queue_name(death.get("queue") or routing_key)
    if queue and logical is not None:
        queue = logical(queue) or ""
    return DeadLetter(id=message_id or hashlib.sha1(body).hexdigest()[:16],
                      queue=queue, body=body, reason=f"rabbitmq: {_text(death.get('reason')) or 'dead-lettered'}",
                      message_id=message_id,
                      failed_at=_epoch(when))


def _text(value: Any) -> str:
    """A header value as text ("" for none)."""
    if value is None:
        return ""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "backslashreplace")
    return value if isinstance(value, str) else str(value)


def _seconds(value: Any) -> float:
    """An epoch time header as a float; 0.0 when it is not a finite number."""
    if isinstance(value, bool) or not isinstance(value, (int, float, Decimal)):
        return 0.0
    try:
        seconds = float(value)
    except (ValueError, OverflowError, ArithmeticError):
        return 0.0
    return seconds if math.isfinite(seconds) else 0.0


def _epoch(when: Any) -> float:
    """An AMQP timestamp (py-amqp: a naive datetime in UTC) as epoch seconds; 0.0 for anything else."""
    if not isinstance(when, datetime):
        return 0.0
    try:
        return (when if when.tzinfo else when.replace(tzinfo=timezone.utc)).timestamp()
    except (ValueError, OverflowError, OSError):
        return 0.0


def _queue_name(value: Any) -> str:
    """A queue name a dead letter can go back to, or ""."""
    if not isinstance(value, str) or value.startswith("amq.") or value == DLQ:
        return ""
    return value if 0 < len(value.encode("utf-8", "surrogatepass")) <= 255 else ""
