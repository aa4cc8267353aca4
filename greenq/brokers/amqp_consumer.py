"""The RabbitMQ broker's consumer loop: the one greenlet (or thread) that owns
and reads the consumer connection (DESIGN.md lesson 5)."""
from __future__ import annotations

import heapq
import itertools
import logging
import select
import socket
import threading
import time
from struct import Struct
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence

import amqp
from amqp import spec
from amqp.exceptions import UnexpectedFrame
from amqp.serialization import decode_properties_basic

from ..exceptions import BrokerError
from .amqp_common import (AMQP_ERRORS, H_DELIVERIES, H_ETA, Link, clean_headers, close_quietly,
                          declare_base, declare_queue, fast_reads, open_connection)
from .amqp_publish import (METHOD_CACHE_MAX, Publisher, content_frames, delay_ms, encode_outgoing,
                           method_frame)
from .base import Delivery, Outgoing

if TYPE_CHECKING:  # pragma: no cover
    from .amqp import AMQPBroker

log = logging.getLogger("greenq.amqp")

TICK = 0.25            # seconds the consumer loop blocks in one read
SYNC_TIMEOUT = 30.0    # seconds a synchronous AMQP method may take (declare, consume, purge)
EARLY = 1.0            # a delayed message arriving this much before its eta goes round again


_SETTLE = Struct(">BHIHHQB")
_DELIVER = Struct(">HH").pack(*spec.Basic.Deliver)
_TAG_BITS = Struct(">QB")
_HEADER = Struct(">HxxQ")
_ACK, _REJECT = spec.Basic.Ack, spec.Basic.Reject


def _settle_frame(channel_id: int, method: tuple, tag: int, flag: bool) -> bytes:
    """The frame of a ``basic.ack`` (flag: multiple) or ``basic.reject`` (flag: requeue)."""
    return _SETTLE.pack(1, channel_id, 13, method[0], method[1], tag, flag) + b"\xce"


class _Partial:
    """A delivery whose content frames are still to come."""
    __slots__ = ("queue", "tag", "redelivered", "properties", "size", "chunks", "got")

    def __init__(self, queue: str, tag: int, redelivered: bool) -> None:
        self.queue, self.tag, self.redelivered = queue, tag, redelivered
        self.properties: Optional[dict] = None
        self.size = 0
        self.chunks: List[bytes] = []
        self.got = 0


class ConsumerLoop:
    """The consumer connection and the loop that owns it.

    Only the loop reads from the connection.  Other greenlets write (acks,
    rejects) under ``wlock``; ``lock`` guards the buffer and the held set and is
    never held across I/O.  Lock order: ``wlock`` then ``lock``.  With TLS and
    real threads (no green driver) an SSL socket must not be read and written
    at the same time, so there the loop waits for data without the lock and
    reads under ``wlock`` too (``serial``).

    Every (re)connection bumps ``gen``; a delivery's token is ``(gen, tag)``, so
    an ack for a delivery of a dead connection is dropped (RabbitMQ redelivers
    that message: at-least-once).

    On plain TCP the loop reads frames itself (``_frame``): a ``basic.deliver``
    of one of its consumers and its content frames are parsed here, straight
    into a ``Delivery``; every other frame goes to py-amqp as usual.
    """

    def __init__(self, broker: "AMQPBroker", queues: List[str]) -> None:
        self.broker = broker
        self.settings = broker.settings
        self.driver = broker.driver
        self.heartbeat = int(broker.params.get("heartbeat", self.settings.heartbeat))
        self.link = Link("consumer", broker.url)
        self.green = green = self.driver is not None and self.driver.green
        self.wlock = self.driver.lock() if self.driver is not None else threading.Lock()
        self.lock = threading.Lock()
        self.ready = self.driver.event() if green else threading.Event()
        self.stopped = self.driver.event() if green else threading.Event()
        self.wanted = list(queues)
        self.prefetch = broker.prefetch
        self.applied_prefetch = 0
        self.dirty = False
        self.interrupted = False
        self.conn: Optional[amqp.Connection] = None
        self.channel: Any = None
        self.channel_id = 0
        self.reader: Any = None                   # FrameReader (plain TCP, not serial), else None
        self.partial: Optional[_Partial] = None   # a delivery being read by _frame
        self.queue_of: Dict[str, str] = {}        # consumer tag -> queue
        self.sock: Any = None
        self.serial = False
        self.gen = 0
        self.consuming: Dict[str, str] = {}       # queue -> consumer tag
        self.buffer: Dict[str, list] = {}         # queue -> heap of (-priority, seq, Delivery)
        self.held: Dict[int, Delivery] = {}       # delivery tag -> every unacked delivery
        self.low: List[int] = []                  # heap of held tags (lazily cleaned)
        self.redo: List[tuple] = []               # (Delivery, amqp.Message) to publish again
        self.calls: List[tuple] = []              # (fn, result box, event) for the loop to run
        self.methods: Dict[tuple, bytes] = {}     # cached basic.publish frames (publish_unconfirmed)
        self.cancelled = False
        self._seq = itertools.count()
        self._next_tick = 0.0
        self.handle: Any = None
        self.stop_requested = False
        self.start()

    # -- the loop ------------------------------------------------------------
    def start(self) -> None:
        self.stopped.clear()
        if self.driver is not None:
            self.handle = self.driver.spawn(self._run)
        else:
            self.handle = threading.Thread(target=self._run, name="greenq-amqp-consumer", daemon=True)
            self.handle.start()

    @property
    def running(self) -> bool:
        return not self.stopped.is_set()

    def check(self) -> None:
        if not self.running and not self.stop_requested:
            log.error("the AMQP consumer loop had stopped; restarting it")
            self.start()

    def _run(self) -> None:
        delay = 0.0
        try:
            while not self.stop_requested:
                if self.conn is None:
                    if delay and self._pause(delay):
                        break
                    try:
                        self._connect()
                    except Exception as exc:
                        self._teardown()
                        delay = self.link.lost(exc)
                        if not isinstance(exc, AMQP_ERRORS + (BrokerError,)):
                            log.exception("unexpected error in the AMQP consumer")
                        continue
                try:
                    self._step()
                except Exception as exc:
                    if not isinstance(exc, AMQP_ERRORS):
                        log.exception("unexpected error in the AMQP consumer")
                    self._teardown()
                    delay = self.link.lost(exc)
        finally:
            self._teardown(clean=True)
            self.stopped.set()

    def _pause(self, seconds: float) -> bool:
        """Sleep ``seconds`` unless stopped; True when stopped."""
        deadline = time.monotonic() + seconds
        while not self.stop_requested:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            (self.driver.sleep if self.driver is not None else time.sleep)(min(left, TICK))
        return True

    def _connect(self) -> None:
        self.link.connecting()
        conn = open_connection(self.broker.params, heartbeat=self.heartbeat, role="consumer")
        reader = fast_reads(conn)
        self.sock = conn.transport.sock
        self.serial = not self.green and "ssl" in self.broker.params
        self.sock.settimeout(SYNC_TIMEOUT)
        with self.wlock:
            with self.lock:
                self.gen += 1
                self.conn = conn
                self.channel = conn.channel()
                self.channel.auto_decode = False
                self.channel_id = self.channel.channel_id
                self.reader = None if self.serial else reader
                self.partial = None
                self.cancelled = False
            declare_base(self.channel, self.settings)
            self._sync()
        self._next_tick = time.monotonic() + TICK
        self.link.up()

    def _sync(self) -> None:
        """Match consumers and prefetch to what was asked.  Caller holds wlock."""
        self.dirty = False
        ch = self.channel
        wanted = list(self.wanted)
        if self.applied_prefetch != self.prefetch or not self.consuming:
            ch.basic_qos(0, self.prefetch, False)
            if not self.settings.quorum and len(wanted) > 1:
                ch.basic_qos(0, self.prefetch, True)   # and in total over the queues
            self.applied_prefetch = self.prefetch
        for queue in wanted:
            if queue not in self.consuming:
                declare_queue(ch, queue, self.settings)
                tag = self.consuming[queue] = ch.basic_consume(
                    queue, callback=self._callback(queue, self.gen), on_cancel=self._on_cancel)
                self.queue_of[tag] = queue
        for queue in [q for q in self.consuming if q not in wanted]:
            tag = self.consuming.pop(queue)
            self.queue_of.pop(tag, None)
            ch.basic_cancel(tag)

    def _step(self) -> None:
        if self.cancelled:
            raise amqp.exceptions.ConsumerCancelled("RabbitMQ cancelled the consumer (queue deleted?)")
        if self.dirty:
            with self.wlock:
                self._sync()
        # the socket keeps one timeout (TICK) while the loop reads: setting it
        # per read costs two system calls a frame on a plain socket
        self.sock.settimeout(TICK)
        frames = 0
        reader = self.reader
        try:
            while True:
                if reader is not None:
                    self._frame(reader.read_frame())
                elif self.serial:
                    self._drain_serial()
                else:
                    self.conn.drain_events()
                frames += 1
                if frames % 512 == 0 and self.green:
                    self.driver.sleep(0)   # a long backlog: let the other greenlets run
                if time.monotonic() >= self._next_tick or self.calls or self.dirty or len(self.redo) >= 500:
                    break
        except socket.timeout:
            pass
        finally:
            try:
                self.sock.settimeout(SYNC_TIMEOUT)
            except OSError:
                pass   # closed under us: the error that closed it is the one raised
        now = time.monotonic()
        if now >= self._next_tick:
            self._next_tick = now + TICK
            with self.wlock:
                self.conn.heartbeat_tick()
            self.link.alive()
        if self.redo:
            self._publish_again()
        if self.calls:
            self._run_calls()

    def _frame(self, frame: tuple) -> None:
        """Handle one frame read from the consumer connection: deliveries to
        our consumers here, anything else by py-amqp."""
        frame_type, channel, payload = frame
        partial = self.partial
        if channel == self.channel_id:
            if partial is not None:
                self.conn.bytes_recv += 1   # (py-amqp's heartbeat bookkeeping)
                if frame_type == 2 and partial.properties is None:
                    partial.size = _HEADER.unpack_from(payload, 0)[1]
                    partial.properties = decode_properties_basic(payload, 12)[0]
                elif frame_type == 3 and partial.properties is not None:
                    partial.chunks.append(payload)
                    partial.got += len(payload)
                else:
                    raise UnexpectedFrame(f"received frame type {frame_type} inside a delivery")
                if partial.got >= partial.size:
                    self.partial = None
                    chunks = partial.chunks
                    body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                    self._deliver(partial.queue, self.gen, partial.tag, partial.redelivered,
                                  partial.properties, body)
                return
            if frame_type == 1 and payload[:4] == _DELIVER:
                end = 5 + payload[4]
                queue = self.queue_of.get(payload[5:end].decode("utf-8", "surrogatepass"))
                if queue is not None:   # (else py-amqp: it rejects a delivery for no consumer)
                    self.conn.bytes_recv += 1
                    tag, bits = _TAG_BITS.unpack_from(payload, end)
                    self.partial = _Partial(queue, tag, bool(bits & 1))
                    return
        self.conn.on_inbound_frame(frame)

    def _drain_serial(self) -> None:
        """Wait until something can be read, then read it holding the write lock."""
        if not (self.sock.pending() or self.conn.transport._read_buffer):
            if not select.select([self.sock], [], [], TICK)[0]:
                raise socket.timeout()
        with self.wlock:
            self.conn.drain_events()

    def _run_calls(self) -> None:
        with self.lock:
            calls, self.calls = self.calls, []
        for fn, box, done in calls:
            try:
                box.append(fn())
            except AMQP_ERRORS as exc:
                box.append(BrokerError(f"RabbitMQ: {exc}"))
                raise
            except Exception as exc:
                box.append(exc)
            finally:
                done.set()

    def _teardown(self, clean: bool = False) -> None:
        """Forget the connection and everything received on it."""
        with self.wlock:
            with self.lock:
                conn, self.conn, self.channel = self.conn, None, None
                self.gen += 1
                self.reader = self.partial = None
                self.queue_of.clear()
                self.consuming.clear()
                self.buffer.clear()
                self.held.clear()
                self.low.clear()
                self.redo.clear()
                self.applied_prefetch = 0
                calls, self.calls = self.calls, []
        for fn, box, done in calls:
            done.set()   # not run: the caller falls back to a plain purge
        if conn is None:
            return
        if clean:
            close_quietly(conn)
        else:
            try:
                conn.collect()
            except Exception:
                pass

    # -- deliveries ----------------------------------------------------------
    def _callback(self, queue: str, gen: int):
        def on_message(msg: "amqp.Message") -> None:
            info = msg.delivery_info
            self._deliver(queue, gen, info["delivery_tag"], info["redelivered"], msg.properties, msg.body)
        return on_message

    def _deliver(self, queue: str, gen: int, tag: int, redelivered: bool, props: Dict[str, Any],
                 body: bytes) -> None:
        headers = props.get("application_headers")
        priority = props.get("priority") or 0
        redo = False
        if self.settings.quorum:
            deliveries = int(headers.get("x-delivery-count", 0)) + 1 if headers else 1
        else:
            deliveries = (int(headers.get(H_DELIVERIES, 0)) if headers else 0) + 1
            redo = redelivered
        if headers and H_ETA in headers and float(headers[H_ETA]) > time.time() + EARLY:
            redo = True
        d = Delivery(queue, body, props.get("message_id") or "", deliveries, (gen, tag), priority)
        with self.lock:
            if gen != self.gen:
                return
            self.held[tag] = d
            heapq.heappush(self.low, tag)
            if redo:
                self.redo.append((d, headers, redelivered))
                return
            heapq.heappush(self.buffer.setdefault(queue, []), (-priority, next(self._seq), d))
        if not self.ready.is_set():
            self.ready.set()

    def _on_cancel(self, consumer_tag: str) -> None:
        self.cancelled = True

    def _publish_again(self) -> None:
        """Publish redelivered messages again with their delivery count raised
        (and too-early delayed ones into the cascade again), then ack the
        originals.  If publishing fails, hand them out as they are."""
        with self.lock:
            items, self.redo = self.redo, []
        now = time.time()
        out, delayed = [], set()
        for d, original, redelivered in items:
            headers = clean_headers(original)
            headers[H_DELIVERIES] = d.deliveries if redelivered else d.deliveries - 1
            eta = (original or {}).get(H_ETA)
            again = Outgoing(d.queue, d.body, d.message_id, d.priority, float(eta) if eta else None)
            if delay_ms(again, now):
                delayed.add(d.queue)
            out.append(encode_outgoing(again, now, headers))

        def send(pub: Publisher) -> None:
            self.broker.pool.ensure_queues(pub, (), delayed=delayed)
            for body, properties, exchange, key in out:
                pub.publish_raw(body, properties, exchange, key)
            if pub.confirm:
                nacked, returned = pub.wait_confirms()
                if nacked or returned:
                    raise BrokerError("RabbitMQ refused a republished message")
        try:
            self.broker.pool.run(send)
        except BrokerError as exc:
            log.warning("could not republish %d redelivered message(s) (%s); handing them out as they are",
                        len(items), exc)
            with self.lock:
                for d, _, _ in items:
                    if d.token[0] == self.gen:
                        heapq.heappush(self.buffer.setdefault(d.queue, []), (-d.priority, next(self._seq), d))
            self.ready.set()
            return
        self.settle([d for d, _, _ in items], requeue=False)

    def take(self, queues: Sequence[str], count: int, timeout: float) -> List[Delivery]:
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            with self.lock:
                out: List[Delivery] = []
                for queue in queues:
                    heap = self.buffer.get(queue)
                    while heap and len(out) < count:
                        out.append(heapq.heappop(heap)[2])
                if out:
                    return out
                if self.interrupted:
                    self.interrupted = False
                    return out
                self.ready.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                return []
            self.ready.wait(min(left, 1.0))

    def settle(self, deliveries: Sequence[Delivery], requeue: bool) -> None:
        """Ack (or reject with requeue) the deliveries of the live connection;
        drop the others.  Consecutive acks go out as one ``multiple`` ack."""
        with self.wlock:
            with self.lock:
                gen, held = self.gen, self.held
                tags = [d.token[1] for d in deliveries
                        if d.token[0] == gen and held.pop(d.token[1], None) is not None]
                if not tags:
                    return
                channel = self.channel
                top = max(tags)
                low = self.low
                while low and low[0] not in held:
                    heapq.heappop(low)
                multiple = not requeue and (not low or low[0] > top)
            try:
                ch = channel.channel_id
                if multiple:
                    data = _settle_frame(ch, _ACK, top, True)
                elif requeue:
                    data = b"".join(_settle_frame(ch, _REJECT, tag, True) for tag in sorted(tags))
                else:
                    data = b"".join(_settle_frame(ch, _ACK, tag, False) for tag in tags)
                conn = channel.connection
                conn._transport.write(data)   # one write for the batch
                conn.bytes_sent += 1          # (py-amqp's heartbeat bookkeeping)
            except AMQP_ERRORS + (AttributeError,) as exc:
                log.debug("could not settle %d message(s): %s (they will be redelivered)", len(tags), exc)

    def publish_unconfirmed(self, items: Sequence[tuple]) -> bool:
        """Write the publishes of ``(body, properties, exchange, routing key)``
        items on the consumer channel (not in confirm mode, not mandatory: a
        return would have no handler).  False when not connected, or when the
        write failed (the loop finds the dead connection and reconnects; the
        caller publishes elsewhere, a reply may then arrive twice)."""
        with self.wlock:
            conn, channel = self.conn, self.channel
            if conn is None or channel is None:
                return False
            channel_id, frame_max = channel.channel_id, conn.frame_max
            methods = self.methods
            frames: List[bytes] = []
            for body, properties, exchange, key in items:
                method = methods.get((channel_id, exchange, key))
                if method is None:
                    if len(methods) >= METHOD_CACHE_MAX:
                        methods.clear()
                    method = methods[(channel_id, exchange, key)] = method_frame(
                        channel_id, exchange, key, False)
                frames.append(method)
                frames += content_frames(channel_id, frame_max, body, properties)
            try:
                conn._transport.write(b"".join(frames))
                conn.bytes_sent += 1
            except (AttributeError,) + AMQP_ERRORS as exc:
                log.debug("could not publish on the consumer channel: %s", exc)
                return False
        return True

    def holds(self, delivery: Delivery) -> bool:
        with self.lock:
            return delivery.token[0] == self.gen and delivery.token[1] in self.held

    def local_counts(self) -> Dict[str, tuple]:
        """queue -> (prefetched and not handed out, handed out and not settled)."""
        counts: Dict[str, list] = {}
        with self.lock:
            for d in self.held.values():
                counts.setdefault(d.queue, [0, 0])[1] += 1
            for queue, heap in self.buffer.items():
                counts.setdefault(queue, [0, 0])[0] += len(heap)
                counts[queue][1] -= len(heap)
            for d, _, _ in self.redo:
                counts[d.queue][1] -= 1
        return {q: (c[0], c[1]) for q, c in counts.items()}

    def purge(self, queue: str) -> Optional[int]:
        """Purge ``queue`` from the consumer loop: cancel its consumer (RabbitMQ
        sends nothing more after CancelOk), ack what was prefetched, purge, and
        consume again at the next step.  None when not consuming ``queue``."""
        def run() -> Optional[int]:
            tag = self.consuming.pop(queue, None)
            if tag is None:
                return None
            self.queue_of.pop(tag, None)
            with self.wlock:
                self.channel.basic_cancel(tag)
                self.dirty = True
            with self.lock:
                dropped = [d for _, _, d in self.buffer.pop(queue, [])]
            self.settle(dropped, requeue=False)
            with self.wlock:
                return len(dropped) + (self.channel.queue_purge(queue) or 0)
        return self.call(run)

    def call(self, fn, timeout: float = 30.0) -> Any:
        """Run ``fn()`` in the consumer loop (the only reader of the connection)
        and return its result; None when the loop is not connected."""
        if self.conn is None:
            return None
        done = self.driver.event() if self.driver is not None and self.driver.green else threading.Event()
        box: List[Any] = []
        with self.lock:
            self.calls.append((fn, box, done))
        if not done.wait(timeout):
            raise BrokerError(f"the AMQP consumer loop did not answer within {timeout:.0f} s")
        if box and isinstance(box[0], BaseException):
            raise box[0]
        return box[0] if box else None

    # -- control -------------------------------------------------------------
    def want(self, queues: Sequence[str]) -> None:
        if list(queues) != self.wanted:
            self.wanted = list(queues)
            self.dirty = True

    def set_prefetch(self, prefetch: int) -> None:
        self.prefetch = prefetch
        self.dirty = True

    def interrupt(self) -> None:
        with self.lock:
            self.interrupted = True
        self.ready.set()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the loop; it closes the connection, and RabbitMQ returns every
        message not acked to its queue."""
        self.stop_requested = True
        self.interrupt()
        self.stopped.wait(timeout)
