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
from typing import Any, Dict, List, Optional, Sequence

import amqp

from ...exceptions import BrokerError
from .adapter import RawConnection, close_quietly
from .common import (AMQP_ERRORS, H_DELIVERIES, ConnectionState, Settings, clean_headers, declare_base,
                          declare_queue, open_connection)
from .meta import Meta, as_bytes, fit_short_string, read_eta, read_meta
from .publish import METHOD_CACHE_MAX, ChannelPool, Publisher, delay_ms, encode_outgoing
from .wire import NOT_MINE, DeliveryReader, ack_frame, content_frames, method_frame, reject_frame
from ...brokers.base import PREVIEW_BYTES, Delivery, Outgoing

log = logging.getLogger("greenq.amqp")

TICK = 0.25            # seconds the consumer loop blocks in one read
SYNC_TIMEOUT = 30.0    # seconds a synchronous AMQP method may take (declare, consume, purge)
EARLY = 1.0            # a delayed message arriving this much before its eta goes round again


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

    Every frame read from the connection goes through ``_frame`` (it replaces
    py-amqp's frame handler, so also the frames read while py-amqp waits for
    the answer to a method such as ``basic.cancel`` or ``queue.purge``): a
    ``basic.deliver`` of one of its consumers and its content frames are read
    by ``amqp_wire.DeliveryReader``, straight into a ``Delivery`` whose
    metadata ``amqp_meta`` checks; every other frame goes to py-amqp as usual.
    py-amqp thus never sees a delivery's content frames (it would take them
    for a protocol error) nor its properties (it raises on a ``message_id``
    that is not UTF-8).

    ``stop_consuming`` cancels every consumer for good (warm shutdown): held
    deliveries can still be settled, nothing more arrives, even after a
    reconnection.

    Made with what it needs, not with the broker: ``params`` to connect
    (``amqp_common.connection_params`` of ``url``), ``pool`` to publish copies
    of messages (redeliveries, ``give_back``), the ``driver`` (None: threads).
    """

    def __init__(self, queues: Sequence[str], *, url: str, params: Dict[str, Any], settings: Settings,
                 pool: ChannelPool, prefetch: int, driver: Any = None, max_message_size: int = 0,
                 body_limit: int = 0) -> None:
        self.params = params
        self.settings = settings
        self.pool = pool
        self.driver = driver
        self.heartbeat = int(params.get("heartbeat", settings.heartbeat))
        self.conn_state = ConnectionState("consumer", url)
        self.green = green = self.driver is not None and self.driver.green
        self.wlock = self.driver.lock() if self.driver is not None else threading.Lock()
        self.lock = threading.Lock()
        self.ready = self.driver.event() if green else threading.Event()
        self.stopped = self.driver.event() if green else threading.Event()
        self.wanted = list(queues)
        self.prefetch = prefetch
        self.applied_prefetch = 0
        self.max_message_size = max_message_size
        self.body_limit = body_limit              # a longer body is read as a preview (0: no limit)
        self.dirty = False
        self.interrupted = False
        self.conn: Optional[amqp.Connection] = None
        self.raw: Optional[RawConnection] = None
        self.channel: Any = None
        self.channel_id = 0
        self.reader: Any = None                   # amqp_adapter.SocketFrames (plain TCP), else None
        self.inbound: Optional[DeliveryReader] = None   # reads our deliveries in _frame
        self.queue_of: Dict[str, str] = {}        # consumer tag -> queue
        self.py_frame: Any = None                 # py-amqp's frame handler of the connection
        self._tags = itertools.count(1)
        self.sock: Any = None
        self.serial = False
        self.gen = 0
        self.consuming: Dict[str, str] = {}       # queue -> consumer tag
        self.buffer: Dict[str, list] = {}         # queue -> heap of (-priority, seq, Delivery)
        self.held: Dict[int, Delivery] = {}       # delivery tag -> every unacked delivery
        self.headers: Dict[int, dict] = {}        # delivery tag -> its header table (when not empty)
        self.low: List[int] = []                  # heap of held tags (lazily cleaned)
        self.redo: List[tuple] = []               # (Delivery, header table, count) to publish again
        self.calls: List[tuple] = []              # (fn, result box, event) for the loop to run
        self.methods: Dict[tuple, bytes] = {}     # cached basic.publish frames (publish_unconfirmed)
        self.cancelled = False
        self.paused = False                       # stop_consuming() was called
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
    def partial(self) -> Any:
        """The delivery being read (some of its content frames still to come), or None."""
        inbound = self.inbound
        return inbound.partial if inbound is not None else None

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
                        delay = self.conn_state.lost(exc)
                        if not isinstance(exc, AMQP_ERRORS + (BrokerError,)):
                            log.exception("unexpected error in the AMQP consumer")
                        continue
                try:
                    self._step()
                except Exception as exc:
                    if not isinstance(exc, AMQP_ERRORS):
                        log.exception("unexpected error in the AMQP consumer")
                    self._teardown()
                    delay = self.conn_state.lost(exc)
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
        self.conn_state.connecting()
        conn = open_connection(self.params, heartbeat=self.heartbeat, role="consumer")
        self.serial = not self.green and "ssl" in self.params
        raw = RawConnection(conn, fast_reads=not self.serial)
        self.sock = raw.sock
        self.sock.settimeout(SYNC_TIMEOUT)
        with self.wlock:
            with self.lock:
                self.gen += 1
                self.conn, self.raw = conn, raw
                self.channel = conn.channel()
                self.channel.auto_decode = False
                self.channel_id = self.channel.channel_id
                self.reader = raw.reader
                self.inbound = DeliveryReader(self.channel_id, self.queue_of, self.body_limit, PREVIEW_BYTES)
                self.py_frame = raw.intercept(self._frame)
                self.cancelled = False
            declare_base(self.channel, self.settings)
            self._sync()
        self._next_tick = time.monotonic() + TICK
        self.conn_state.up()

    def _sync(self) -> List[Delivery]:
        """Match consumers and prefetch to what was asked; return what was
        buffered for the queues no longer wanted (for ``give_back``, once
        wlock is released).  Caller holds wlock."""
        self.dirty = False
        ch = self.channel
        wanted = [] if self.paused else list(self.wanted)
        if self.applied_prefetch != self.prefetch or not self.consuming:
            ch.basic_qos(0, self.prefetch, False)
            quorum = self.settings.quorum or (self.settings.celery[0] == "quorum" and any(   # Celery's quorum queues
                q in self.settings.celery_queues for q in wanted))
            if not quorum and len(wanted) > 1:
                ch.basic_qos(0, self.prefetch, True)   # and in total over the queues
            self.applied_prefetch = self.prefetch
        for queue in wanted:
            if queue not in self.consuming:
                declare_queue(ch, queue, self.settings)
                tag = f"greenq-{next(self._tags)}"   # known before its first delivery can arrive
                self.queue_of[tag] = queue
                self.consuming[queue] = ch.basic_consume(
                    self.settings.queue_name(queue), consumer_tag=tag, callback=self._callback(queue, self.gen),
                    on_cancel=self._on_cancel)
        dropped: List[Delivery] = []
        for queue in [q for q in self.consuming if q not in wanted]:
            self._cancel(queue)
            with self.lock:
                dropped += [d for _, _, d in self.buffer.pop(queue, [])]
        return dropped

    def _cancel(self, queue: str) -> None:
        """Cancel the consumer of ``queue`` and wait for RabbitMQ's CancelOk;
        what it delivered before that is buffered as usual.  Caller holds wlock."""
        tag = self.consuming.pop(queue)
        try:
            self.channel.basic_cancel(tag)
        finally:
            self.queue_of.pop(tag, None)

    def _step(self) -> None:
        assert self.conn is not None and self.raw is not None, "run only while connected"
        if self.cancelled:
            raise amqp.exceptions.ConsumerCancelled("RabbitMQ cancelled the consumer (queue deleted?)")
        if self.dirty:
            with self.wlock:
                dropped = self._sync()
            if dropped:             # cancel-consumer: what that queue's consumer had prefetched
                self.give_back(dropped)
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
        if frames:
            self.raw.received()   # for py-amqp's heartbeat check: _frame's frames bypass its count
        now = time.monotonic()
        if now >= self._next_tick:
            self._next_tick = now + TICK
            with self.wlock:
                self.conn.heartbeat_tick()
            self.conn_state.alive()
        if self.redo:
            self._publish_again()
        if self.calls:
            self._run_calls()

    def _frame(self, frame: tuple) -> Any:
        """Handle one frame read from the consumer connection: deliveries to
        our consumers here, anything else by py-amqp.  Returns what py-amqp's
        handler does (true when a method is complete), so ``drain_events``
        returns after each delivery."""
        assert self.inbound is not None, "set with the connection that reads the frame"
        got = self.inbound.frame(frame)
        if got is NOT_MINE:
            return self.py_frame(frame)
        if got is None:
            return False
        self._deliver(got.consumer, self.gen, got.delivery_tag, got.redelivered, got.properties, got.body,
                      got.problems, got.size if got.truncated else None)
        return True

    def _drain_serial(self) -> None:
        """Wait until something can be read, then read it holding the write lock."""
        assert self.conn is not None and self.raw is not None, "run only while connected"
        if not self.raw.buffered():
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
                conn, self.conn, self.channel, self.raw = self.conn, None, None, None
                self.gen += 1
                self.reader = self.inbound = self.py_frame = None
                self.queue_of.clear()
                self.consuming.clear()
                self.buffer.clear()
                self.held.clear()
                self.headers.clear()
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
        """py-amqp's callback for our consumers; unused while ``_frame`` reads
        every delivery, there for a delivery py-amqp would read all the same."""
        def on_message(msg: "amqp.Message") -> None:
            info = msg.delivery_info
            self._deliver(queue, gen, info["delivery_tag"], info["redelivered"], msg.properties, msg.body)
        return on_message

    def _deliver(self, queue: str, gen: int, tag: int, redelivered: bool, props: Dict[str, Any],
                 body: Any, problems: Sequence[str] = (), size: Optional[int] = None) -> None:
        """Buffer a delivery read from the connection.  Never raises: a bad
        property or header makes a Delivery whose ``error`` says which.
        ``size``: the body was too big to read, ``body`` is its preview (the
        delivery is handed out to be dead-lettered, never published again)."""
        try:
            meta = read_meta(props, list(problems), self.settings.quorum)
        except Exception as exc:   # read_meta is total; this keeps the loop alive all the same
            meta = Meta("", 1, 0, None, f"unreadable message properties ({type(exc).__name__}: {exc})")
        headers = props.get("application_headers")
        headers = headers if isinstance(headers, dict) and headers else None
        again: Optional[int] = None   # publish a copy with this greenq-deliveries instead of handing out
        if meta.error is None and size is None:
            if redelivered and not self.settings.quorum:
                again = meta.deliveries        # the lost hand-out counts
            elif meta.eta is not None and meta.eta > time.time() + EARLY:
                again = meta.deliveries - 1    # too early: round the cascade again, not a hand-out
        if size is None and self.settings.celery_queues and queue in self.settings.celery_queues:
            from .celery_broker import celery_delivery
            d = celery_delivery(queue, props, as_bytes(body), meta, (gen, tag), self.settings,
                                self.max_message_size or None)
        elif size is not None:
            d = Delivery.oversized(queue, as_bytes(body), meta.message_id, meta.deliveries, (gen, tag),
                                   meta.priority, size, self.max_message_size)
        else:
            d = Delivery(queue, as_bytes(body), meta.message_id, meta.deliveries, (gen, tag), meta.priority,
                         meta.error)
        with self.lock:
            if gen != self.gen:
                return
            self.held[tag] = d
            if headers is not None:
                self.headers[tag] = headers
            heapq.heappush(self.low, tag)
            if again is not None:
                self.redo.append((d, headers, again))
                return
            heapq.heappush(self.buffer.setdefault(queue, []), (-meta.priority, next(self._seq), d))
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
        if self._republish(items):
            self.settle([d for d, _, _ in items], requeue=False)
            return
        with self.lock:
            for d, _, _ in items:
                if d.token[0] == self.gen:
                    heapq.heappush(self.buffer.setdefault(d.queue, []), (-d.priority, next(self._seq), d))
        self.ready.set()

    def _republish(self, items: Sequence[tuple]) -> bool:
        """Publish a copy of each ``(delivery, header table, count)`` with
        ``greenq-deliveries: count`` (into the delay cascade when its
        ``greenq-eta`` is ahead); True once RabbitMQ confirmed them all."""
        now = time.time()
        out, delayed = [], set()
        try:
            for d, original, count in items:
                headers = clean_headers(original)
                headers[H_DELIVERIES] = count
                again = Outgoing(d.queue, d.body, fit_short_string(d.message_id), d.priority,
                                 read_eta(original)[0])
                if delay_ms(again, now):
                    delayed.add(d.queue)
                out.append(encode_outgoing(again, now, self.settings, headers))
        except Exception as exc:   # a header table py-amqp cannot write back
            log.warning("could not encode %d message(s) again (%s)", len(items), exc)
            return False

        def send(pub: Publisher) -> None:
            self.pool.ensure_queues(pub, (), delayed=delayed)
            for body, properties, exchange, key in out:
                pub.publish_raw(body, properties, exchange, key)
            if pub.confirm:
                nacked, returned = pub.wait_confirms()
                if nacked or returned:
                    raise BrokerError("RabbitMQ refused a republished message")
        try:
            self.pool.run(send)
        except BrokerError as exc:
            log.warning("could not republish %d message(s) (%s)", len(items), exc)
            return False
        return True

    def give_back(self, deliveries: Sequence[Delivery]) -> None:
        """Return deliveries whose tasks never started, their delivery count
        not raised: a copy carrying the count they came with is published
        (confirmed) and the original acked.  A ``basic.reject`` would not do:
        RabbitMQ marks the message redelivered, which counts as a hand-out.
        Deliveries with an ``error``, all of them without publisher confirms
        (an unconfirmed copy could be lost), or when publishing fails, are
        rejected (requeued) instead; those of a dead connection are back already."""
        confirmed = self.settings.confirm_publish
        with self.lock:
            mine = [d for d in deliveries if d.token[0] == self.gen and d.token[1] in self.held]
            items = [(d, self.headers.get(d.token[1]), d.deliveries - 1) for d in mine
                     if d.error is None and confirmed]
        rejected = [d for d in mine if d.error is not None or not confirmed]
        if items and self._republish(items):
            self.settle([d for d, _, _ in items], requeue=False)
        else:
            rejected += [d for d, _, _ in items]
        if rejected:
            self.settle(rejected, requeue=True)

    def stop_consuming(self) -> None:
        """Cancel every consumer, waiting for RabbitMQ's CancelOk, so nothing
        more is delivered (not after a reconnection either), and give back
        what was prefetched and not handed out.  Held deliveries stay settleable."""
        self.paused = True

        def cancel_all() -> List[Delivery]:
            with self.wlock:
                for queue in list(self.consuming):
                    self._cancel(queue)
            with self.lock:
                left = [d for heap in self.buffer.values() for _, _, d in heap]
                self.buffer.clear()
            return left
        left = self.call(cancel_all)
        if left:
            self.give_back(left)

    def take(self, queues: Sequence[str], count: int, timeout: float, max_bytes: int = 0) -> List[Delivery]:
        """Up to ``count`` buffered deliveries, at most ``max_bytes`` of bodies
        (0: no limit; at least one), waiting up to ``timeout`` for the first."""
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            with self.lock:
                out: List[Delivery] = []
                spent = 0
                for queue in queues:
                    heap = self.buffer.get(queue)
                    while heap and len(out) < count:
                        size = len(heap[0][2].body)
                        if max_bytes and out and spent + size > max_bytes:
                            break
                        spent += size
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
                for tag in tags:
                    self.headers.pop(tag, None)
                channel_id, raw = self.channel_id, self.raw
                top = max(tags)
                low = self.low
                while low and low[0] not in held:
                    heapq.heappop(low)
                multiple = not requeue and (not low or low[0] > top)
            try:
                if multiple:
                    data = ack_frame(channel_id, top, True)
                elif requeue:
                    data = b"".join(reject_frame(channel_id, tag, True) for tag in sorted(tags))
                else:
                    data = b"".join(ack_frame(channel_id, tag) for tag in tags)
                raw.write(data)   # type: ignore[union-attr]  # one write for the batch; None once disconnected: caught below
            except AMQP_ERRORS + (AttributeError,) as exc:
                log.debug("could not settle %d message(s): %s (they will be redelivered)", len(tags), exc)

    def publish_unconfirmed(self, items: Sequence[tuple]) -> bool:
        """Write the publishes of ``(body, properties, exchange, routing key)``
        items on the consumer channel (not in confirm mode, not mandatory: a
        return would have no handler).  False when not connected, or when the
        write failed (the loop finds the dead connection and reconnects; the
        caller publishes elsewhere, a reply may then arrive twice)."""
        with self.wlock:
            conn, raw = self.conn, self.raw
            if conn is None or raw is None:
                return False
            channel_id, frame_max = self.channel_id, conn.frame_max
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
                raw.write(b"".join(frames))
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
            if queue not in self.consuming:
                return None
            with self.wlock:
                self._cancel(queue)
                self.dirty = True
            with self.lock:
                dropped = [d for _, _, d in self.buffer.pop(queue, [])]
            self.settle(dropped, requeue=False)
            with self.wlock:
                return len(dropped) + (self.channel.queue_purge(self.settings.queue_name(queue)) or 0)
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
