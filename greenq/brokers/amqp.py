"""``amqp://``, ``pyamqp://``, ``amqps://``: RabbitMQ through py-amqp.

Topology and the delay cascade are described in ``amqp_common``; the full
picture, with delivery semantics and limits, is docs/brokers-rabbitmq.md.

Mapping the broker interface onto AMQP 0-9-1:

* Publishing goes through a per-process pool of publisher connections (one
  channel each, publisher confirms on by default): ``publish_many`` writes every
  message and then waits once for the confirms.
* Consuming: the first ``fetch`` starts the *consumer loop*, a greenlet (or
  thread) that owns the consumer connection: it alone reads from it.  It
  consumes the queues with ``basic_qos(prefetch)``, keeps the deliveries in a
  local buffer (a heap per queue, highest priority first) that ``fetch`` takes
  from, sends heartbeats whether or not ``fetch`` is called, and reconnects by
  itself (``amqp_common.Link``).  ``ack``/``requeue``/``dead_letter`` may be
  called from any greenlet: they only write, under a write lock.
* Leases: RabbitMQ has none.  A message stays with its consumer until acked or
  until the consumer's connection dies; ``renew`` has nothing to extend.
  RabbitMQ's ``consumer_timeout`` (30 min by default) closes a channel holding
  an unacked message longer than that.
* Delivery counts: quorum queues count (``x-delivery-count``); for classic
  queues greenq keeps the count in the ``greenq-deliveries`` header: a
  redelivered message is published again with the count raised and the
  original acked, so the count survives any number of crashes.
"""
from __future__ import annotations

import hashlib
import heapq
import itertools
import logging
import math
import socket
import threading
import time
import uuid
from typing import Any, Dict, List, Optional, Sequence

import amqp
from amqp.exceptions import ChannelError

from ..config import mask_url
from ..exceptions import BrokerError
from .amqp_common import (AMQP_ERRORS, DELAY_LEVELS, DLQ, DLX, H_DEAD_ID, H_DELIVERIES, H_ETA,
                          H_FAILED_AT, H_QUEUE, H_REASON, ChannelPool, Link, Publisher, Settings,
                          browse, clean_headers, close_quietly, connection_params, declare_base,
                          declare_queue, delay_name, delay_route, fast_reads, open_connection,
                          pool_size, reject_all)
from .base import Broker, DeadLetter, Delivery, Outgoing, QueueStats

log = logging.getLogger("greenq.amqp")

TICK = 0.25            # seconds the consumer loop blocks in one read
SYNC_TIMEOUT = 30.0    # seconds a synchronous AMQP method may take (declare, consume, purge)
EARLY = 1.0            # a delayed message arriving this much before its eta goes round again
DLQ_SCAN_MAX = 100000  # messages dlq_get / dlq_requeue look through
STATS_SCAN_MAX = 10000  # dead letters queue_stats looks through to count them by queue
NEXT_DUE_SCAN_MAX = 1000  # messages next_due looks at per delay level


class AMQPBroker(Broker):
    schemes = ("amqp", "pyamqp", "amqps")

    def __init__(self, url: str, config: Any, driver: Any = None) -> None:
        super().__init__(url, config, driver)
        self.settings = Settings.from_config(config)
        self.params = connection_params(url)
        self.pool = ChannelPool(url, self.settings, pool_size(config),
                                role="worker" if driver is not None else "client")
        concurrency = 1 if driver is not None and driver.name == "solo" else config.worker["concurrency"]
        self.prefetch = max(config.worker["prefetch"] or concurrency, concurrency)
        self._known = set(config.worker["queues"]) | {config.default_queue}
        self._consumer: Optional[_Consumer] = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<AMQPBroker {mask_url(self.url)}>"

    # -- health (/healthz) ---------------------------------------------------
    @property
    def healthy(self) -> bool:
        """The consumer connection is up (or, before consuming, publishing works)."""
        c = self._consumer
        if c is not None:
            return c.link.healthy and c.running
        return self.pool.link.failures == 0

    @property
    def last_ok(self) -> float:
        """``time.monotonic()`` of the last successful exchange with RabbitMQ (0.0 before any)."""
        c = self._consumer
        return c.link.last_ok if c is not None else self.pool.link.last_ok

    # -- publishing ----------------------------------------------------------
    def publish_many(self, messages: Sequence[Outgoing]) -> None:
        if messages:
            self.pool.run(self._publish, list(messages))

    def _publish(self, pub: Publisher, messages: List[Outgoing]) -> None:
        queues = {m.queue for m in messages}
        before = time.time()
        self.pool.ensure_queues(pub, queues, delayed={m.queue for m in messages if _delay_ms(m, before)})
        self._known.update(queues)
        now = time.time()   # after declaring: making a delay cascade takes a moment
        for m in messages:
            pub.publish(*self._message(m, now), item=m)
        if not pub.confirm:
            return
        nacked, returned = pub.wait_confirms()
        if returned:   # a queue vanished since we declared it: declare again, publish once more
            by_id = {m.message_id: m for m in messages}
            again = [by_id[msg.properties.get("message_id")] for _, msg in returned
                     if msg.properties.get("message_id") in by_id]
            self.pool.ensure_queues(pub, {m.queue for m in again}, force=True,
                                    delayed={m.queue for m in again if m.eta})
            for m in again:
                pub.publish(*self._message(m, time.time()), item=m)
            nacked2, returned = pub.wait_confirms()
            nacked += nacked2
            if returned:
                raise BrokerError(f"RabbitMQ could not route {len(returned)} message(s): {returned[0][0]}")
        if nacked:
            raise BrokerError(f"RabbitMQ refused {len(nacked)} message(s) (nack), e.g. {nacked[0].message_id}")

    @staticmethod
    def _message(m: Outgoing, now: float, headers: Optional[Dict[str, Any]] = None) -> tuple:
        """(amqp.Message, exchange, routing key) for ``m``."""
        props: Dict[str, Any] = {"message_id": m.message_id, "delivery_mode": 2}
        if m.priority:
            props["priority"] = m.priority
        headers = dict(headers) if headers else {}
        delay_ms = _delay_ms(m, now)
        if delay_ms:
            exchange, key = delay_route(m.queue, delay_ms)
            headers[H_ETA] = float(m.eta)
        else:
            exchange, key = "", m.queue
        if headers:
            props["application_headers"] = headers
        return amqp.Message(m.body, **props), exchange, key

    # -- consuming -----------------------------------------------------------
    def declare(self, queues: Sequence[str]) -> None:
        self._known.update(queues)
        self.pool.run(lambda pub: self.pool.ensure_queues(pub, queues, force=True))

    def set_prefetch(self, prefetch: int) -> None:
        """Messages this consumer may hold unacknowledged (``basic_qos``); the
        default is ``[worker] prefetch``, or the concurrency when that is 0."""
        self.prefetch = max(1, int(prefetch))
        if self._consumer is not None:
            self._consumer.set_prefetch(self.prefetch)

    def _consumer_for(self, queues: Sequence[str]) -> "_Consumer":
        c = self._consumer
        if c is None:
            with self._lock:
                c = self._consumer
                if c is None:
                    self._known.update(queues)
                    c = self._consumer = _Consumer(self, list(queues))
        else:
            c.want(queues)
        return c

    def fetch(self, queues: Sequence[str], count: int, timeout: float) -> List[Delivery]:
        """Up to ``count`` deliveries from the local buffer, waiting up to
        ``timeout`` for the first.  Never raises for a lost connection: while
        reconnecting it returns ``[]``."""
        return self._consumer_for(queues).take(queues, count, timeout)

    def ack(self, deliveries: Sequence[Delivery]) -> None:
        if deliveries and self._consumer is not None:
            self._consumer.settle(deliveries, requeue=False)

    def requeue(self, deliveries: Sequence[Delivery]) -> None:
        if deliveries and self._consumer is not None:
            self._consumer.settle(deliveries, requeue=True)

    def renew(self, deliveries: Sequence[Delivery]) -> None:
        """Nothing to extend: a message stays ours while our connection lives.
        Restarts the consumer loop should it have died."""
        if self._consumer is not None:
            self._consumer.check()

    def dead_letter(self, delivery: Delivery, reason: str) -> None:
        c = self._consumer
        if c is None or not c.holds(delivery):
            return  # from a dead connection: it comes back and is judged again
        headers = {H_QUEUE: delivery.queue, H_REASON: reason[:4000], H_FAILED_AT: time.time(),
                   H_DEAD_ID: uuid.uuid4().hex, H_DELIVERIES: delivery.deliveries}
        msg = amqp.Message(delivery.body, message_id=delivery.message_id, delivery_mode=2,
                           application_headers=headers, **({"priority": delivery.priority}
                                                           if delivery.priority else {}))

        def send(pub: Publisher) -> None:
            self.pool.ensure_queues(pub, ())
            pub.publish(msg, DLX, delivery.queue)
            if pub.confirm:
                pub.wait_confirms()
        self.pool.run(send)
        c.settle([delivery], requeue=False)

    def next_due(self, queues: Sequence[str]) -> Optional[float]:
        """The earliest ``greenq-eta`` in the delay cascades of ``queues``,
        found by browsing them (at most 1,000 messages per level)."""
        def scan(pub: Publisher) -> Optional[float]:
            best: Optional[float] = None
            for queue in queues:
                for level, count in _delay_counts(pub, queue).items():
                    name = delay_name(queue, level)
                    msgs = browse(pub.channel, name, min(count, NEXT_DUE_SCAN_MAX))
                    reject_all(pub.channel, name, msgs)
                    for m in msgs:
                        eta = (m.headers or {}).get(H_ETA)
                        if eta is not None and (best is None or float(eta) < best):
                            best = float(eta)
            return best
        return self.pool.run(scan)

    def interrupt(self) -> None:
        if self._consumer is not None:
            self._consumer.interrupt()

    # -- administration ------------------------------------------------------
    def queue_stats(self, queues: Optional[Sequence[str]] = None) -> List[QueueStats]:
        """``ready``: RabbitMQ's ready count plus what this process prefetched
        and has not handed out; ``held``: what this process handed out (RabbitMQ
        tells other consumers' unacked counts only over its HTTP API);
        ``delayed``: the delay cascade's counts; ``dead``: counted in
        ``greenq.dlq`` (first 10,000).  Without ``queues``: the configured
        queues and those this process used (AMQP cannot list queues)."""
        names = list(queues) if queues else sorted(self._known)
        local = self._consumer.local_counts() if self._consumer is not None else {}

        def stats(pub: Publisher) -> List[QueueStats]:
            dead = _dead_counts(pub)
            rows = []
            for name in names:
                buffered, handed = local.get(name, (0, 0))
                rows.append(QueueStats(name, ready=(_queue_count(pub, name) or 0) + buffered,
                                       delayed=sum(_delay_counts(pub, name).values()),
                                       held=handed, dead=dead.get(name, 0)))
            return rows
        return self.pool.run(stats)

    def purge(self, queue: str) -> int:
        """Delete the ready and delayed messages of ``queue``, with those this
        broker prefetched and has not handed out (its consumer loop stops
        consuming the queue, drops them, purges and consumes again).
        Messages other workers prefetched stay with them."""
        c = self._consumer
        purged = c.purge(queue) if c is not None else None

        def purge(pub: Publisher) -> int:
            total = _purge(pub, queue) if purged is None else purged
            for level in _delay_counts(pub, queue):
                total += _purge(pub, delay_name(queue, level))
            return total
        return self.pool.run(purge)

    def dlq_list(self, limit: int = 100) -> List[DeadLetter]:
        def listing(pub: Publisher) -> List[DeadLetter]:
            self.pool.ensure_queues(pub, ())
            msgs = browse(pub.channel, DLQ, limit)
            reject_all(pub.channel, DLQ, msgs)
            return [_dead_letter(m) for m in msgs]
        return self.pool.run(listing)

    def dlq_get(self, dead_id: str) -> Optional[DeadLetter]:
        def find(pub: Publisher) -> Optional[DeadLetter]:
            self.pool.ensure_queues(pub, ())
            msgs = browse(pub.channel, DLQ, DLQ_SCAN_MAX)
            reject_all(pub.channel, DLQ, msgs)
            for m in msgs:
                dead = _dead_letter(m)
                if dead.id == dead_id:
                    return dead
            return None
        return self.pool.run(find)

    def dlq_requeue(self, dead_ids: Optional[Sequence[str]] = None) -> int:
        """Publish dead letters back to their queue (delivery count reset), then
        remove them from ``greenq.dlq``; the rest stay in order."""
        wanted = None if dead_ids is None else set(dead_ids)

        def requeue(pub: Publisher) -> int:
            self.pool.ensure_queues(pub, ())
            total = _queue_count(pub, DLQ) or 0
            done = 0
            while total > 0:
                msgs = browse(pub.channel, DLQ, min(total, 1000))
                if not msgs:
                    break
                total -= len(msgs)
                chosen = [m for m in msgs if wanted is None or _dead_letter(m).id in wanted]
                self.pool.ensure_queues(pub, {_dead_letter(m).queue for m in chosen})
                for m in chosen:
                    dead = _dead_letter(m)
                    props = {k: v for k, v in m.properties.items() if k in ("message_id", "priority")}
                    props["delivery_mode"] = 2
                    headers = clean_headers(m.headers)
                    if headers:
                        props["application_headers"] = headers
                    pub.publish(amqp.Message(m.body, **props), "", dead.queue)
                pub.flush()
                if pub.confirm and chosen:
                    nacked, returned = pub.wait_confirms()
                    if nacked or returned:
                        reject_all(pub.channel, DLQ, msgs)
                        raise BrokerError("RabbitMQ refused requeued dead letters; they stay in the DLQ")
                picked = {id(m) for m in chosen}
                for m in chosen:
                    pub.channel.basic_ack(m.delivery_tag)
                rest = [m for m in msgs if id(m) not in picked]
                reject_all(pub.channel, DLQ, rest)
                done += len(chosen)
                if wanted is not None and len(wanted) <= done:
                    break
            return done
        return self.pool.run(requeue)

    def dlq_purge(self) -> int:
        def purge(pub: Publisher) -> int:
            self.pool.ensure_queues(pub, ())
            return pub.channel.queue_purge(DLQ) or 0
        return self.pool.run(purge)

    def close(self) -> None:
        c, self._consumer = self._consumer, None
        if c is not None:
            c.stop()
        self.pool.close()


def _queue_count(pub: Publisher, name: str) -> Optional[int]:
    """Ready messages of queue ``name``; None when it does not exist."""
    try:
        return pub.channel.queue_declare(name, passive=True).message_count
    except ChannelError:   # NOT_FOUND closed the channel
        pub.reopen()
        return None


def _delay_counts(pub: Publisher, queue: str) -> Dict[int, int]:
    """Messages waiting in each non-empty level of ``queue``'s delay cascade."""
    if _queue_count(pub, delay_name(queue, 0)) is None:
        return {}   # no cascade: nothing was ever delayed on this queue
    counts = {}
    for level in range(DELAY_LEVELS):
        count = _queue_count(pub, delay_name(queue, level))
        if count:
            counts[level] = count
    return counts


def _purge(pub: Publisher, name: str) -> int:
    try:
        return pub.channel.queue_purge(name) or 0
    except ChannelError:
        pub.reopen()
        return 0


def _dead_counts(pub: Publisher) -> Dict[str, int]:
    """Dead letters by queue (browsing at most STATS_SCAN_MAX of them)."""
    if not _queue_count(pub, DLQ):
        return {}
    msgs = browse(pub.channel, DLQ, STATS_SCAN_MAX)
    reject_all(pub.channel, DLQ, msgs)
    counts: Dict[str, int] = {}
    for m in msgs:
        queue = _dead_letter(m).queue
        counts[queue] = counts.get(queue, 0) + 1
    return counts


def _delay_ms(m: Outgoing, now: float) -> int:
    """Milliseconds ``m`` must wait (0: ready now)."""
    return max(0, math.ceil((m.eta - now) * 1000)) if m.eta is not None else 0


def _dead_letter(msg: "amqp.Message") -> DeadLetter:
    headers = msg.headers or {}
    body = bytes(msg.body)
    message_id = msg.properties.get("message_id") or ""
    if H_DEAD_ID in headers:
        return DeadLetter(id=str(headers[H_DEAD_ID]), queue=str(headers.get(H_QUEUE, "")), body=body,
                          reason=str(headers.get(H_REASON, "")), message_id=message_id,
                          failed_at=float(headers.get(H_FAILED_AT, 0.0)))
    # dead-lettered by RabbitMQ itself (a reject without requeue, a quorum delivery limit)
    death = (headers.get("x-death") or [{}])[0]
    when = death.get("time")
    return DeadLetter(id=message_id or hashlib.sha1(body).hexdigest()[:16],
                      queue=str(death.get("queue") or msg.delivery_info.get("routing_key", "")),
                      body=body, reason=f"rabbitmq: {death.get('reason', 'dead-lettered')}",
                      message_id=message_id,
                      failed_at=when.timestamp() if hasattr(when, "timestamp") else 0.0)


class _Consumer:
    """The consumer connection and the loop that owns it.

    Only the loop reads from the connection.  Other greenlets write (acks,
    rejects) under ``wlock``; ``lock`` guards the buffer and the held set and is
    never held across I/O.  Lock order: ``wlock`` then ``lock``.

    Every (re)connection bumps ``gen``; a delivery's token is ``(gen, tag)``, so
    an ack for a delivery of a dead connection is dropped (RabbitMQ redelivers
    that message: at-least-once).
    """

    def __init__(self, broker: AMQPBroker, queues: List[str]) -> None:
        self.broker = broker
        self.settings = broker.settings
        self.driver = broker.driver
        self.heartbeat = int(broker.params.get("heartbeat", self.settings.heartbeat))
        self.link = Link("consumer", broker.url)
        green = self.driver is not None and self.driver.green
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
        self.gen = 0
        self.consuming: Dict[str, str] = {}       # queue -> consumer tag
        self.buffer: Dict[str, list] = {}         # queue -> heap of (-priority, seq, Delivery)
        self.held: Dict[int, Delivery] = {}       # delivery tag -> every unacked delivery
        self.low: List[int] = []                  # heap of held tags (lazily cleaned)
        self.redo: List[tuple] = []               # (Delivery, amqp.Message) to publish again
        self.calls: List[tuple] = []              # (fn, result box, event) for the loop to run
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
        fast_reads(conn)
        self.sock = conn.transport.sock
        self.sock.settimeout(SYNC_TIMEOUT)
        with self.wlock:
            with self.lock:
                self.gen += 1
                self.conn = conn
                self.channel = conn.channel()
                self.channel.auto_decode = False
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
                self.consuming[queue] = ch.basic_consume(
                    queue, callback=self._callback(queue, self.gen), on_cancel=self._on_cancel)
        for queue in [q for q in self.consuming if q not in wanted]:
            ch.basic_cancel(self.consuming.pop(queue))

    def _step(self) -> None:
        if self.cancelled:
            raise amqp.exceptions.ConsumerCancelled("RabbitMQ cancelled the consumer (queue deleted?)")
        if self.dirty:
            with self.wlock:
                self._sync()
        # the socket keeps one timeout (TICK) while the loop reads: setting it
        # per read costs two system calls a frame on a plain socket
        self.sock.settimeout(TICK)
        try:
            while True:
                self.conn.drain_events()
                if time.monotonic() >= self._next_tick or self.redo or self.calls or self.dirty:
                    break
        except socket.timeout:
            pass
        finally:
            self.sock.settimeout(SYNC_TIMEOUT)
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
        quorum = self.settings.quorum

        def on_message(msg: "amqp.Message") -> None:
            info = msg.delivery_info
            tag = info["delivery_tag"]
            props = msg.properties
            headers = props.get("application_headers")
            priority = props.get("priority") or 0
            redo = False
            if quorum:
                deliveries = int(headers.get("x-delivery-count", 0)) + 1 if headers else 1
            else:
                deliveries = (int(headers.get(H_DELIVERIES, 0)) if headers else 0) + 1
                redo = info["redelivered"]
            if headers and H_ETA in headers and float(headers[H_ETA]) > time.time() + EARLY:
                redo = True
            d = Delivery(queue, msg.body, props.get("message_id") or "", deliveries, (gen, tag), priority)
            with self.lock:
                if gen != self.gen:
                    return
                self.held[tag] = d
                heapq.heappush(self.low, tag)
                if redo:
                    self.redo.append((d, msg))
                    return
                heapq.heappush(self.buffer.setdefault(queue, []), (-priority, next(self._seq), d))
            if not self.ready.is_set():
                self.ready.set()
        return on_message

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
        for d, msg in items:
            headers = clean_headers(msg.headers)
            headers[H_DELIVERIES] = d.deliveries if msg.delivery_info["redelivered"] else d.deliveries - 1
            eta = (msg.headers or {}).get(H_ETA)
            again = Outgoing(d.queue, d.body, d.message_id, d.priority, float(eta) if eta else None)
            if _delay_ms(again, now):
                delayed.add(d.queue)
            out.append(AMQPBroker._message(again, now, headers))

        def send(pub: Publisher) -> None:
            self.broker.pool.ensure_queues(pub, (), delayed=delayed)
            for message, exchange, key in out:
                pub.publish(message, exchange, key)
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
                for d, _ in items:
                    if d.token[0] == self.gen:
                        heapq.heappush(self.buffer.setdefault(d.queue, []), (-d.priority, next(self._seq), d))
            self.ready.set()
            return
        self.settle([d for d, _ in items], requeue=False)

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
                if multiple:
                    channel.basic_ack(top, multiple=True)
                elif requeue:
                    for tag in sorted(tags):
                        channel.basic_reject(tag, requeue=True)
                else:
                    for tag in tags:
                        channel.basic_ack(tag)
            except AMQP_ERRORS + (AttributeError,) as exc:
                log.debug("could not settle %d message(s): %s (they will be redelivered)", len(tags), exc)

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
            for d, _ in self.redo:
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
