"""Writers of control commands straight into a real broker's control plane,
in the layout a worker reads (greenq/transports/redis/control.py, amqp.py), without
greenq's transport: what a forger with access to the broker would write.

``Raw(kind, url, prefix)`` publishes bodies (signed or not, as the test
makes them) and reads the replies sent to its own reply address, which is
named as the app's are (32 hex digits on Redis, ``P.control-reply.<hex>`` on
RabbitMQ)."""
from __future__ import annotations

import json
import socket
import time
import uuid
from typing import Any, Dict, List, Optional

from greenq.signing import Signer


def command(name: str, args: Optional[Dict[str, Any]] = None, reply_to: Any = None, **extra: Any) -> Dict[str, Any]:
    """A command document as ``Control`` builds it."""
    doc = {"id": uuid.uuid4().hex, "command": name, "args": args or {}, "destination": None,
           "reply_to": reply_to, "sent": time.time(), "sender": "forger.1"}
    doc.update(extra)
    return doc


def body(doc: Dict[str, Any], key: str = "") -> bytes:
    """The document's JSON, signed with ``key`` (in the ``control`` domain) when given."""
    return Signer(key).wrap("control", json.dumps(doc).encode())


class RawRedis:
    def __init__(self, url: str, prefix: str) -> None:
        import redis
        self.client = redis.Redis.from_url(url)
        self.prefix = prefix
        self.reply_to = uuid.uuid4().hex

    def publish(self, *bodies: bytes) -> None:
        for b in bodies:
            self.client.xadd(f"{self.prefix}:control", {"e": b})

    def replies(self, timeout: float) -> List[bytes]:
        found = self.client.blpop([f"{self.prefix}:reply:{self.reply_to}"], timeout=min(2.0, max(0.01, timeout)))
        return [found[1]] if found else []

    def keys(self, pattern: str) -> List[bytes]:
        return list(self.client.scan_iter(match=pattern, count=1000))

    def close(self) -> None:
        self.client.close()


class RawAMQP:
    def __init__(self, url: str, prefix: str) -> None:
        import amqp
        from greenq.transports.amqp.common import connection_params
        self.amqp = amqp
        self.prefix = prefix
        self.conn = amqp.Connection(**connection_params(url))
        self.conn.connect()
        self.channel = self.conn.channel()
        self.reply_to = f"{prefix}.control-reply.{uuid.uuid4().hex}"
        self.channel.queue_declare(self.reply_to, exclusive=True, auto_delete=True)
        self.inbox: List[Any] = []
        self.channel.basic_consume(self.reply_to, callback=self.inbox.append, no_ack=True)

    def publish(self, *bodies: bytes) -> None:
        for b in bodies:
            self.channel.basic_publish(self.amqp.Message(b), exchange=f"{self.prefix}.control", routing_key="")

    def replies(self, timeout: float) -> List[bytes]:
        deadline = time.monotonic() + timeout
        while not self.inbox and time.monotonic() < deadline:
            try:
                self.conn.drain_events(timeout=max(0.01, deadline - time.monotonic()))
            except socket.timeout:
                break
        out = [m.body for m in self.inbox]
        self.inbox.clear()
        return out

    def depth(self, queue: str) -> int:
        return self.channel.queue_declare(queue, passive=True)[1]

    def close(self) -> None:
        self.conn.close()


RAW = {"redis": RawRedis, "amqp": RawAMQP}


def replies_to(raw: Any, cmd_id: str, key: str = "", timeout: float = 10) -> List[Dict[str, Any]]:
    """The replies to command ``cmd_id`` that reach ``raw``'s reply address
    within ``timeout`` (verified with ``key`` when given)."""
    signer = Signer(key)
    deadline = time.monotonic() + timeout
    found: List[Dict[str, Any]] = []
    while time.monotonic() < deadline and not found:
        for b in raw.replies(deadline - time.monotonic()):
            reply = json.loads(signer.unwrap("control-reply", b.encode() if isinstance(b, str) else b, "reply"))
            if reply.get("id") == cmd_id:
                found.append(reply)
    return found
