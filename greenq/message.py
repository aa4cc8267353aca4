"""The task message envelope (protocol version 1) and result encoding.

The envelope is always a JSON object; docs/protocol.md describes it field by
field.  Arguments travel inline (``args``/``kwargs``) with the json serializer,
or as base64 in ``body`` with msgpack or pickle.  With a signing key, ``sig``
holds an HMAC-SHA256 over the canonical JSON of every other field, and every
result and group record is wrapped by greenq.signing with its kind and id in
the signed data: checked before it is deserialized, so pickle is never loaded
from anything unauthenticated (and without a key it is not accepted at all).
"""
from __future__ import annotations

import base64
import json
import logging
import math
import os
import pickle
import re
import time
import dataclasses
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Deque, Dict, List, NoReturn, Optional, Sequence, Set, Tuple

from . import validation
from .exceptions import ConfigError, MessageError, describe
from .signing import Signer

if TYPE_CHECKING:  # pragma: no cover
    from .brokers.base import Outgoing
    from .tracing import Producer

log = logging.getLogger("greenq")

PROTOCOL = 1
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)
_dumps = _ENCODER.encode
_loads = json.loads
_scan_json = json.JSONDecoder().scan_once  # type: ignore[attr-defined]  # set in JSONDecoder.__init__; typeshed omits it


_SIZE_SLACK = 65536    # a stored message may exceed max_message_size by this much (headers, signing)


def _optional_str(option: str, value: Any) -> Optional[str]:
    if value is not None and not isinstance(value, str):
        raise TypeError(f"{option} must be a string, not {type(value).__name__}")
    return value


def _created(option: str, value: Any) -> float:
    return 0.0 if value is None else validation.epoch(option, value)


#: how the decoder checks each envelope field (None = absent, where allowed)
_FIELD_RULES: Dict[str, Callable[[str, Any], Any]] = {
    "task": validation.name,
    "id": validation.name,
    "queue": lambda o, v: "default" if v is None else validation.name(o, v),
    "priority": lambda o, v: 0 if v is None else validation.priority(o, v),
    "eta": lambda o, v: None if v is None else validation.epoch(o, v),
    "expires": lambda o, v: None if v is None else validation.epoch(o, v),
    "retries": lambda o, v: 0 if v is None else validation.count(o, v),
    "created": _created,
    "root_id": _optional_str,
    "time_limit": validation.optional_seconds,
    "soft_time_limit": validation.optional_seconds,
    "reply_to": _optional_str,
}


def _signatures(option: str, value: Any) -> Optional[list]:
    """A list of signature records (greenq.canvas); each is checked in full
    only when the worker sends it, so a bad one fails that step alone."""
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(s, dict) and isinstance(s.get("task"), str)
                                              for s in value):
        raise TypeError(f"{option} must be a list of signature objects")
    return value


def _trace(option: str, value: Any) -> Optional[Dict[str, Any]]:
    """The trace context a traced sender puts in a message (greenq/tracing.py):
    string keys to strings (``traceparent``, ``tracestate``, ``baggage``),
    and ``links``, a list of traceparents.  Only a hint: one that is not of
    this shape is dropped, and the task runs as an untraced one."""
    if not isinstance(value, dict) or len(value) > 16:
        return None
    for key, item in value.items():
        if key == "links":
            if not (isinstance(item, list) and len(item) <= 128
                    and all(isinstance(link, str) and len(link) <= 256 for link in item)):
                return None
        elif not (isinstance(key, str) and len(key) <= 256 and isinstance(item, str) and len(item) <= 8192):
            return None
    return value


#: the workflow fields (greenq.canvas), checked only when a message has one
#: (and the trace context: optional as they are)
_WORKFLOW_RULES = {
    "parent_id": _optional_str,
    "group_id": _optional_str,
    "chord_size": lambda o, v: None if v is None else validation.count(o, v),
    "chord_result": _optional_str,
    "link": _signatures,
    "link_error": _signatures,
    "chain": _signatures,
    "trace": _trace,
}
_WORKFLOW_KEYS = frozenset(_WORKFLOW_RULES)


_NAME = re.compile(r"[^\x00-\x1f\x7f]{1,%d}\Z" % validation.MAX_NAME_BYTES).match
_CONTAINERS = (list, dict, tuple)
_NUMBERS = (float, int)
_MAX_EPOCH, _MAX_SECONDS, _MAX_NAME = validation.MAX_EPOCH, validation.MAX_SECONDS, validation.MAX_NAME_BYTES


def _name_ok(value: Any) -> bool:
    """validation.name's rule as a yes/no, cheap for the ASCII names greenq writes."""
    if type(value) is not str:
        return False
    if value.isascii():         # ASCII is printable exactly when it has no control characters
        return 0 < len(value) <= _MAX_NAME and value.isprintable()
    if _NAME(value) is None:
        return False
    try:                        # a lone surrogate is not UTF-8: the rules refuse it with the reason
        return len(value.encode("utf-8")) <= _MAX_NAME
    except UnicodeEncodeError:
        return False


#: task and queue names that passed ``_name_ok`` (the rule is a pure function of
#: the name); bounded: past the bound, new names are checked every time
_KNOWN_NAMES: Set[str] = set()
_KNOWN_NAMES_MAX = 4096


def _names_ok(task: Any, queue: Any) -> bool:
    """Are ``task`` and ``queue`` good names?  Each found good is remembered
    (``_KNOWN_NAMES``, bounded): the next message's check is a set lookup,
    done inline by the callers (a name not a str is never in the set)."""
    known = _KNOWN_NAMES
    for name in (task, queue):
        if type(name) is not str or name not in known:
            if not _name_ok(name):
                return False
            if len(known) < _KNOWN_NAMES_MAX:
                known.add(name)
    return True


def _plain_message(env: Dict[str, Any], args: Any, kwargs: Any) -> Optional["TaskMessage"]:
    """The message when every header field is plainly valid (the hot path: a
    message greenq wrote), else None and the rules of _FIELD_RULES decide.
    The workflow fields and the arguments are checked apart."""
    keys = env.keys()
    if keys == _PLAIN_KEYS or keys == _PLAIN_KEYS_REPLY:    # as greenq's client writes it: no optional
        return _plainest_message(env, args, kwargs)         # header field but reply_to
    get = env.get
    task, task_id, queue = env["task"], env["id"], get("queue", "default")
    priority, retries = get("priority", 0), get("retries", 0)
    eta, expires, created = get("eta"), get("expires"), get("created", 0.0)
    hard, soft = get("time_limit"), get("soft_time_limit")
    root_id, reply_to = get("root_id"), get("reply_to")
    if not (type(task) is str and task in _KNOWN_NAMES and type(queue) is str and queue in _KNOWN_NAMES
            or _names_ok(task, queue)):
        return None
    if not (_name_ok(task_id)
            and type(priority) is int and 0 <= priority <= 9
            and type(retries) is int and 0 <= retries <= 2 ** 31
            and (eta is None or (type(eta) in _NUMBERS and 0 <= eta <= _MAX_EPOCH))
            and (expires is None or (type(expires) in _NUMBERS and 0 <= expires <= _MAX_EPOCH))
            and type(created) in _NUMBERS and 0 <= created <= _MAX_EPOCH
            and (hard is None or (type(hard) in _NUMBERS and 0 <= hard <= _MAX_SECONDS))
            and (soft is None or (type(soft) in _NUMBERS and 0 <= soft <= _MAX_SECONDS))
            and (root_id is None or type(root_id) is str) and (reply_to is None or type(reply_to) is str)):
        return None
    return TaskMessage(task, args, kwargs, task_id, queue, priority,     # in TaskMessage's field order
                       None if eta is None else float(eta), None if expires is None else float(expires),
                       retries, float(created), root_id, None if hard is None else float(hard),
                       None if soft is None else float(soft), reply_to)


#: the keys of the envelope of a message with no optional header field but
#: ``reply_to`` (the commonest: ``delay()`` from outside a task), with and without it
_PLAIN_KEYS = frozenset(("v", "ct", "id", "task", "queue", "priority", "retries", "created", "args", "kwargs"))
_PLAIN_KEYS_REPLY = _PLAIN_KEYS | {"reply_to"}
_PLAIN_SHAPES = (_PLAIN_KEYS, _PLAIN_KEYS_REPLY)


def _plainest_message(env: Dict[str, Any], args: Any, kwargs: Any) -> Optional["TaskMessage"]:
    """``_plain_message`` of an envelope with the keys of ``_PLAIN_KEYS`` (and
    maybe ``reply_to``): the same checks, none for the fields it has not."""
    task, task_id, queue = env["task"], env["id"], env["queue"]
    priority, retries, created, reply_to = env["priority"], env["retries"], env["created"], env.get("reply_to")
    if not (type(task) is str and task in _KNOWN_NAMES and type(queue) is str and queue in _KNOWN_NAMES
            or _names_ok(task, queue)):
        return None
    if not ((type(task_id) is str and task_id.isascii() and 0 < len(task_id) <= _MAX_NAME
             and task_id.isprintable() or _name_ok(task_id))      # _name_ok, its ASCII case inline
            and type(priority) is int and 0 <= priority <= 9
            and type(retries) is int and 0 <= retries <= 2 ** 31
            and type(created) in _NUMBERS and 0 <= created <= _MAX_EPOCH
            and (reply_to is None or type(reply_to) is str)):
        return None
    return TaskMessage(task, args, kwargs, task_id, queue, priority, None, None, retries, float(created),
                       None, None, None, reply_to)


def _plain_arguments(args: Any, kwargs: Any) -> bool:
    """True for a list of scalars and a dict of str keys to scalars (the hot
    path); anything else goes through validation.arguments."""
    if type(args) is not list or type(kwargs) is not dict:
        return False
    for value in args:
        if type(value) in _CONTAINERS:
            return False
    for key, value in kwargs.items():
        if type(key) is not str or type(value) in _CONTAINERS:
            return False
    return True


def _load_envelope(data: bytes) -> Any:
    """``json.loads(data)``, without its detours for the body greenq writes
    (UTF-8, an object starting with a key); anything else, and every error,
    takes json.loads itself."""
    if data[:2] == b'{"':
        text = data.decode("utf-8", "surrogatepass")     # what json.loads does with such bytes
        try:
            value, end = _scan_json(text, 0)
        except StopIteration:
            pass
        else:
            if end == len(text):
                return value
    return _loads(data)


_dumps_canonical = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode


def _canonical(env: Dict[str, Any]) -> bytes:
    """What a task message's ``sig`` authenticates: every other field, as JSON
    with sorted keys, no spaces, ASCII only (docs/protocol.md)."""
    return _dumps_canonical(env).encode()


#: task ids are made this many at a time (one ``os.urandom`` call)
ID_BATCH = 256
# the version (4) and variant (RFC 4122) bits of each 16 random bytes, as uuid.UUID(version=4) sets them
_ID_CLEAR = int.from_bytes((b"\xff" * 6 + b"\x0f\xff\x3f" + b"\xff" * 7) * ID_BATCH, "big")
_ID_SET = int.from_bytes((b"\x00" * 6 + b"\x40\x00\x80" + b"\x00" * 7) * ID_BATCH, "big")
_ID_SPACES = b" " * ID_BATCH
_ids: Deque[str] = deque()           # made, not yet given out; emptied in a forked child
os.register_at_fork(after_in_child=_ids.clear)


def new_id() -> str:
    """A new task id: what ``str(uuid.uuid4())`` gives (16 bytes from
    ``os.urandom``, the version and variant bits set), made ID_BATCH at a
    time.  Each is given out once (``deque.popleft`` is atomic), and a forked
    child never gives out one its parent made (the batch is emptied at fork,
    when the app's connections are also renewed)."""
    try:
        return _ids.popleft()
    except IndexError:
        pass
    size = 16 * ID_BATCH
    # the hex in 4-digit groups, each followed by "-": 40 characters an id,
    # "aaaa-aaaa-bbbb-cccc-dddd-eeee-eeee-eeee-"; the id's last "-" made a space
    # and the three dashes inside its first and last groups cut out (offsets 34,
    # 29, 4 as each cut shortens the id), all in C: "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee "
    h = bytearray((int.from_bytes(os.urandom(size), "big") & _ID_CLEAR | _ID_SET).to_bytes(size, "big")
                  .hex("-", 2), "ascii")
    h.append(45)
    h[39::40] = _ID_SPACES
    del h[34::40]
    del h[29::39]
    del h[4::38]
    made = h.decode("ascii").split()
    _ids.extend(made[1:])
    return made[0]


@dataclass(slots=True)
class TaskMessage:
    """One task call as it travels through the broker.  Slotted: a worker
    holds one per message in flight (10,000 at ``-c 10000``), and a
    ``__dict__`` would add an object and 48 bytes to each."""
    task: str
    args: Sequence[Any] = ()
    kwargs: Dict[str, Any] = field(default_factory=dict)
    id: str = field(default_factory=new_id)
    queue: str = "default"
    priority: int = 0
    eta: Optional[float] = None       # epoch seconds; None = now
    expires: Optional[float] = None   # epoch seconds; None = never
    retries: int = 0
    created: float = field(default_factory=time.time)
    root_id: Optional[str] = None     # first task of a retry chain
    time_limit: Optional[float] = None
    soft_time_limit: Optional[float] = None
    reply_to: Optional[str] = None    # where rpc:// results go
    # workflows (greenq.canvas): the calling task, the group, what follows
    parent_id: Optional[str] = None
    group_id: Optional[str] = None
    chord_size: Optional[int] = None  # set on chord members: how many the chord waits for
    chord_result: Optional[str] = None  # set on chord members: the id the chord's outcome is stored under
    link: Optional[list] = None       # signatures sent with the result on success
    link_error: Optional[list] = None  # signatures sent with the task id on failure
    chain: Optional[list] = None      # the chain's next steps, in order
    #: the trace context (greenq/tracing.py): written only by a sender with [greenq] tracing on
    trace: Optional[Dict[str, Any]] = None

    def for_retry(self, eta: Optional[float]) -> "TaskMessage":
        """The message that runs this call again at ``eta``: same id, one more retry."""
        return dataclasses.replace(self, eta=eta, retries=self.retries + 1, created=self.created)


_HEADER_FIELDS = ("id", "task", "queue", "priority", "eta", "expires", "retries", "created",
                  "root_id", "time_limit", "soft_time_limit", "reply_to",
                  "parent_id", "group_id", "chord_size", "chord_result", "link", "link_error", "chain")
#: with tracing on (greenq/tracing.py), the trace context too: a field older
#: workers ignore, as they ignore every field they do not know
TRACED_FIELDS = _HEADER_FIELDS + ("trace",)


def _msgpack():
    try:
        import msgpack
    except ImportError:  # pragma: no cover - depends on the install
        raise MessageError("serializer msgpack needs the msgpack package: pip install greenq[msgpack]") from None
    return msgpack


def serialize(name: str, value: Any) -> bytes:
    if name == "json":
        return _dumps(value).encode()
    if name == "msgpack":
        return _msgpack().packb(value, use_bin_type=True)
    if name == "pickle":
        return pickle.dumps(value, protocol=4)
    raise MessageError(f"unknown serializer {name!r}")


def deserialize(name: str, data: bytes) -> Any:
    if name == "json":
        return _loads(data)
    if name == "msgpack":
        return _msgpack().unpackb(data, raw=False)
    if name == "pickle":
        return pickle.loads(data)
    raise MessageError(f"unknown serializer {name!r}")


#: the kinds of stored record (the signing domain of each)
RESULT, GROUP = "result", "group"


def check_trust(serializer: str, accept: Sequence[str], signing_key: str, where: str = "") -> None:
    """ConfigError (``where``: the origin of the setting, for its message) when
    pickle would be used without a signing key: pickle runs code, so it is
    loaded only from what an HMAC has authenticated."""
    if "pickle" in (serializer, *accept) and not Signer(signing_key):
        raise ConfigError(f"{where + ': ' if where else ''}[greenq] serializer = {serializer}, "
                          f"accept_content = {','.join(accept)}: pickle without [greenq] signing_key is "
                          "refused (pickle runs code, so it is loaded only from signed messages and "
                          "records); set signing_key, the same on every client and worker, or use json "
                          "or msgpack")


_esc = json.encoder.encode_basestring      # how _dumps writes a string (ensure_ascii=False)
_c_encoder = getattr(json.encoder, "c_make_encoder", None)
_isfinite = math.isfinite


def _text_of(kind: type) -> Optional[Callable[[Any], Optional[str]]]:
    """How _dumps writes a value of exactly type ``kind`` (None: it may not be a plain one)."""
    if kind is str:
        return _esc
    if kind is int:
        return int.__repr__
    if kind is float:
        return lambda value: float.__repr__(value) if _isfinite(value) else None
    return None


#: each header field: its name, its key as written after a comma, the one type a
#: plain message has there and how _dumps writes it (None: no plain value)
_PLAIN_LAYOUT: Tuple[Tuple[str, str, type, Optional[Callable[[Any], Optional[str]]]], ...] = tuple(
    (name, f',"{name}":', kind, _text_of(kind)) for name, kind in (
        ("id", str), ("task", str), ("queue", str), ("priority", int), ("eta", float), ("expires", float),
        ("retries", int), ("created", float), ("root_id", str), ("time_limit", float),
        ("soft_time_limit", float), ("reply_to", str), ("parent_id", str), ("group_id", str),
        ("chord_size", int), ("chord_result", str), ("link", list), ("link_error", list), ("chain", list)))
assert tuple(row[0] for row in _PLAIN_LAYOUT) == _HEADER_FIELDS
_PLAIN_START = '{"v":%d,"ct":"json"' % PROTOCOL


#: ``_dumps``'s C encoder made once, without the record of containers being
#: written that finds a circular reference (so it has no state: threads share
#: it); a circular reference is a RecursionError here, and _plain_json leaves
#: such a message to the dict, which says "Circular reference detected"
_PAIR_ENCODER = None if _c_encoder is None else \
    _c_encoder(None, _ENCODER.default, _esc, None, ":", ",", False, False, True)


def _dumps_pair(pair: Dict[str, Any]) -> str:
    """``_dumps(pair)`` without its Python layers (the same C encoder, the same
    settings); RecursionError for a circular reference."""
    if _PAIR_ENCODER is None:           # pragma: no cover - CPython has the C encoder
        return _dumps(pair)
    return "".join(_PAIR_ENCODER(pair, 0))


def _plain_json(msg: "TaskMessage", args: Any, kwargs: Any) -> Optional[str]:
    """The json envelope of an unsigned message exactly as ``Codec.encode``'s
    dict of it comes out of ``_dumps``, written in one pass, when every header
    field of ``msg`` (slotted: read by attribute) is None (left out) or of its
    plain type (str names, int priority and retries, finite float times, no
    workflow lists); None for any other message, which takes the dict.
    Raises what ``_dumps`` raises for arguments it cannot write."""
    try:
        tail = _dumps_pair({"args": list(args), "kwargs": kwargs})[1:]    # '"args":[...],"kwargs":{...}}'
    except RecursionError:              # circular, or nested past the interpreter's limit: the dict says
        return None
    task_id, task, queue, created, reply_to = msg.id, msg.task, msg.queue, msg.created, msg.reply_to
    priority, retries = msg.priority, msg.retries
    if (type(task_id) is str and type(task) is str and type(queue) is str and type(priority) is int
            and type(retries) is int and type(created) is float and _isfinite(created)
            and (reply_to is None or type(reply_to) is str)
            and msg.eta is None and msg.expires is None and msg.root_id is None
            and msg.time_limit is None and msg.soft_time_limit is None
            and msg.parent_id is None and msg.group_id is None and msg.chord_size is None
            and msg.chord_result is None and msg.link is None and msg.link_error is None
            and msg.chain is None):      # the commonest: a delay() from outside a task
        reply = "" if reply_to is None else f',"reply_to":{_esc(reply_to)}'
        return (f'{_PLAIN_START},"id":{_esc(task_id)},"task":{_esc(task)},"queue":{_esc(queue)},'
                f'"priority":{int.__repr__(priority)},"retries":{int.__repr__(retries)},'
                f'"created":{float.__repr__(created)}{reply},{tail}')
    parts = [_PLAIN_START]
    add = parts.append
    for name, key, kind, text in _PLAIN_LAYOUT:
        value = getattr(msg, name)
        if value is None:
            continue
        if type(value) is not kind or text is None:
            return None
        value = text(value)
        if value is None:
            return None
        add(key)
        add(value)
    add(",")
    add(tail)
    return "".join(parts)


def _plain_shared(msg: "TaskMessage", heads: Dict[Tuple[Any, ...], Tuple[float, str]]) -> Optional[str]:
    """``_plain_json(msg, msg.args, msg.kwargs)`` for one message of a batch:
    the envelope's fields after the id (task, queue, priority, retries,
    created, reply address) are written once for the messages of a batch that
    share them (``heads``, kept by the caller for one batch; ``created`` is
    shared only when it is the same float object, as ``build_many`` makes
    it), the id and the arguments for each.  Same bytes, same errors."""
    args = msg.args
    if type(args) is not list and type(args) is not tuple:     # written as a list, as _plain_json does
        args = list(args)
    task_id, task, queue, created, reply_to = msg.id, msg.task, msg.queue, msg.created, msg.reply_to
    priority, retries = msg.priority, msg.retries
    if not (type(task_id) is str and type(task) is str and type(queue) is str and type(priority) is int
            and type(retries) is int and type(created) is float
            and (reply_to is None or type(reply_to) is str)
            and msg.eta is None and msg.expires is None and msg.root_id is None
            and msg.time_limit is None and msg.soft_time_limit is None
            and msg.parent_id is None and msg.group_id is None and msg.chord_size is None
            and msg.chord_result is None and msg.link is None and msg.link_error is None
            and msg.chain is None):
        return _plain_json(msg, args, msg.kwargs)
    try:
        tail = _dumps_pair({"args": args, "kwargs": msg.kwargs})[1:]
    except RecursionError:              # circular, or nested past the interpreter's limit: the dict says
        return None
    key = (task, queue, priority, retries, reply_to)      # exact types: no 1 == 1.0 == True mix-ups
    found = heads.get(key)
    if found is not None and found[0] is created:
        head = found[1]
    elif _isfinite(created):
        reply = "" if reply_to is None else f',"reply_to":{_esc(reply_to)}'
        head = (f',"task":{_esc(task)},"queue":{_esc(queue)},"priority":{int.__repr__(priority)},'
                f'"retries":{int.__repr__(retries)},"created":{float.__repr__(created)}{reply},')
        heads[key] = (created, head)
    else:
        return None
    return f'{_PLAIN_START},"id":{_esc(task_id)}{head}{tail}'


_OUTGOING: list = []


def _outgoing() -> Any:
    """``greenq.brokers.base.Outgoing``, imported on first use (that module imports this one)."""
    if not _OUTGOING:
        from .brokers.base import Outgoing
        _OUTGOING.append(Outgoing)
    return _OUTGOING[0]


class Codec:
    """Encodes and decodes task messages and results for one app's settings.
    Raises ConfigError for pickle without a signing key (``check_trust``)."""

    def __init__(self, serializer: str = "json", accept: Sequence[str] = ("json",),
                 signing_key: str = "", max_size: int = 1048576, celery_queues: Sequence[str] = ()) -> None:
        check_trust(serializer, accept, signing_key)
        self.serializer = serializer
        self.accept = frozenset(accept) | ({serializer} if serializer == "json" else set())
        self.signer = Signer(signing_key)
        self.signed = bool(self.signer)
        self.max_size = max_size
        #: queues that speak Celery's protocol 2 ([greenq] celery_queues): what
        #: goes there is encoded as kombu's JSON element (greenq.celery.protocol)
        self.celery_queues = frozenset(celery_queues)
        self._plain = serializer == "json" and not self.signed   # encode may take _plain_json
        #: called with each task sent (``outgoing``): the task-sent events, when on
        self.sent_sink: Optional[Callable[[TaskMessage], None]] = None
        #: [greenq] tracing (greenq/tracing.py): makes ``outgoing``'s producer spans; None = off
        self.tracer: Optional["Producer"] = None

    # -- tasks ---------------------------------------------------------------
    def encode(self, msg: TaskMessage, fields: Sequence[str] = _HEADER_FIELDS) -> bytes:
        """``msg`` as the bytes a broker carries (``fields``: the envelope's
        header fields; ``TRACED_FIELDS`` with tracing on).  A message for a
        queue in ``celery_queues`` is kombu's JSON element instead."""
        if self.celery_queues and msg.queue in self.celery_queues:
            return self._encode_celery(msg)
        if self._plain and fields is _HEADER_FIELDS and type(msg) is TaskMessage:   # the usual message, in one pass
            try:
                text = _plain_json(msg, msg.args, msg.kwargs)
            except (TypeError, ValueError) as exc:
                raise MessageError(f"cannot serialize arguments of {msg.task} with json: {exc}") from None
            if text is not None:
                data = text.encode()
                if len(data) > self.max_size:
                    self._too_big(msg, data)
                return data
        env: Dict[str, Any] = {"v": PROTOCOL, "ct": self.serializer}
        for name in fields:
            value = getattr(msg, name)
            if value is not None:
                env[name] = value
        try:
            if self.serializer == "json":
                env["args"] = list(msg.args)
                env["kwargs"] = msg.kwargs
            else:
                env["body"] = base64.b64encode(
                    serialize(self.serializer, [list(msg.args), msg.kwargs])).decode()
            if self.signed:
                env["sig"] = self._sign(env)
            data = _dumps(env).encode()
        except (TypeError, ValueError, pickle.PicklingError) as exc:
            raise MessageError(f"cannot serialize arguments of {msg.task} with {self.serializer}: {exc}") from None
        if len(data) > self.max_size:
            self._too_big(msg, data)
        return data

    def _encode_celery(self, msg: TaskMessage) -> bytes:
        """``msg`` as a Celery protocol 2 message (kombu's JSON element, the
        body in base64), for a queue in ``celery_queues``."""
        from .celery.protocol import CeleryMessage, encode_redis
        serializer = msg.serializer if isinstance(msg, CeleryMessage) else self.serializer
        try:
            data = encode_redis(msg, serializer)
        except (TypeError, ValueError, pickle.PicklingError) as exc:
            raise MessageError(f"cannot serialize arguments of {msg.task} with {serializer}: {exc}") from None
        if len(data) > self.max_size:
            self._too_big(msg, data)
        return data

    def _too_big(self, msg: TaskMessage, data: bytes) -> NoReturn:
        raise MessageError(f"message for {msg.task} is {len(data)} bytes, over max_message_size "
                           f"{self.max_size}; pass a reference (a URL, a key) instead of the payload")

    def outgoing(self, msg: TaskMessage, sent: bool = True) -> "Outgoing":
        """``msg`` encoded, with the routing facts a broker needs beside it.
        ``sent``: a task sent (not a message moved to wait for its eta), which
        ``sent_sink`` hears of when one is set (task-sent events)."""
        if self.tracer is not None:             # one test when tracing is off
            return self.tracer.outgoing(self, msg, sent)
        eta = msg.eta
        if sent and self.celery_queues and msg.queue in self.celery_queues:
            eta = None      # Celery's way: on the queue at once, its eta in the message (docs/celery.md)
        out = _outgoing()(msg.queue, self.encode(msg), msg.id, msg.priority, eta)
        if sent and self.sent_sink is not None:
            self.tell_sent(msg)
        return out

    def tell_sent(self, msg: TaskMessage) -> None:
        """Tell ``sent_sink`` (set) of ``msg``: an event must never stop a send."""
        try:
            self.sent_sink(msg)                 # type: ignore[misc]
        except Exception:
            log.warning("task-sent event for %s failed", msg.id, exc_info=True)

    def outgoing_many(self, msgs: Sequence[TaskMessage]) -> List["Outgoing"]:
        """``[self.outgoing(m) for m in msgs]``, the same bytes and the same
        checks (``max_message_size``, arguments json cannot write), with what
        only depends on the settings decided once and the envelope fields
        that messages of one task, queue and clock read share written once
        (``_plain_shared``).  Tracing, Celery queues, signing and other
        serializers take ``outgoing`` for each message."""
        if self.tracer is not None or self.celery_queues or not self._plain:
            return [self.outgoing(m) for m in msgs]
        make = _outgoing()
        sink = self.sent_sink
        max_size = self.max_size
        heads: Dict[Tuple[Any, ...], Tuple[float, str]] = {}
        out: List["Outgoing"] = []
        add = out.append
        for msg in msgs:
            text = None
            if type(msg) is TaskMessage:
                try:
                    text = _plain_shared(msg, heads)
                except (TypeError, ValueError) as exc:
                    raise MessageError(f"cannot serialize arguments of {msg.task} with json: {exc}") from None
            if text is None:
                data = self.encode(msg)
            else:
                data = text.encode()
                if len(data) > max_size:
                    self._too_big(msg, data)
            add(make(msg.queue, data, msg.id, msg.priority, msg.eta))
            if sink is not None:
                self.tell_sent(msg)
        return out

    def decode(self, data: Any) -> TaskMessage:
        """Decode and check a message; anything that cannot be trusted or read
        raises MessageError saying why, and nothing else is raised: every
        field is checked here, with the rules of ``greenq.validation``."""
        try:
            return self._decode(data)
        except MessageError:
            raise
        except RecursionError:
            raise MessageError("malformed message: nested too deeply") from None
        except Exception as exc:
            raise MessageError(f"malformed message: {describe(exc)}") from None

    def _decode(self, data: Any) -> TaskMessage:
        if type(data) is not bytes:
            if isinstance(data, str):
                data = data.encode("utf-8", "surrogateescape")
            elif isinstance(data, (bytes, bytearray, memoryview)):
                data = bytes(data)
            else:
                raise MessageError(f"not a greenq message: a body of type {type(data).__name__}")
        if len(data) > self.max_size + _SIZE_SLACK:
            raise MessageError(f"message is {len(data)} bytes, over max_message_size {self.max_size}")
        try:
            env = _load_envelope(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise MessageError(f"not a greenq message: {describe(exc)}") from None
        except RecursionError:
            raise MessageError("malformed message: nested too deeply to decode") from None
        if (type(env) is dict and not self.signed and env.keys() in _PLAIN_SHAPES and type(env["v"]) is int
                and env["v"] == PROTOCOL and env["ct"] == "json" and "json" in self.accept):
            # the commonest message (a plain delay(), unsigned): the checks below that its keys
            # leave, in one test; anything off in its values takes them all
            args, kwargs = env["args"], env["kwargs"]
            msg = _plainest_message(env, args, kwargs)
            if msg is not None and _plain_arguments(args, kwargs):
                return msg
        if not isinstance(env, dict):
            raise MessageError(f"not a greenq message: a JSON {type(env).__name__}, not an object")
        if "task" not in env or "id" not in env:
            raise MessageError("not a greenq message: no task or id field")
        version = env.get("v")
        if type(version) is not int or version != PROTOCOL:
            raise MessageError(f"unsupported protocol version {version!r:.40}")
        if self.signed:
            sig = env.pop("sig", None)
            if not sig or not isinstance(sig, str):
                raise MessageError("unsigned message refused (signing_key is set)")
            if not self.signer.verify(_canonical(env), sig):
                raise MessageError("forged message: signature does not match")
        ct = env.get("ct", "json")
        if not isinstance(ct, str) or ct not in self.accept:
            raise MessageError(f"content type {ct!r:.40} not in accept_content")
        if ct == "json":
            args, kwargs = env.get("args", []), env.get("kwargs", {})
        else:
            body = env.get("body")
            if not isinstance(body, str):
                raise MessageError(f"field body must be base64 text with content type {ct}")
            try:
                payload = deserialize(ct, base64.b64decode(body, validate=True))
            except MessageError:
                raise
            except Exception as exc:
                raise MessageError(f"body does not decode with {ct}: {describe(exc)}") from None
            if not isinstance(payload, (list, tuple)) or len(payload) != 2:
                raise MessageError(f"body must decode with {ct} to [args, kwargs]")
            args, kwargs = payload
        if isinstance(args, tuple):
            args = list(args)
        try:
            msg = _plain_message(env, args, kwargs)
            if msg is None:             # something is off: the rules say what, or normalise it
                msg = TaskMessage(args=args, kwargs=kwargs, **{
                    key: check(key, env.get(key)) for key, check in _FIELD_RULES.items()})
            if not _WORKFLOW_KEYS.isdisjoint(env):
                for key, check in _WORKFLOW_RULES.items():
                    setattr(msg, key, check(key, env.get(key)))
            if not _plain_arguments(args, kwargs):
                validation.arguments(args, kwargs)
        except (TypeError, ValueError) as exc:
            raise MessageError(f"malformed message: {exc}") from None
        return msg

    def _sign(self, env: Dict[str, Any]) -> str:
        return self.signer.tag(_canonical(env))

    # -- results and group records ----------------------------------------------
    def encode_result(self, meta: Dict[str, Any], kind: str = RESULT) -> bytes:
        """A stored record: ``<serializer name>:<payload>``, and with a signing
        key wrapped by greenq.signing, the record's kind and ``meta["id"]`` (the
        task or group id) in the signed data, so it is refused under any other
        id.  Never raises: a value the serializer cannot carry (an object of a
        local class, a structure nested too deeply) is stored as a FAILURE
        saying so."""
        try:
            body = self.serializer.encode() + b":" + serialize(self.serializer, meta)
        except Exception as exc:
            reason = f"result not serializable with {self.serializer}: {describe(exc)}"
            fallback = {key: meta[key] for key in ("id", "task", "retries", "date_done")
                        if isinstance(meta.get(key), (str, int, float))}
            fallback.update(state="FAILURE", result=None, exc={
                "type": "greenq.exceptions.MessageError", "args": [reason], "message": reason})
            if isinstance(meta.get("traceback"), str):
                fallback["traceback"] = meta["traceback"]
            body = b"json:" + serialize("json", fallback)
        if not self.signed:
            return body
        return self.signer.wrap(f"{kind}:{meta.get('id', '')}", body)

    def decode_result(self, data: Any, record_id: str, kind: str = RESULT, where: str = "") -> Dict[str, Any]:
        """Decode the record stored for ``record_id`` (a task id; a group id
        for kind GROUP).  With a signing key its HMAC is checked first: a
        record unsigned, forged or signed for another id is refused before
        anything is deserialized, with a log line naming it and ``where`` it
        was read.  Only a serializer in ``accept_content`` (or json, which
        cannot run code) is used.  MessageError says why one cannot be read."""
        what = f"{kind} record of {record_id}"
        try:                    # without a key: a tag, if any, is stripped unchecked
            data = self.signer.unwrap(f"{kind}:{record_id}", data, what)
        except MessageError as exc:
            log.error("%s%s", exc, f" (read from {where})" if where else "")
            raise
        except TypeError:
            raise MessageError(f"cannot decode {what}: a {type(data).__name__}, not bytes") from None
        try:
            name, _, payload = bytes(data).partition(b":")
            ct = name.decode("ascii")
        except Exception:
            raise MessageError(f"cannot decode {what}: no serializer name") from None
        if ct not in self.accept and ct != "json":
            raise MessageError(f"{what} uses serializer {ct!r:.40}, not in accept_content")
        try:
            meta = deserialize(ct, payload)
        except MessageError:
            raise
        except Exception as exc:
            raise MessageError(f"cannot decode {what}: {describe(exc)}") from None
        if not isinstance(meta, dict) or not isinstance(meta.get("state"), str):
            raise MessageError(f"cannot decode {what}: not a result record")
        exc_info = meta.get("exc")
        if exc_info is not None and not (isinstance(exc_info, dict) and isinstance(exc_info.get("type"), str)
                                         and isinstance(exc_info.get("args", []), list)):
            raise MessageError(f"cannot decode {what}: malformed exception record")
        return meta


def peek(data: bytes) -> Tuple[Optional[str], Optional[str]]:
    """Best-effort (id, task) of a raw message (greenq's, or a Celery one in
    kombu's JSON element), for logs and the dead-letter listing."""
    try:
        env = _loads(data)
        if "task" not in env and isinstance(env.get("headers"), dict):
            env = env["headers"]
        return env.get("id"), env.get("task")
    except Exception:
        return None, None
