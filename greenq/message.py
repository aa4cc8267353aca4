"""The task message envelope (protocol version 1) and result encoding.

The envelope is always a JSON object; docs/protocol.md describes it field by
field.  Arguments travel inline (``args``/``kwargs``) with the json serializer,
or as base64 in ``body`` with msgpack or pickle.  With a signing key, ``sig``
holds an HMAC-SHA256 over the canonical JSON of every other field.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import pickle
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Sequence, Tuple

from .exceptions import MessageError

PROTOCOL = 1
_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
_loads = json.loads


def new_id() -> str:
    return str(uuid.uuid4())


@dataclass
class TaskMessage:
    """One task call as it travels through the broker."""
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


_HEADER_FIELDS = ("id", "task", "queue", "priority", "eta", "expires", "retries", "created",
                  "root_id", "time_limit", "soft_time_limit", "reply_to")


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


class Codec:
    """Encodes and decodes task messages and results for one app's settings."""

    def __init__(self, serializer: str = "json", accept: Sequence[str] = ("json",),
                 signing_key: str = "", max_size: int = 1048576) -> None:
        self.serializer = serializer
        self.accept = frozenset(accept) | ({serializer} if serializer == "json" else set())
        self._key = signing_key.encode() if signing_key else None
        self.max_size = max_size

    # -- tasks ---------------------------------------------------------------
    def encode(self, msg: TaskMessage) -> bytes:
        env: Dict[str, Any] = {"v": PROTOCOL, "ct": self.serializer}
        for name in _HEADER_FIELDS:
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
            if self._key:
                env["sig"] = self._sign(env)
            data = _dumps(env).encode()
        except (TypeError, ValueError, pickle.PicklingError) as exc:
            raise MessageError(f"cannot serialize arguments of {msg.task} with {self.serializer}: {exc}") from None
        if len(data) > self.max_size:
            raise MessageError(f"message for {msg.task} is {len(data)} bytes, over max_message_size "
                               f"{self.max_size}; pass a reference (a URL, a key) instead of the payload")
        return data

    def decode(self, data: bytes) -> TaskMessage:
        """Decode a message; MessageError says why when it cannot be trusted or read."""
        try:
            env = _loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise MessageError(f"not a greenq message: {exc}") from None
        if not isinstance(env, dict) or "task" not in env or "id" not in env:
            raise MessageError("not a greenq message: no task or id field")
        if env.get("v") != PROTOCOL:
            raise MessageError(f"unsupported protocol version {env.get('v')!r}")
        if self._key:
            sig = env.pop("sig", None)
            if not sig:
                raise MessageError("unsigned message refused (signing_key is set)")
            if not hmac.compare_digest(str(sig), self._sign(env)):
                raise MessageError("forged message: signature does not match")
        ct = env.get("ct", "json")
        if ct not in self.accept:
            raise MessageError(f"content type {ct!r} not in accept_content")
        try:
            if ct == "json":
                args, kwargs = env.get("args", []), env.get("kwargs", {})
            else:
                args, kwargs = deserialize(ct, base64.b64decode(env["body"]))
            if not isinstance(args, list) or not isinstance(kwargs, dict):
                raise ValueError("args must be a list and kwargs an object")
            return TaskMessage(
                task=str(env["task"]), args=args, kwargs=kwargs, id=str(env["id"]),
                queue=env.get("queue", "default"), priority=int(env.get("priority", 0)),
                eta=env.get("eta"), expires=env.get("expires"), retries=int(env.get("retries", 0)),
                created=env.get("created", 0.0), root_id=env.get("root_id"),
                time_limit=env.get("time_limit"), soft_time_limit=env.get("soft_time_limit"),
                reply_to=env.get("reply_to"))
        except MessageError:
            raise
        except Exception as exc:
            raise MessageError(f"malformed message: {exc}") from None

    def _sign(self, env: Dict[str, Any]) -> str:
        canonical = json.dumps(env, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        return hmac.new(self._key, canonical.encode(), hashlib.sha256).hexdigest()

    # -- results -------------------------------------------------------------
    def encode_result(self, meta: Dict[str, Any]) -> bytes:
        """Results are stored as ``<serializer name>:<payload>``."""
        try:
            return self.serializer.encode() + b":" + serialize(self.serializer, meta)
        except (TypeError, ValueError, pickle.PicklingError) as exc:
            # the task returned something the serializer cannot carry: store that as the failure
            fallback = dict(meta, state="FAILURE", result=None,
                            exc={"type": "greenq.exceptions.MessageError", "args": [str(exc)],
                                 "message": f"result not serializable with {self.serializer}: {exc}"})
            return b"json:" + serialize("json", fallback)

    def decode_result(self, data: bytes) -> Dict[str, Any]:
        name, _, payload = bytes(data).partition(b":")
        try:
            return deserialize(name.decode(), payload)
        except MessageError:
            raise
        except Exception as exc:
            raise MessageError(f"cannot decode stored result: {exc}") from None


def peek(data: bytes) -> Tuple[Optional[str], Optional[str]]:
    """Best-effort (id, task) of a raw message, for logs and the dead-letter listing."""
    try:
        env = _loads(data)
        return env.get("id"), env.get("task")
    except Exception:
        return None, None
