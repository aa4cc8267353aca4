"""Celery's task message, protocol 2, decoded and encoded: pure, no I/O.

A Celery message is a kombu message: a body with its ``content-type`` and
``content-encoding``, ``headers`` (the task's facts: ``task``, ``id``,
``eta``, ``expires``, ``retries``, ``timelimit``, ...) and ``properties``
(``correlation_id``, ``reply_to``, ``priority``, ``delivery_info``, and on
Redis ``body_encoding`` and ``delivery_tag``).  The body decodes to
``[args, kwargs, embed]``, the embed holding ``callbacks``, ``errbacks``,
``chain`` (next step last) and ``chord``.  docs/celery.md has the table of
fields and what greenq does with each.

Transport-neutral: :class:`Envelope` is the parts every broker carries;
``parse_redis``/``redis_element`` read and write the JSON element kombu's Redis
transport pushes onto a list (the body in base64).  A RabbitMQ transport
builds an Envelope from its frame's body, properties and headers.

``decode`` gives a :class:`CeleryMessage`, greenq's ``TaskMessage`` with
what only Celery has beside it, so the worker runs it like its own; ``encode``
is the reverse (a retry goes back as a Celery message; greenq can send to a
Celery worker).  Every way a message can be wrong raises
:class:`CeleryMessageError` (a ``MessageError``: the worker dead-letters the
message with its text as the reason) and nothing else.

kombu's JSON wraps the values JSON has no type for as ``{"__type__": T,
"__value__": V}``: T is ``datetime``, ``date``, ``time`` (ISO 8601 text),
``decimal`` (text), ``uuid`` (``{"hex": ...}``), ``bytes`` (UTF-8 text) or
``base64``; they decode to the same Python values and encode back the same
way.  Kombu before 5.3 wrote such values as plain text, which decodes as text.
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime as _dt
import decimal
import json
import os
import pickle
import socket
import uuid
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Tuple

from .. import validation
from ..exceptions import MessageError, describe
from ..message import TaskMessage

#: content types, by the serializer names of ``[greenq] accept_content``
CONTENT_TYPES = {
    "json": "application/json",
    "msgpack": "application/x-msgpack",
    "pickle": "application/x-python-serialize",
}
SERIALIZERS = {ct: name for name, ct in CONTENT_TYPES.items()}
#: the largest kombu JSON element read (beside the size limit the broker applies first)
MAX_DEPTH = validation.MAX_DEPTH


class CeleryMessageError(MessageError):
    """A Celery message that cannot be run: malformed, of a protocol or
    content type greenq does not take, or refused by ``accept_content``.
    Its text is the dead-letter reason."""


@dataclass
class Envelope:
    """The parts of a kombu message that every transport carries."""
    body: bytes
    content_type: str
    content_encoding: str
    headers: Dict[str, Any]
    properties: Dict[str, Any]


@dataclass
class CeleryMessage(TaskMessage):
    """A task call that came as (or goes out as) a Celery message: greenq's
    ``TaskMessage`` fields, plus what only Celery carries.  ``link``,
    ``link_error`` and ``chain`` hold Celery's signature dicts (greenq's
    signature records have the same keys); ``chain`` is in running order."""
    ignore_result: bool = False
    chord: Optional[Dict[str, Any]] = None
    #: every header as received (argsrepr, origin, shadow, stamps, ...), kept
    #: so that what greenq sends back (a retry) carries them on
    headers: Dict[str, Any] = field(default_factory=dict)
    #: every property as received (correlation_id, reply_to, delivery_info, ...)
    properties: Dict[str, Any] = field(default_factory=dict)
    serializer: str = "json"

    def for_retry(self, eta: Optional[float]) -> "CeleryMessage":
        return dataclasses.replace(self, eta=eta, retries=self.retries + 1, created=self.created)


# -- kombu's JSON ------------------------------------------------------------------
def _fromiso_datetime(text: Any) -> _dt.datetime:
    if not isinstance(text, str):
        raise ValueError(f"a datetime must be ISO 8601 text, not {type(text).__name__}")
    return _dt.datetime.fromisoformat(text)


def _uuid(value: Any) -> uuid.UUID:
    if not isinstance(value, dict) or set(value) != {"hex"} or not isinstance(value["hex"], str):
        raise ValueError("a uuid must be {\"hex\": text}")
    return uuid.UUID(hex=value["hex"])


def _text(kind: str) -> Any:
    def check(value: Any) -> str:
        if not isinstance(value, str):
            raise ValueError(f"a {kind} must be text, not {type(value).__name__}")
        return value
    return check


def _decimal(value: Any) -> decimal.Decimal:
    return decimal.Decimal(_text("decimal")(value))


_DECODERS = {
    "datetime": _fromiso_datetime,
    "date": lambda v: _fromiso_datetime(v).date(),
    "time": lambda v: _dt.time.fromisoformat(_text("time")(v)),
    "decimal": _decimal,
    "uuid": _uuid,
    "bytes": lambda v: _text("bytes")(v).encode("utf-8"),
    "base64": lambda v: base64.b64decode(_text("base64")(v).encode("ascii"), validate=True),
}


def _object_hook(obj: Dict[str, Any]) -> Any:
    if len(obj) == 2 and "__type__" in obj and "__value__" in obj:
        kind = obj["__type__"]
        decoder = _DECODERS.get(kind) if isinstance(kind, str) else None
        if decoder is None:
            raise ValueError(f"unknown kombu JSON type {kind!r:.40}")
        return decoder(obj["__value__"])
    return obj


def _wrapped(kind: str, value: Any) -> Dict[str, Any]:
    return {"__type__": kind, "__value__": value}


def _default(value: Any) -> Any:
    """What kombu's JSON encoder writes for a value JSON has no type for."""
    if isinstance(value, _dt.datetime):
        return _wrapped("datetime", value.isoformat())
    if isinstance(value, _dt.date):
        return _wrapped("date", value.isoformat())
    if isinstance(value, _dt.time):
        return _wrapped("time", value.isoformat())
    if isinstance(value, decimal.Decimal):
        return _wrapped("decimal", str(value))
    if isinstance(value, uuid.UUID):
        return _wrapped("uuid", {"hex": value.hex})
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        try:
            return _wrapped("bytes", data.decode("utf-8"))
        except UnicodeDecodeError:
            return _wrapped("base64", base64.b64encode(data).decode("ascii"))
    if isinstance(value, (set, frozenset)):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def json_dumps(value: Any) -> str:
    """``value`` as kombu's JSON serializer writes it (its type wrappers included)."""
    return json.dumps(value, default=_default, allow_nan=False)


def json_loads(data: Any) -> Any:
    """kombu JSON text or UTF-8 bytes to Python values, the type wrappers decoded."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        data = bytes(data).decode("utf-8")
    return json.loads(data, object_hook=_object_hook)


# -- serializers -------------------------------------------------------------------------
def accepted(accept: Iterable[str]) -> frozenset:
    """The content types of ``accept`` (greenq serializer names or content types)."""
    return frozenset(CONTENT_TYPES.get(name, name) for name in accept)


def loads_body(body: bytes, content_type: str, content_encoding: str, accept: frozenset) -> Any:
    """The body's value; CeleryMessageError when its type is not accepted or it does not decode."""
    if content_type not in accept:
        name = SERIALIZERS.get(content_type, content_type)
        raise CeleryMessageError(f"content type {content_type!r:.60} not accepted ([greenq] accept_content "
                                 f"has no {name!r:.40})")
    try:
        if content_type == CONTENT_TYPES["json"]:
            if content_encoding not in ("utf-8", "utf8", "binary"):
                raise ValueError(f"JSON in content encoding {content_encoding!r:.40}")
            return json_loads(body)
        if content_type == CONTENT_TYPES["msgpack"]:
            import msgpack
            return msgpack.unpackb(body, raw=False)
        if content_type == CONTENT_TYPES["pickle"]:
            return pickle.loads(body)
    except ImportError as exc:
        raise CeleryMessageError(f"cannot decode {content_type}: {describe(exc)}") from None
    except RecursionError:
        raise CeleryMessageError("body nested too deeply") from None
    except Exception as exc:
        raise CeleryMessageError(f"body does not decode as {content_type}: {describe(exc)}") from None
    raise CeleryMessageError(f"content type {content_type!r:.60} is not one greenq decodes")


def dumps_body(value: Any, serializer: str) -> Tuple[bytes, str, str]:
    """(body, content type, content encoding) of ``value`` with ``serializer``."""
    if serializer == "json":
        return json_dumps(value).encode("utf-8"), CONTENT_TYPES["json"], "utf-8"
    if serializer == "msgpack":
        import msgpack
        return msgpack.packb(value, use_bin_type=True), CONTENT_TYPES["msgpack"], "binary"
    if serializer == "pickle":
        return pickle.dumps(value, protocol=4), CONTENT_TYPES["pickle"], "binary"
    raise ValueError(f"unknown serializer {serializer!r}")


# -- fields ----------------------------------------------------------------------------------
def _iso_epoch(option: str, value: Any) -> Optional[float]:
    """Celery's eta and expires: ISO 8601 text (naive: UTC, as Celery's
    default ``enable_utc``), or None; epoch seconds also taken."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            when = _dt.datetime.fromisoformat(value)
        except ValueError:
            raise ValueError(f"{option} {value!r:.60} is not an ISO 8601 date and time") from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=_dt.timezone.utc)
        try:
            value = when.timestamp()
        except (OverflowError, ValueError, OSError):
            raise ValueError(f"{option} {value!r:.60} is out of range") from None
    return validation.epoch(option, value)


def _timelimit(value: Any) -> Tuple[Optional[float], Optional[float]]:
    """Celery's ``timelimit``: ``[hard, soft]``, each seconds or None."""
    if value is None:
        return None, None
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ValueError(f"timelimit must be [hard, soft], not {value!r:.60}")
    hard, soft = (validation.optional_seconds(f"timelimit[{i}]", v) for i, v in enumerate(value))
    return hard, soft


def _optional_id(option: str, value: Any) -> Optional[str]:
    return None if value is None else validation.name(option, value)


def _signatures(option: str, value: Any) -> Optional[List[Dict[str, Any]]]:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"embed {option} must be a list of signatures, not {type(value).__name__}")
    out = [_signature(f"{option}[{i}]", item) for i, item in enumerate(value)]
    return out or None


def _signature(option: str, value: Any) -> Dict[str, Any]:
    if not isinstance(value, dict) or not isinstance(value.get("task"), str):
        raise TypeError(f"embed {option} must be a signature (an object with a task name)")
    for key, kind in (("args", (list, tuple)), ("kwargs", dict), ("options", dict)):
        if value.get(key) is not None and not isinstance(value[key], kind):
            raise TypeError(f"embed {option}.{key} has the wrong type ({type(value[key]).__name__})")
    return value


def _flag(option: str, value: Any) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise TypeError(f"{option} must be true or false, not {value!r:.40}")
    return value


def _priority(value: Any) -> int:
    """kombu clamps a priority to 0-9; so does greenq (None: 0)."""
    if value is None:
        return 0
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"priority must be an integer, not {value!r:.40}")
    return max(0, min(9, value))


# -- decoding ---------------------------------------------------------------------------------
def decode(env: Envelope, accept: Iterable[str] = ("json",), queue: Optional[str] = None,
           max_size: Optional[int] = None) -> CeleryMessage:
    """The task call an Envelope carries.  ``accept``: serializer names (or
    content types) allowed; ``queue``: where it was consumed (else its
    routing key).  CeleryMessageError, and nothing else, when it cannot run."""
    try:
        return _decode(env, accepted(accept), queue, max_size)
    except CeleryMessageError:
        raise
    except RecursionError:
        raise CeleryMessageError("malformed Celery message: nested too deeply") from None
    except Exception as exc:
        raise CeleryMessageError(f"malformed Celery message: {describe(exc)}") from None


def _decode(env: Envelope, accept: frozenset, queue: Optional[str], max_size: Optional[int]) -> CeleryMessage:
    headers, props = env.headers, env.properties
    if not isinstance(headers, dict) or not isinstance(props, dict):
        raise CeleryMessageError("malformed Celery message: headers and properties must be objects")
    if "task" not in headers:
        raise CeleryMessageError("not a Celery protocol 2 message: no task header (protocol 1, "
                                 "Celery 3, is not supported)")
    if not isinstance(env.body, bytes):
        raise CeleryMessageError("malformed Celery message: the body is not bytes")
    if max_size is not None and len(env.body) > max_size:
        raise CeleryMessageError(f"body is {len(env.body)} bytes, over max_message_size {max_size}")
    if not isinstance(env.content_type, str) or not isinstance(env.content_encoding, str):
        raise CeleryMessageError("malformed Celery message: content-type and content-encoding must be text")
    task = validation.name("task header", headers["task"])
    task_id = validation.name("id header", headers.get("id"))
    payload = loads_body(env.body, env.content_type, env.content_encoding, accept)
    if not isinstance(payload, (list, tuple)) or len(payload) != 3:
        raise CeleryMessageError("malformed Celery message: the body must be [args, kwargs, embed]")
    args, kwargs, embed = payload
    if isinstance(args, tuple):
        args = list(args)
    if embed is None:
        embed = {}
    if not isinstance(embed, dict):
        raise CeleryMessageError("malformed Celery message: embed must be an object")
    try:
        validation.arguments(args, kwargs)
    except (TypeError, ValueError) as exc:
        raise CeleryMessageError(f"malformed Celery message: {exc}") from None
    delivery = props.get("delivery_info")
    if queue is None:
        routing_key = delivery.get("routing_key") if isinstance(delivery, dict) else None
        queue = routing_key if isinstance(routing_key, str) and routing_key else "celery"
    hard, soft = _timelimit(headers.get("timelimit"))
    chain = _signatures("chain", embed.get("chain"))
    chord = embed.get("chord")
    if chord is not None:
        chord = _signature("chord", chord)
    group = _optional_id("group header", headers.get("group"))
    return CeleryMessage(
        task=task, args=args, kwargs=kwargs, id=task_id, queue=validation.name("queue", queue),
        priority=_priority(props.get("priority")),
        eta=_iso_epoch("eta header", headers.get("eta")),
        expires=_iso_epoch("expires header", headers.get("expires")),
        retries=0 if headers.get("retries") is None else validation.count("retries header", headers["retries"]),
        created=0.0,
        root_id=_optional_id("root_id header", headers.get("root_id")),
        time_limit=hard, soft_time_limit=soft,
        parent_id=_optional_id("parent_id header", headers.get("parent_id")),
        group_id=group,
        link=_signatures("callbacks", embed.get("callbacks")),
        link_error=_signatures("errbacks", embed.get("errbacks")),
        chain=list(reversed(chain)) if chain else None,
        ignore_result=_flag("ignore_result header", headers.get("ignore_result")),
        chord=chord, headers=headers, properties=props,
        reply_to=_greenq_reply_to(headers.get(GREENQ_REPLY_TO)),
        serializer=SERIALIZERS.get(env.content_type, "json"))


#: the header naming a greenq client's ``rpc://`` reply queue in a Celery
#: message it sent.  greenq's client names the same queue in Celery's
#: ``reply_to`` property, which a Celery worker answers in Celery's format
#: (greenq's client reads that too); a greenq worker finding both equal sends
#: greenq's record only, and one finding only ``reply_to`` (a Celery client's)
#: answers in Celery's format
GREENQ_REPLY_TO = "greenq_reply_to"


def _greenq_reply_to(value: Any) -> Optional[str]:
    return value if isinstance(value, str) and value else None


# -- encoding ---------------------------------------------------------------------------------
def _iso(epoch: Optional[float]) -> Optional[str]:
    if epoch is None:
        return None
    return _dt.datetime.fromtimestamp(epoch, _dt.timezone.utc).isoformat()


def _origin() -> str:
    return f"gen{os.getpid()}@{socket.gethostname()}"


def encode(msg: TaskMessage, serializer: Optional[str] = None, exchange: str = "") -> Envelope:
    """The Celery protocol 2 message of ``msg`` (a CeleryMessage keeps the
    headers and properties it came with; the fields of ``msg`` win).
    ``serializer``: json, msgpack or pickle (default: the message's own, json).
    ValueError (or TypeError) when the arguments cannot be serialized."""
    celery = msg if isinstance(msg, CeleryMessage) else None
    serializer = serializer or (celery.serializer if celery else "json")
    args, kwargs = list(msg.args), dict(msg.kwargs)
    embed = {
        "callbacks": msg.link or None,
        "errbacks": msg.link_error or None,
        "chain": list(reversed(msg.chain)) if msg.chain else None,
        "chord": celery.chord if celery else None,
    }
    body, content_type, content_encoding = dumps_body([args, kwargs, embed], serializer)
    headers: Dict[str, Any] = {
        "lang": "py", "task": msg.task, "id": msg.id, "shadow": None, "eta": None, "expires": None,
        "group": None, "group_index": None, "retries": 0, "timelimit": [None, None],
        "root_id": None, "parent_id": None, "argsrepr": _repr(tuple(args)), "kwargsrepr": _repr(kwargs),
        "origin": _origin(), "ignore_result": False, "replaced_task_nesting": 0,
        "stamped_headers": None, "stamps": {},
    }
    if celery is not None:
        headers.update(celery.headers)
    headers.update(
        task=msg.task, id=msg.id, eta=_iso(msg.eta), expires=_iso(msg.expires), group=msg.group_id,
        retries=msg.retries, timelimit=[msg.time_limit, msg.soft_time_limit],
        root_id=msg.root_id or msg.id, parent_id=msg.parent_id,
        ignore_result=celery.ignore_result if celery else headers.get("ignore_result", False))
    headers.pop("redelivered", None)
    if msg.reply_to:
        headers[GREENQ_REPLY_TO] = msg.reply_to
    # a greenq client's rpc:// reply queue is also Celery's reply_to, so a Celery worker answers there
    # (greenq's client reads Celery's reply: greenq/transports/amqp/celery_rpc.py); a greenq worker
    # seeing both name one queue sends greenq's record only
    properties: Dict[str, Any] = {"correlation_id": msg.id, "reply_to": msg.reply_to, "delivery_mode": 2,
                                  "delivery_info": {"exchange": exchange, "routing_key": msg.queue},
                                  "priority": msg.priority}
    if celery is not None:
        for key in ("reply_to", "delivery_mode"):
            if key in celery.properties:
                properties[key] = celery.properties[key]
    return Envelope(body, content_type, content_encoding, headers, properties)


def _repr(value: Any) -> str:
    try:
        text = repr(value)
    except Exception:
        return "<unrepresentable>"
    return text if len(text) <= 1024 else text[:1021] + "..."


# -- kombu's Redis list element -------------------------------------------------------------
def parse_redis(raw: Any) -> Envelope:
    """The Envelope in one element of a kombu Redis list (JSON; the body in
    base64 when ``properties.body_encoding`` says so).  CeleryMessageError
    when it is not one."""
    try:
        element = json_loads(raw)
    except RecursionError:
        raise CeleryMessageError("not a kombu message: nested too deeply") from None
    except Exception as exc:
        raise CeleryMessageError(f"not a kombu message: {describe(exc)}") from None
    if not isinstance(element, dict):
        raise CeleryMessageError(f"not a kombu message: a JSON {type(element).__name__}, not an object")
    headers, props, body = element.get("headers"), element.get("properties"), element.get("body")
    if not isinstance(headers, dict) or not isinstance(props, dict):
        raise CeleryMessageError("not a kombu message: headers and properties must be objects")
    if not isinstance(body, str):
        raise CeleryMessageError("not a kombu message: the body must be text")
    encoding = props.get("body_encoding")
    if encoding == "base64":
        try:
            data = base64.b64decode(body.encode("ascii"), validate=True)
        except (binascii.Error, ValueError, UnicodeEncodeError) as exc:
            raise CeleryMessageError(f"body is not base64: {describe(exc)}") from None
    elif encoding is None:
        data = body.encode("utf-8", "surrogatepass")
    else:
        raise CeleryMessageError(f"unknown body_encoding {encoding!r:.40}")
    content_type = element.get("content-type")
    content_encoding = element.get("content-encoding")
    if not isinstance(content_type, str) or not isinstance(content_encoding, str):
        raise CeleryMessageError("not a kombu message: content-type and content-encoding must be text")
    return Envelope(data, content_type, content_encoding, headers, props)


def delivery_tag(raw: Any) -> Optional[str]:
    """kombu's ``properties.delivery_tag`` of a Redis list element, or None."""
    try:
        element = json.loads(raw)
        tag = element["properties"]["delivery_tag"]
    except Exception:
        return None
    return tag if isinstance(tag, str) and tag else None


def redis_element(env: Envelope, tag: Optional[str] = None) -> bytes:
    """The JSON element kombu's Redis transport pushes for ``env`` (a fresh
    ``delivery_tag`` unless one is given)."""
    props = dict(env.properties)
    props["body_encoding"] = "base64"
    props["delivery_tag"] = tag or str(uuid.uuid4())
    element = {"body": base64.b64encode(env.body).decode("ascii"),
               "content-encoding": env.content_encoding, "content-type": env.content_type,
               "headers": env.headers, "properties": props}
    return json_dumps(element).encode("utf-8")


# -- an AMQP message (RabbitMQ) ----------------------------------------------------
#: the AMQP basic properties kept in ``Envelope.properties`` (kombu's names)
AMQP_PROPERTIES = ("correlation_id", "reply_to", "priority", "delivery_mode")


def parse_amqp(body: Any, properties: Any, exchange: str = "", routing_key: str = "") -> Envelope:
    """The Envelope of an AMQP message as kombu's py-amqp transport publishes
    it: the body as is, ``content_type``/``content_encoding`` and the
    ``application_headers`` from the basic properties, ``correlation_id``,
    ``reply_to``, ``priority`` and ``delivery_mode`` kept as properties with
    ``delivery_info`` (``exchange``, ``routing_key``).  CeleryMessageError
    when it is not one."""
    if not isinstance(properties, dict):
        raise CeleryMessageError("not a kombu message: no properties")
    if isinstance(body, (bytearray, memoryview)):
        body = bytes(body)
    if not isinstance(body, bytes):
        raise CeleryMessageError("not a kombu message: the body is not bytes")
    headers = properties.get("application_headers")
    if headers is None:
        headers = {}
    if not isinstance(headers, dict):
        raise CeleryMessageError("not a kombu message: the headers are not a table")
    content_type = properties.get("content_type")
    content_encoding = properties.get("content_encoding")
    if content_type is None:
        raise CeleryMessageError("not a kombu message: no content_type property")
    if not isinstance(content_type, str) or not isinstance(content_encoding, (str, type(None))):
        raise CeleryMessageError("not a kombu message: content_type and content_encoding must be text")
    props: Dict[str, Any] = {k: properties[k] for k in AMQP_PROPERTIES if properties.get(k) is not None}
    props["delivery_info"] = {"exchange": exchange, "routing_key": routing_key}
    return Envelope(body, content_type, content_encoding or "binary", dict(headers), props)


def decode_redis(raw: Any, accept: Iterable[str] = ("json",), queue: Optional[str] = None,
                 max_size: Optional[int] = None) -> CeleryMessage:
    """``decode(parse_redis(raw))``."""
    return decode(parse_redis(raw), accept, queue, max_size)


def encode_redis(msg: TaskMessage, serializer: Optional[str] = None) -> bytes:
    """``redis_element(encode(msg))``: what ``LPUSH`` puts on the queue's list."""
    return redis_element(encode(msg, serializer))


__all__ = ["CeleryMessage", "CeleryMessageError", "Envelope", "decode", "decode_redis", "encode",
           "encode_redis", "parse_redis", "parse_amqp", "redis_element", "delivery_tag", "json_dumps", "json_loads",
           "CONTENT_TYPES"]
