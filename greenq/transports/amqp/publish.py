"""Publishing to RabbitMQ: the per-process pool of publisher connections
shared by the broker (``amqp.py``) and the ``rpc://`` backend, and an
``Outgoing`` as the body, properties and route of a publish.

The hot path (one ``delay()``) without confirms is: take an idle publisher
from the pool without a lock, append the frames of one ``basic.publish``
(packed by ``amqp_wire``, the method frame cached per routing key), write
them with one ``sendall`` (``amqp_adapter``), give the publisher back.  With
confirms it is ``ChannelPool.publish_confirmed`` on the pool's
``SharedPublisher``, where concurrent callers share the confirm waits.
"""
from __future__ import annotations

import logging
import math
import socket
import threading
import time
from collections import deque
from contextlib import contextmanager
from struct import Struct, pack
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, cast

import amqp
from amqp import spec
from amqp.exceptions import ChannelError

from ...backoff import backoff
from ...config import Config, mask_url
from ...exceptions import BrokerError
from .adapter import RawConnection, close_quietly
from .common import (AMQP_ERRORS, CONNECTION_ERRORS, FORKS, H_ETA, ConnectionState, Settings, connection_params,
                          declare_base, declare_delays, declare_queue, describe,
                          open_connection)
from .meta import as_bytes
from .wire import METHOD, content_frames, encode_properties, method_frame, task_properties
from ...brokers.base import Outgoing

log = logging.getLogger("greenq.amqp")

_ACK_SIG = pack(">HH", *spec.Basic.Ack)
_NACK_SIG = pack(">HH", *spec.Basic.Nack)
_CONFIRM_SIGS = (_ACK_SIG, _NACK_SIG)
_TAG_BITS = Struct(">QB")     # basic.ack / basic.nack: delivery tag, bits (multiple first)

WRITE_CHUNK = 256 * 1024      # bytes of frames buffered before a write
METHOD_CACHE_MAX = 4096       # cached basic.publish method frames per publisher


def publish_frames(channel_id: int, frame_max: int, msg: "amqp.Message", exchange: str,
                   routing_key: str, mandatory: bool) -> List[bytes]:
    """The frames of one ``basic.publish`` of ``msg`` (what py-amqp's frame
    writer sends for it)."""
    return ([method_frame(channel_id, exchange, routing_key, mandatory)]
            + content_frames(channel_id, frame_max, as_bytes(msg.body), encode_properties(msg.properties)))


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
        self.forks = FORKS[0]
        self.confirm = confirm
        self.conn = open_connection(params, heartbeat=0, role=role)
        self.raw = RawConnection(self.conn)   # a confirm is read with one recv
        self.broken = False
        self.last_used = time.monotonic()
        self.pending: List[bytes] = []
        self.pending_size = 0
        self.reopen()

    def reopen(self) -> None:
        """Open a fresh channel on the connection (after a channel error closed it)."""
        self.channel = self.conn.channel()
        self.channel.auto_decode = False
        self.channel_id = self.channel.channel_id
        self.frame_max = self.conn.frame_max
        self.write = self.raw.transport_write   # (no heartbeats on publisher connections)
        self.methods: Dict[Tuple[str, str], bytes] = {}   # (exchange, routing key) -> method frame
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
        """Buffer a publish of ``msg`` (an ``amqp.Message``)."""
        self.publish_raw(as_bytes(msg.body), encode_properties(msg.properties), exchange,
                         routing_key, item)

    def publish_raw(self, body: bytes, properties: bytes, exchange: str, routing_key: str,
                    item: Any = None) -> None:
        """Buffer a publish of ``body`` with encoded ``properties`` (``encode_properties``)."""
        method = self.methods.get((exchange, routing_key))
        if method is None:
            if len(self.methods) >= METHOD_CACHE_MAX:
                self.methods.clear()
            method = self.methods[(exchange, routing_key)] = method_frame(
                self.channel_id, exchange, routing_key, self.confirm)
        frames = content_frames(self.channel_id, self.frame_max, body, properties)
        frames.insert(0, method)
        data = b"".join(frames)
        self.pending.append(data)
        self.pending_size += len(data)
        if self.confirm:
            self.seq += 1
            self.unconfirmed.append((self.seq, item))
        if self.pending_size >= WRITE_CHUNK:
            self.flush()

    def flush(self) -> None:
        """Write the buffered publishes."""
        pending = self.pending
        if pending:
            data = pending[0] if len(pending) == 1 else b"".join(pending)
            self.pending, self.pending_size = [], 0
            self.write(data)

    def wait_confirms(self, timeout: float = 30.0) -> Tuple[List[Any], List[Tuple[str, Any]]]:
        """Wait for every outstanding confirm; return (nacked items, returned items)."""
        self.flush()
        if self.unconfirmed:
            deadline = time.monotonic() + timeout
            conn = self.conn
            sock = self.raw.open_socket()
            if sock is None:
                raise OSError("the publisher connection is closed")
            before = sock.gettimeout()
            try:
                while self.unconfirmed:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise BrokerError(f"{len(self.unconfirmed)} publish(es) not confirmed by RabbitMQ "
                                          f"within {timeout:.0f} s")
                    sock.settimeout(left)   # once a frame, where py-amqp sets and restores it
                    try:
                        conn.blocking_read(None)
                    except socket.timeout:
                        continue
            finally:
                if self.raw.open_socket() is sock:
                    try:
                        sock.settimeout(before)
                    except OSError:
                        pass
        if self.nacked or self.returned:
            # A nack: this channel may be stuck (a channel that first published
            # to a quorum queue while it had no leader, after a node died, is
            # nacked for good): the pool replaces the connection.
            self.broken = self.broken or bool(self.nacked)
            nacked, self.nacked = self.nacked, []
            returned, self.returned = self.returned, []
            return nacked, returned
        return [], []

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
        close_quietly(self.conn, forked=self.forks != FORKS[0])


class Confirm:
    """One publish on a ``SharedPublisher`` until RabbitMQ confirms it:
    ``state`` 0 while unconfirmed, ACKED or NACKED after; ``returned``: the
    reply text when the message came back unroutable (mandatory); ``wake``:
    the lock its caller sleeps on while another caller reads the confirms."""

    __slots__ = ("state", "returned", "key", "wake", "same")

    def __init__(self, key: Any) -> None:
        self.state = 0
        self.returned: Optional[str] = None
        self.key = key          # (message id, exchange, routing key): how a return is matched
        self.wake: Any = None
        self.same: Optional[Confirm] = None    # a later publish with the same key


ACKED, NACKED = 1, 2


class SharedPublisher(Publisher):
    """A publisher in confirm mode shared by concurrent callers, so that they
    share confirm waits ("group commit").

    Each caller puts its publish in the ``outbox`` (its delivery tag is its
    place there); unless another caller is writing (``writing``), it writes
    what the outbox holds until it is empty, so one writer at a time and the
    outbox's order is the order on the wire, and publishes put there while a
    caller writes go out with its next write.  Then it waits for the confirm
    of its own tag.  One caller at a time reads the connection (``reading``) and
    settles every confirm it reads, for whoever published it: RabbitMQ acks
    many tags at once (``multiple``), so one read commonly confirms the
    publishes of many callers; on plain TCP the reader takes every confirm
    frame one ``recv`` brought and settles them together (``_settle_many``,
    one hold of ``cond``) before it reads again.  The others sleep each on a
    lock of its own (``Confirm.wake``), released when its publish is settled, or when the
    reader is done and hands the reading over to it.  Writing and reading go
    on at the same time (a socket takes one writer and one reader; so do
    gevent's and eventlet's).  ``cond`` guards the tags, the flags and the
    hand-over.  The publishes are ``mandatory``: a return is matched to its
    caller by message id, exchange and routing key.

    A failed write or read fails the connection for every caller waiting on
    it (``error``; each raises a connection error, which ``ChannelPool``
    retries on a fresh connection as it does for a publisher of its own), and
    the pool makes a new one for later callers; the connection is closed when
    the last caller using it leaves (``users``).
    """

    def __init__(self, params: Dict[str, Any], role: str) -> None:
        super().__init__(params, True, role)
        self.writing = False    # a caller is writing the outbox
        self.cond = threading.Lock()
        self.reading = False
        self.users = 0
        self.error: Optional[BaseException] = None
        self.by_id: Dict[Any, Confirm] = {}   # Confirm.key -> the oldest unconfirmed publish
        self.outbox: List[bytes] = []           # publishes not written yet

    def send(self, body: bytes, properties: bytes, exchange: str, routing_key: str,
             message_id: Any) -> Confirm:
        """Write one publish; the caller must ``wait`` for it, then ``leave``
        (also when this raises)."""
        key = None if message_id is None else (message_id, exchange, routing_key)
        confirm = Confirm(key)
        method = self.methods.get((exchange, routing_key))
        if method is None:
            if len(self.methods) >= METHOD_CACHE_MAX:
                self.methods.clear()
            method = self.methods[(exchange, routing_key)] = method_frame(
                self.channel_id, exchange, routing_key, True)
        frames = content_frames(self.channel_id, self.frame_max, body, properties)
        frames.insert(0, method)
        data = b"".join(frames)
        with self.cond:
            self.users += 1
            if self.error is not None or self.broken:
                raise ConnectionError("the shared publisher connection failed")
            self.seq += 1                   # the tags in the order of the outbox,
            self.unconfirmed.append((self.seq, confirm))
            if key is not None:
                first = self.by_id.setdefault(key, confirm)
                if first is not confirm:    # the same twice in flight: returned in order
                    while first.same is not None:
                        first = first.same
                    first.same = confirm
            self.outbox.append(data)        # which is the order on the wire
            if self.writing:
                return confirm              # the caller writing takes it along
            self.writing = True
        while True:
            with self.cond:
                out, self.outbox = self.outbox, []
                if not out:
                    self.writing = False
                    return confirm
            try:
                self.write(out[0] if len(out) == 1 else b"".join(out))
            except BaseException as exc:
                with self.cond:
                    self.writing = False
                self._fail(exc)
                raise

    def wait(self, confirm: Confirm, timeout: float = 30.0) -> None:
        """Return once ``confirm`` is settled (acked, nacked, returned);
        BrokerError after ``timeout``; a connection error when the connection
        failed meanwhile."""
        deadline = time.monotonic() + timeout
        cond = self.cond
        while True:
            with cond:
                if confirm.state:
                    return
                if self.error is not None:
                    raise ConnectionError(f"the publisher connection failed: {describe(self.error)}")
                if not self.reading:
                    self.reading = True
                    break
                wake = confirm.wake = threading.Lock()
                wake.acquire()
            left = deadline - time.monotonic()
            if not wake.acquire(timeout=max(0.0, left)):
                with cond:
                    confirm.wake = None
                    if confirm.state:
                        return
                    if not self.reading:   # handed the reading just now: pass it on
                        self._hand_over()
                raise BrokerError(f"a publish not confirmed by RabbitMQ within {timeout:.0f} s")
        try:
            self._read_until(confirm, deadline, timeout)
        except BrokerError:
            self.broken = True     # later callers get a fresh connection
            raise
        except BaseException as exc:
            self._fail(exc)
            raise
        finally:
            with cond:
                self.reading = False
                self._hand_over()

    def _hand_over(self) -> None:
        """(under ``cond``, nobody reading) Wake the first caller still
        waiting for a confirm: it reads next."""
        for _, confirm in self.unconfirmed:
            wake = confirm.wake
            if wake is not None and not confirm.state:
                confirm.wake = None
                wake.release()
                return

    def _read_until(self, confirm: Confirm, deadline: float, timeout: float) -> None:
        """Read the connection until ``confirm`` is settled.  On plain TCP
        (``RawConnection.reader``) every frame one ``recv`` brought is taken
        at once: the acks and nacks of this channel are settled together under
        one hold of ``cond`` (their callers woken in one go, before the next
        ``recv``), every other frame (a return's frames, a Close) goes to
        py-amqp's handler in its place in the stream, after the confirms read
        before it.  The socket's timeout is set once, not once a frame."""
        conn = self.conn
        sock = self.raw.open_socket()
        if sock is None:
            raise OSError("the publisher connection is closed")
        reader = self.raw.reader
        if reader is None:          # TLS: py-amqp's reader, a frame at a time
            while not confirm.state:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BrokerError(f"a publish not confirmed by RabbitMQ within {timeout:.0f} s")
                sock.settimeout(left)
                try:
                    conn.blocking_read(None)
                except socket.timeout:
                    continue
            return
        handler = conn.on_inbound_frame
        channel_id = self.channel_id
        next_frame = reader.next_frame
        settles: List[Tuple[int, int, bool]] = []
        while not confirm.state:
            frame = next_frame()
            if frame is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BrokerError(f"a publish not confirmed by RabbitMQ within {timeout:.0f} s")
                sock.settimeout(left)
                try:
                    chunk = sock.recv(65536)
                except socket.timeout:
                    continue
                if not chunk:
                    reader.transport.connected = False
                    raise OSError("Server unexpectedly closed connection")
                reader.feed(chunk)
                conn.bytes_recv += 1     # (py-amqp's heartbeat bookkeeping)
                continue
            while frame is not None:
                kind, channel, payload = frame
                if kind == METHOD and channel == channel_id and payload[:4] in _CONFIRM_SIGS:
                    tag, bits = _TAG_BITS.unpack_from(payload, 4)
                    settles.append((tag, bits & 1, payload[:4] == _NACK_SIG))
                else:
                    if settles:
                        self._settle_many(settles)
                        settles = []
                    handler(frame)
                frame = next_frame()
            if settles:
                self._settle_many(settles)
                settles = []

    def _fail(self, exc: BaseException) -> None:
        with self.cond:
            if self.error is None:
                self.error = exc
            self.broken = True
            for _, confirm in self.unconfirmed:   # each sees the error
                wake = confirm.wake
                if wake is not None:
                    confirm.wake = None
                    wake.release()

    def leave(self) -> None:
        """A caller is done with this publisher; the last one closes it once broken."""
        with self.cond:
            self.users -= 1
            last = self.users == 0 and self.broken
        if last:
            self.close()

    def _settle(self, tag: int, multiple: bool, nack: bool) -> None:
        self._settle_many([(tag, multiple, nack)])

    def _settle_many(self, settles: List[Tuple[int, int, bool]]) -> None:
        """Settle the (delivery tag, multiple, nack) of confirm frames read in
        this order, under one hold of ``cond``; wake each settled caller."""
        with self.cond:
            unconfirmed, by_id = self.unconfirmed, self.by_id
            settled: List[Confirm] = []
            for tag, multiple, nack in settles:
                state = NACKED if nack else ACKED
                if multiple:
                    while unconfirmed and unconfirmed[0][0] <= tag:
                        confirm = unconfirmed.popleft()[1]
                        if not confirm.state:
                            confirm.state = state
                            settled.append(confirm)
                else:
                    for seq, confirm in unconfirmed:
                        if seq >= tag:
                            if seq == tag and not confirm.state:
                                confirm.state = state
                                settled.append(confirm)
                            break
                while unconfirmed and unconfirmed[0][1].state:
                    unconfirmed.popleft()
            for confirm in settled:
                key = confirm.key
                if key is not None and by_id.get(key) is confirm:
                    later = confirm.same
                    while later is not None and later.state:
                        later = later.same
                    if later is None:
                        del by_id[key]
                    else:
                        by_id[key] = later
                wake = confirm.wake
                if wake is not None:
                    confirm.wake = None
                    wake.release()

    def _on_return(self, exc: Any, exchange: str, routing_key: str, message: Any) -> None:
        # RabbitMQ sends the return before the confirm of the same publish
        with self.cond:
            confirm = self.by_id.get((message.properties.get("message_id"), exchange, routing_key))
            while confirm is not None and (confirm.state or confirm.returned is not None):
                confirm = confirm.same      # the oldest one in flight
            if confirm is not None:
                confirm.returned = getattr(exc, "reply_text", str(exc)) or "unroutable"


class ChannelPool:
    """A per-process pool of publishers (connection + channel each), at most
    ``size`` of them; callers beyond that wait for one to come back (threads,
    or greenlets when the process is patched).  A pool used in a forked child
    starts afresh and never touches the parent's sockets.

    Taking an idle publisher and giving it back take no lock: ``list.pop``
    and ``list.append`` are atomic (the GIL; greenlets switch only on I/O), so
    a publisher is never held by two callers at once.  Only a caller that finds
    none idle goes through the condition, counted in ``_waiters`` so that a
    give-back knows to notify.  Nothing is kept per thread or per greenlet: a
    single-threaded client always gets the same connection back, and a gevent
    web server with thousands of short-lived greenlets shares the same few.

    Remembers which queues and which parts of the topology were declared by
    this process, so a publish declares a queue only the first time.
    """

    def __init__(self, url: str, settings: Settings, size: int = 8, role: str = "client") -> None:
        self.url = url
        self.params = connection_params(url)
        self.settings = settings
        self.size = max(1, size)
        self.role = role
        self.conn_state = ConnectionState(f"{role} publish", url)
        self._reset()

    def _reset(self) -> None:
        self._forks = FORKS[0]
        self._cond = threading.Condition(threading.Lock())
        self._idle: List[Publisher] = []
        self._count = 0
        self._waiters = 0
        self._closed = False
        self.declared: set = set()
        self.delays: set = set()
        self.base_declared = False
        self._shared: Optional[SharedPublisher] = None   # the confirmed publishes of single callers
        self._shared_lock = threading.Lock()

    @contextmanager
    def publisher(self) -> Iterator[Publisher]:
        """Borrow a publisher.  An AMQP error inside the block discards it (a
        fresh one is made next time); other errors return it to the pool."""
        pub = self._checkout()
        try:
            yield pub
            pub.flush()
        except BaseException as exc:
            self._failed(pub, exc)
            raise
        finally:
            self._checkin(pub)

    @staticmethod
    def _failed(pub: Publisher, exc: BaseException) -> None:
        if isinstance(exc, AMQP_ERRORS):
            pub.broken = True
        else:
            pub.pending, pub.pending_size = [], 0
            pub.broken = pub.broken or bool(pub.unconfirmed)   # a half-read confirm state: start afresh

    def _checkout(self) -> Publisher:
        if self._forks != FORKS[0]:
            self._reset()
        pub: Optional[Publisher]
        try:
            pub = self._idle.pop()
        except IndexError:
            pub = self._checkout_wait()
            if pub is None:
                return self._make()
            return pub
        if time.monotonic() - pub.last_used > 1.0:
            try:
                pub.check_idle()
            except AMQP_ERRORS:
                self._discard(pub)
                return self._checkout()
        if self._closed:
            self._checkin(pub)   # closes it
            raise BrokerError("the AMQP broker was closed")
        return pub

    def _checkout_wait(self) -> Optional[Publisher]:
        """An idle publisher, or None when the caller may make a new one
        (``_count`` already raised); waits while ``size`` are out."""
        with self._cond:
            self._waiters += 1
            try:
                while True:
                    if self._closed:
                        raise BrokerError("the AMQP broker was closed")
                    if self._idle:
                        return self._idle.pop()
                    if self._count < self.size:
                        self._count += 1
                        return None
                    self._cond.wait(1.0)
            finally:
                self._waiters -= 1

    def _make(self) -> Publisher:
        try:
            return Publisher(self.params, self.settings.confirm_publish, self.role)
        except BaseException:
            with self._cond:
                self._count -= 1
                self._cond.notify()
            raise

    def _discard(self, pub: Publisher) -> None:
        pub.close()
        with self._cond:
            self._count -= 1
            self._cond.notify()

    def _checkin(self, pub: Publisher) -> None:
        pub.last_used = time.monotonic()
        if pub.forks != FORKS[0]:
            return   # made before a fork: the parent's
        if pub.broken or self._closed:
            self._discard(pub)
            return
        self._idle.append(pub)
        if self._waiters:
            with self._cond:
                self._cond.notify()
        if self._closed:   # closed meanwhile: close() may have missed it
            try:
                self._idle.remove(pub)
            except ValueError:
                return
            self._discard(pub)

    def run(self, fn, *args: Any, attempts: int = 3) -> Any:
        """``fn(publisher, *args)`` with up to ``attempts`` tries on fresh
        connections when the connection fails (waiting 0.05 s, then 0.1 s,
        ...); BrokerError after that."""
        def once() -> Tuple[Any, float]:
            with self.publisher() as pub:
                result = fn(pub, *args)
            return result, pub.last_used
        return self._retried(once, attempts)

    def publish_confirmed(self, call: RawPublish, message_id: Any, timeout: float = 30.0,
                          attempts: int = 3) -> Confirm:
        """Publish ``call`` (``encode_outgoing``) on the pool's shared
        publisher and return once RabbitMQ confirmed it: the ``Confirm``
        (nacked, or ``returned`` when no queue took it).  Concurrent callers
        share the confirm waits (``SharedPublisher``); a failed connection is
        retried like ``run``.  Only with ``confirm_publish``; declares nothing
        (``ensure_queues`` first)."""
        def once() -> Tuple[Confirm, float]:
            pub = self._shared_publisher()
            try:
                confirm = pub.send(call[0], call[1], call[2], call[3], message_id)
                pub.wait(confirm, timeout)
            finally:
                pub.leave()
            return confirm, time.monotonic()
        return cast(Confirm, self._retried(once, attempts))

    def _retried(self, once: Callable[[], Tuple[Any, float]], attempts: int) -> Any:
        """``once()`` (its result and when the connection was last seen working)
        with up to ``attempts`` tries on fresh connections when the connection
        fails; the connection's state recorded either way; BrokerError after that."""
        for attempt in range(1, attempts + 1):
            try:
                result, last_ok = once()
                conn_state = self.conn_state
                if conn_state.failures or conn_state.state != "up":
                    conn_state.up()
                else:
                    conn_state.last_ok = last_ok
                return result
            except CONNECTION_ERRORS as exc:
                if attempt == attempts:
                    self.conn_state.lost(exc, 0.0)
                    raise BrokerError(f"RabbitMQ at {mask_url(self.url)}: {describe(exc)}") from None
                time.sleep(self.conn_state.lost(exc, backoff(attempt, 0.05, 0.2)))
            except ChannelError as exc:
                raise BrokerError(f"RabbitMQ at {mask_url(self.url)}: {describe(exc)}") from None
        raise AssertionError("unreachable")

    def _shared_publisher(self) -> SharedPublisher:
        if self._forks != FORKS[0]:
            self._reset()
        pub = self._shared
        if pub is not None and not pub.broken:
            return pub
        with self._shared_lock:
            pub = self._shared
            if pub is None or pub.broken:
                if self._closed:
                    raise BrokerError("the AMQP broker was closed")
                if pub is not None:
                    with pub.cond:
                        idle = pub.users == 0
                    if idle:
                        pub.close()
                pub = self._shared = SharedPublisher(self.params, self.role)
            return pub

    def ensure_queues(self, pub: Publisher, queues: Iterable[str], force: bool = False,
                      delayed: Iterable[str] = ()) -> None:
        """Declare the dead-letter store, ``queues`` and the delay cascades of
        ``delayed`` (logical names) unless this process already did."""
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
                declare_delays(pub.channel, name, self.settings)
                self.delays.add(name)

    def close(self) -> None:
        if self._forks != FORKS[0]:
            self._reset()
            return
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            self._count -= len(idle)
            self._cond.notify_all()
        for pub in idle:
            pub.close()
        with self._shared_lock:
            shared, self._shared = self._shared, None
        if shared is not None:
            shared.broken = True
            with shared.cond:
                idle_shared = shared.users == 0
            if idle_shared:
                shared.close()


def pool_size(config: Config) -> int:
    """Publishers per process, from the concurrency (lesson 8): 10 by default."""
    return max(4, min(32, config.worker["concurrency"] // 10))


def delay_ms(m: Outgoing, now: float) -> int:
    """Milliseconds ``m`` must wait (0: ready now)."""
    return max(0, math.ceil((m.eta - now) * 1000)) if m.eta is not None else 0


#: one ``basic.publish``: (body, encoded properties, exchange, routing key),
#: the arguments of ``Publisher.publish_raw``
RawPublish = Tuple[bytes, bytes, str, str]


def publish_calls(messages: Sequence[Outgoing], now: float, names: Settings) -> List[RawPublish]:
    """The ``basic.publish`` of each message, in order: ready ones to their
    queue, one with an eta after ``now`` to the delay cascade
    (``names.delay_route``).  No I/O: the broker's ``publish_many`` writes
    them (``Publisher.publish_raw``), and ``wire`` packs their frames."""
    return [encode_outgoing(m, now, names) for m in messages]


def encode_outgoing(m: Outgoing, now: float, names: Settings,
                    headers: Optional[Dict[str, Any]] = None) -> RawPublish:
    """(body, encoded properties, exchange, routing key) for ``m``
    (``Publisher.publish_raw``); ``names`` maps its logical queue to RabbitMQ's.
    ``headers``: application headers to add (a copy published again).
    A message for a Celery queue is published as Celery's (``celery_broker``)."""
    if names.celery_queues and m.queue in names.celery_queues:
        from .celery_broker import celery_publish
        return celery_publish(m, now, names, headers)
    wait_ms = delay_ms(m, now) if m.eta is not None else 0
    if not wait_ms and not headers:
        return m.body, task_properties(m.message_id, m.priority), "", names.queue_name(m.queue)
    msg, exchange, key = encode_message(m, now, names, headers)
    return msg.body, encode_properties(msg.properties), exchange, key


def encode_message(m: Outgoing, now: float, names: Settings,
                   headers: Optional[Dict[str, Any]] = None) -> Tuple["amqp.Message", str, str]:
    """(amqp.Message, exchange, routing key) for ``m``."""
    props: Dict[str, Any] = {"message_id": m.message_id, "delivery_mode": 2}
    if m.priority:
        props["priority"] = m.priority
    headers = dict(headers) if headers else {}
    wait_ms = delay_ms(m, now)
    if wait_ms:
        exchange, key = names.delay_route(m.queue, wait_ms)
        assert m.eta is not None, "a delay comes from an eta"
        headers[H_ETA] = float(m.eta)
    else:
        exchange, key = "", names.queue_name(m.queue)
    if headers:
        props["application_headers"] = headers
    return amqp.Message(m.body, **props), exchange, key
