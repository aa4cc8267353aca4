"""Publishing to RabbitMQ: the per-process pool of publisher connections
shared by the broker (``amqp.py``) and the ``rpc://`` backend, and the
encoding of an ``Outgoing`` as an AMQP message."""
from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
from collections import deque
from contextlib import contextmanager
from struct import pack
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import amqp
from amqp import spec
from amqp.exceptions import ChannelError
from amqp.serialization import dumps

from ..config import Config, mask_url
from ..exceptions import BrokerError
from .amqp_common import (AMQP_ERRORS, CONNECTION_ERRORS, H_ETA, Link, Settings, close_quietly,
                          connection_params, declare_base, declare_delays, declare_queue, delay_route,
                          describe, open_connection)
from .base import Outgoing

log = logging.getLogger("greenq.amqp")

_PUBLISH_SIG = pack(">HH", *spec.Basic.Publish)
WRITE_CHUNK = 256 * 1024      # bytes of frames buffered before a write


def publish_frames(channel_id: int, frame_max: int, msg: "amqp.Message", exchange: str,
                   routing_key: str, mandatory: bool) -> List[bytes]:
    """The frames of one ``basic.publish`` (what py-amqp's frame writer sends),
    so that many publishes go out in one write instead of one write each."""
    method = _PUBLISH_SIG + dumps("Bssbb", (0, exchange, routing_key, mandatory, False))
    body = msg.body if isinstance(msg.body, (bytes, bytearray)) else str(msg.body).encode()
    header = pack(">HHQ", spec.Basic.Publish[0], 0, len(body)) + msg._serialize_properties()
    frames = [pack(">BHI", 1, channel_id, len(method)), method, b"\xce",
              pack(">BHI", 2, channel_id, len(header)), header, b"\xce"]
    chunk = frame_max - 8
    for start in range(0, len(body), chunk):
        piece = body[start:start + chunk]
        frames += [pack(">BHI", 3, channel_id, len(piece)), piece, b"\xce"]
    return frames


class Publisher:
    """One connection with one channel, used by one caller at a time.

    ``publish`` only buffers the frames; they are written in large chunks, and
    at the latest by ``flush`` (called by ``wait_confirms`` and when the
    publisher goes back to the pool).  With confirms the channel is in confirm
    mode and ``wait_confirms`` reads the broker's acks for everything published
    since, so ``publish_many`` costs one round trip whatever its size.
    Publishes are ``mandatory`` with confirms: a message no queue took comes
    back and is reported by ``wait_confirms``.
    """

    def __init__(self, params: Dict[str, Any], confirm: bool, role: str) -> None:
        self.pid = os.getpid()
        self.confirm = confirm
        self.conn = open_connection(params, heartbeat=0, role=role)
        self.broken = False
        self.last_used = time.monotonic()
        self.pending: List[bytes] = []
        self.pending_size = 0
        self.reopen()

    def reopen(self) -> None:
        """Open a fresh channel on the connection (after a channel error closed it)."""
        self.channel = self.conn.channel()
        self.channel.auto_decode = False
        self.seq = 0
        self.pending, self.pending_size = [], 0
        self.unconfirmed: deque = deque()     # (delivery tag, item) in publish order
        self.early: set = set()               # tags confirmed out of order
        self.nacked: List[Any] = []
        self.returned: List[Tuple[str, Any]] = []   # (reply text, returned message)
        if self.confirm:
            self.channel.confirm_select()
            self.channel.events["basic_ack"].add(self._on_ack)
            self.channel.events["basic_nack"].add(self._on_nack)
            self.channel.events["basic_return"].add(self._on_return)

    def publish(self, msg: "amqp.Message", exchange: str, routing_key: str, item: Any = None) -> None:
        frames = publish_frames(self.channel.channel_id, self.conn.frame_max, msg, exchange,
                                routing_key, self.confirm)
        self.pending += frames
        self.pending_size += sum(map(len, frames))
        if self.confirm:
            self.seq += 1
            self.unconfirmed.append((self.seq, item))
        if self.pending_size >= WRITE_CHUNK:
            self.flush()

    def flush(self) -> None:
        """Write the buffered publishes."""
        if self.pending:
            data = b"".join(self.pending)
            self.pending, self.pending_size = [], 0
            self.conn.transport.write(data)

    def wait_confirms(self, timeout: float = 30.0) -> Tuple[List[Any], List[Tuple[str, Any]]]:
        """Wait for every outstanding confirm; return (nacked items, returned items)."""
        self.flush()
        deadline = time.monotonic() + timeout
        while self.unconfirmed:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrokerError(f"{len(self.unconfirmed)} publish(es) not confirmed by RabbitMQ "
                                  f"within {timeout:.0f} s")
            try:
                self.conn.drain_events(timeout=left)
            except socket.timeout:
                continue
        nacked, self.nacked = self.nacked, []
        returned, self.returned = self.returned, []
        return nacked, returned

    def _settle(self, tag: int, multiple: bool, nack: bool) -> None:
        unconfirmed = self.unconfirmed
        if multiple:
            while unconfirmed and unconfirmed[0][0] <= tag:
                seq, item = unconfirmed.popleft()
                if nack:
                    self.nacked.append(item)
        elif unconfirmed and unconfirmed[0][0] == tag:
            if nack:
                self.nacked.append(unconfirmed[0][1])
            unconfirmed.popleft()
        else:
            if nack:
                self.nacked.extend(item for seq, item in unconfirmed if seq == tag)
            self.early.add(tag)
        while unconfirmed and unconfirmed[0][0] in self.early:
            self.early.discard(unconfirmed.popleft()[0])

    def _on_ack(self, tag: int, multiple: bool) -> None:
        self._settle(tag, multiple, False)

    def _on_nack(self, tag: int, multiple: bool) -> None:
        self._settle(tag, multiple, True)

    def _on_return(self, exc: Any, exchange: str, routing_key: str, message: Any) -> None:
        # a returned message is confirmed right after; match it by message id
        self.returned.append((getattr(exc, "reply_text", str(exc)), message))

    def check_idle(self) -> None:
        """After a pause, read whatever the broker sent meanwhile (a Close after
        close_all_connections, a restart) so a dead connection is found before
        a publish without confirms would vanish into it."""
        try:
            self.conn.drain_events(timeout=0)
        except socket.timeout:
            pass

    def close(self) -> None:
        close_quietly(self.conn, forked=self.pid != os.getpid())


class ChannelPool:
    """A per-process pool of publishers (connection + channel each), at most
    ``size`` of them; callers beyond that wait for one to come back (threads,
    or greenlets when the process is patched).  A pool used in a forked child
    starts afresh and never touches the parent's sockets.

    Remembers which queues and which parts of the topology were declared by
    this process, so a publish declares a queue only the first time.
    """

    def __init__(self, url: str, settings: Settings, size: int = 8, role: str = "client") -> None:
        self.url = url
        self.params = connection_params(url)
        self.settings = settings
        self.size = max(1, size)
        self.role = role
        self.link = Link(f"{role} publish", url)
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._cond = threading.Condition(threading.Lock())
        self._idle: List[Publisher] = []
        self._count = 0
        self._closed = False
        self.declared: set = set()
        self.delays: set = set()
        self.base_declared = False

    @contextmanager
    def publisher(self) -> Iterator[Publisher]:
        """Borrow a publisher.  An AMQP error inside the block discards it (a
        fresh one is made next time); other errors return it to the pool."""
        pub = self._checkout()
        try:
            yield pub
            pub.flush()
        except AMQP_ERRORS:
            pub.broken = True
            raise
        except BaseException:
            pub.pending, pub.pending_size = [], 0
            pub.broken = pub.broken or bool(pub.unconfirmed)   # a half-read confirm state: start afresh
            raise
        finally:
            self._checkin(pub)

    def _checkout(self) -> Publisher:
        if self._pid != os.getpid():
            self._reset()
        with self._cond:
            while True:
                if self._closed:
                    raise BrokerError("the AMQP broker was closed")
                if self._idle:
                    pub = self._idle.pop()
                    break
                if self._count < self.size:
                    self._count += 1
                    pub = None
                    break
                self._cond.wait(1.0)
        if pub is None:
            try:
                pub = Publisher(self.params, self.settings.confirm_publish, self.role)
            except BaseException:
                with self._cond:
                    self._count -= 1
                    self._cond.notify()
                raise
        elif time.monotonic() - pub.last_used > 1.0:
            try:
                pub.check_idle()
            except AMQP_ERRORS:
                pub.close()
                with self._cond:
                    self._count -= 1
                return self._checkout()
        return pub

    def _checkin(self, pub: Publisher) -> None:
        pub.last_used = time.monotonic()
        if pub.pid != os.getpid():
            return
        if pub.broken or self._closed:
            pub.close()
            with self._cond:
                self._count -= 1
                self._cond.notify()
            return
        with self._cond:
            self._idle.append(pub)
            self._cond.notify()

    def run(self, fn, *args: Any, attempts: int = 3) -> Any:
        """``fn(publisher, *args)`` with up to ``attempts`` tries on fresh
        connections when the connection fails; BrokerError after that."""
        delay = 0.05
        for attempt in range(attempts):
            try:
                with self.publisher() as pub:
                    result = fn(pub, *args)
                self.link.up()
                return result
            except CONNECTION_ERRORS as exc:
                if attempt == attempts - 1:
                    self.link.lost(exc, 0.0)
                    raise BrokerError(f"RabbitMQ at {mask_url(self.url)}: {describe(exc)}") from None
                self.link.lost(exc, delay)
                time.sleep(delay)
                delay *= 4
            except ChannelError as exc:
                raise BrokerError(f"RabbitMQ at {mask_url(self.url)}: {describe(exc)}") from None

    def ensure_queues(self, pub: Publisher, queues: Sequence[str], force: bool = False,
                      delayed: Sequence[str] = ()) -> None:
        """Declare the dead-letter store, ``queues`` and the delay cascades of
        ``delayed`` unless this process already did."""
        if not self.base_declared or force:
            declare_base(pub.channel, self.settings)
            self.base_declared = True
        for name in queues:
            if force or name not in self.declared:
                declare_queue(pub.channel, name, self.settings)
                self.declared.add(name)
        for name in delayed:
            if force or name not in self.delays:
                if name not in self.declared:
                    declare_queue(pub.channel, name, self.settings)
                    self.declared.add(name)
                declare_delays(pub.channel, name)
                self.delays.add(name)

    def close(self) -> None:
        if self._pid != os.getpid():
            self._reset()
            return
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            self._count -= len(idle)
            self._cond.notify_all()
        for pub in idle:
            pub.close()


def pool_size(config: Config) -> int:
    """Publishers per process, from the concurrency (lesson 8): 10 by default."""
    return max(4, min(32, config.worker["concurrency"] // 10))


def delay_ms(m: Outgoing, now: float) -> int:
    """Milliseconds ``m`` must wait (0: ready now)."""
    return max(0, math.ceil((m.eta - now) * 1000)) if m.eta is not None else 0


def encode_message(m: Outgoing, now: float, headers: Optional[Dict[str, Any]] = None) -> tuple:
    """(amqp.Message, exchange, routing key) for ``m``."""
    props: Dict[str, Any] = {"message_id": m.message_id, "delivery_mode": 2}
    if m.priority:
        props["priority"] = m.priority
    headers = dict(headers) if headers else {}
    wait_ms = delay_ms(m, now)
    if wait_ms:
        exchange, key = delay_route(m.queue, wait_ms)
        headers[H_ETA] = float(m.eta)
    else:
        exchange, key = "", m.queue
    if headers:
        props["application_headers"] = headers
    return amqp.Message(m.body, **props), exchange, key
