"""The control plane on Redis, under the app's ``key_prefix`` P:

    P:control          stream of commands (MAXLEN ~1000); each worker reads
                       past the last entry it saw with XREAD BLOCK
    P:reply:<id>       list of the replies to one command (LPUSH, expires in 60 s);
                       the sender waits on it with BLPOP; <id> is 32 hex
                       digits, and a command whose reply_to is anything else
                       gets no reply
    P:events           stream of event batches (MAXLEN ~EVENTS_KEPT), field e =
                       one batch (greenq/events.py); readers XREAD BLOCK past the last entry seen

Streams rather than pub/sub: a command sent while a worker reconnects is read
when it is back, and a dashboard started later sees the recent events.  The
transport opens a client of its own from the broker URL (socket reads are
cooperative once the worker is patched).
"""
from __future__ import annotations

import time
from typing import Any, List, Optional

import redis

from ...config import mask_url
from ...events import decode_batch
from ...control.base import Document, Transport

COMMANDS_KEPT = 1000
EVENTS_KEPT = 1000              # batches of at most 500 events: bounded memory under load
REPLY_TTL = 60


class RedisTransport(Transport):
    def __init__(self, url: str, config: Any, driver: Any = None) -> None:
        super().__init__(url, config, driver)
        prefix = config.key_prefix
        self.k_control, self.k_events = f"{prefix}:control", f"{prefix}:events"
        self.k_reply = f"{prefix}:reply:"
        self._client: Optional[redis.Redis] = None
        self._last_command = "$"
        self._last_event = "$"

    @property
    def client(self) -> Any:   # a redis.Redis, whose replies redis-py types as bytes | str (ours: bytes)
        if self._client is None:
            timeout = (self.config.section("redis")["socket_timeout"] or 10.0) + 5.0
            self._client = redis.Redis.from_url(self.url, socket_timeout=timeout,
                                                socket_connect_timeout=timeout, socket_keepalive=True)
        return self._client

    def _last_id(self, key: str) -> str:
        last = self.client.xrevrange(key, count=1)
        return last[0][0].decode() if last else "0-0"

    def _read(self, key: str, last: str, timeout: float) -> "tuple[str, List[Any]]":
        found = self.client.xread({key: last}, count=1000, block=max(1, int(timeout * 1000)))
        bodies = []
        for _, entries in found or ():
            for entry_id, fields in entries:
                last = entry_id.decode()
                bodies.append(fields.get(b"e"))
        return last, bodies

    # -- worker side -----------------------------------------------------------
    def listen(self, name: str) -> None:
        self._last_command = self._last_id(self.k_control)

    def receive(self, timeout: float) -> List[Any]:
        self._last_command, bodies = self._read(self.k_control, self._last_command, timeout)
        return bodies

    def where(self) -> str:
        return f"{mask_url(self.url)} stream {self.k_control}"

    def reply(self, reply_to: str, body: str) -> None:
        key = self.k_reply + reply_to
        pipe = self.client.pipeline(transaction=False)
        pipe.lpush(key, body)
        pipe.expire(key, REPLY_TTL)
        pipe.execute()

    def send_events(self, body: str) -> None:
        self.client.xadd(self.k_events, {"e": body}, maxlen=EVENTS_KEPT, approximate=True)

    # -- admin side ------------------------------------------------------------
    def broadcast(self, body: str) -> None:
        self.client.xadd(self.k_control, {"e": body}, maxlen=COMMANDS_KEPT, approximate=True)

    def replies(self, reply_to: str, timeout: float) -> List[Any]:
        key = self.k_reply + reply_to
        deadline = time.monotonic() + timeout
        first = self.client.blpop([key], timeout=max(0.01, timeout)) if timeout > 0 else None
        out = [first[1]] if first else []
        while first and time.monotonic() < deadline + 1:
            more = self.client.lpop(key)
            if more is None:
                break
            out.append(more)
        return out

    def subscribe(self, history: int = 0) -> None:
        self._last_event = "0-0"
        if history:
            older = self.client.xrevrange(self.k_events, count=history)
            if older:
                self._last_event = _before(older[-1][0].decode())
        else:
            self._last_event = self._last_id(self.k_events)

    def events(self, timeout: float) -> List[Document]:
        self._last_event, bodies = self._read(self.k_events, self._last_event, timeout)
        out: List[Document] = []
        for body in bodies:
            out.extend(decode_batch(body))
        return out

    def reset(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()


def _before(entry_id: str) -> str:
    """The stream id just before ``entry_id`` (XREAD returns entries after it)."""
    ms, _, seq = entry_id.partition("-")
    if int(seq) > 0:
        return f"{ms}-{int(seq) - 1}"
    return f"{int(ms) - 1}-{2 ** 64 - 1}" if int(ms) > 0 else "0-0"
