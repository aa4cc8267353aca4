"""``amqp://``, ``pyamqp://``, ``amqps://``: RabbitMQ through py-amqp.

Topology and the delay cascade are described in ``amqp_common``, publishing in
``amqp_publish``, the consumer loop in ``amqp_consumer``, the frames greenq
packs and parses itself in ``amqp_wire``, and the only code touching py-amqp's
internals is ``amqp_adapter``; the full picture, with delivery semantics and
limits, is docs/brokers.md (RabbitMQ).

Mapping the broker interface onto AMQP 0-9-1:

* Publishing goes through a per-process pool of publisher connections (one
  channel each, publisher confirms on by default): ``publish_many`` writes every
  message and then waits once for the confirms.
* Consuming: the first ``fetch`` starts the *consumer loop*, a greenlet (or
  thread) that owns the consumer connection: it alone reads from it.  It
  consumes the queues with ``basic_qos(prefetch)``, keeps the deliveries in a
  local buffer (a heap per queue, highest priority first) that ``fetch`` takes
  from, sends heartbeats whether or not ``fetch`` is called, and reconnects by
  itself (``common.ConnectionState``).  ``ack``/``requeue``/``dead_letter`` may be
  called from any greenlet: they only write, under a write lock.
* Leases: RabbitMQ has none.  A message stays with its consumer until acked or
  until the consumer's connection dies; ``renew`` has nothing to extend.
  RabbitMQ's ``consumer_timeout`` (30 min by default) closes a channel holding
  an unacked message longer than that.
* Delivery counts: a message's count is its ``greenq-deliveries`` header (the
  hand-outs before greenq last published it, 0 when absent) plus one, plus
  RabbitMQ's ``x-delivery-count`` on a quorum queue.  On a classic queue a
  redelivered message (its consumer died, or it was requeued after its task
  started) is published again with the header raised and the original acked,
  so the count survives any number of crashes.  ``requeue(started=False)``
  publishes a copy with the header the message came with and acks the
  original: the next hand-out counts as the same delivery.
* Bad input: every property and header read is checked by ``amqp_meta``; a
  message with a bad one is handed out with ``Delivery.error`` set (the
  worker dead-letters it) and never stops the consumer loop.
"""
from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import Any, Dict, List, Optional, Sequence

import amqp
from amqp.exceptions import ChannelError

from ...config import effective_prefetch, mask_url
from ...exceptions import BrokerError
from .common import (DELAY_LEVELS, H_DEAD_ID, H_DELIVERIES, H_FAILED_AT,
                          H_QUEUE, H_REASON, Settings, browse, clean_headers, connection_params,
                          reject_all)
from .consumer import ConsumerLoop
from .meta import (MAX_MESSAGE_ID_BYTES, MAX_QUEUE_NAME_BYTES, check_message_id, fit_short_string,
                        read_dead_letter, read_eta)
from .publish import NACKED, ChannelPool, Publisher, delay_ms, encode_outgoing, pool_size, publish_calls
from ...brokers.base import Broker, DeadLetter, Delivery, Outgoing, QueueStats, body_limit

log = logging.getLogger("greenq.amqp")

DLQ_SCAN_MAX = 100000  # messages dlq_get / dlq_requeue look through
STATS_SCAN_MAX = 10000  # dead letters queue_stats looks through to count them by queue
NEXT_DUE_SCAN_MAX = 1000  # messages next_due looks at per delay level


class AMQPBroker(Broker):
    #: longest task id (RabbitMQ ``message_id``) and task queue name, in bytes
    #: of UTF-8, for the validation of ``apply_async`` options (the queue name's
    #: is the instance's: shorter under a long key_prefix, ``Settings.max_queue_name_bytes``)
    max_message_id_bytes = MAX_MESSAGE_ID_BYTES
    max_queue_name_bytes = MAX_QUEUE_NAME_BYTES
    #: RabbitMQ pushes deliveries: when ``fetch`` comes back empty one may
    #: still be on its way to this process, in no queue's count (a --burst
    #: worker looks twice, a fetch apart, before it stops)
    pushes_deliveries = True
    prefetch_window = True

    def __init__(self, url: str, config: Any, driver: Any = None) -> None:
        super().__init__(url, config, driver)
        self.settings = Settings.from_config(config)
        self.max_queue_name_bytes = self.settings.max_queue_name_bytes
        self.params = connection_params(url)
        self.pool = ChannelPool(url, self.settings, pool_size(config),
                                role="worker" if driver is not None else "client")
        concurrency = 1 if driver is not None and driver.name == "solo" else config.worker["concurrency"]
        self.prefetch = effective_prefetch(concurrency, config.worker["prefetch"])
        self._known = set(config.worker["queues"]) | {config.default_queue}
        self._consumer: Optional[ConsumerLoop] = None
        self._lock = threading.Lock()
        self._dead_cache: Optional[tuple] = None   # (P.dlq depth, when, counts by queue)

    def __repr__(self) -> str:
        return f"<AMQPBroker {mask_url(self.url)}>"

    # -- health (/healthz) ---------------------------------------------------
    @property
    def healthy(self) -> bool:
        """The consumer connection is up (or, before consuming, publishing works)."""
        c = self._consumer
        if c is not None:
            return c.conn_state.healthy and c.running
        return self.pool.conn_state.failures == 0

    @property
    def last_ok(self) -> float:
        """``time.monotonic()`` of the last successful exchange with RabbitMQ (0.0 before any)."""
        c = self._consumer
        return c.conn_state.last_ok if c is not None else self.pool.conn_state.last_ok

    # -- publishing ----------------------------------------------------------
    def publish_many(self, messages: Sequence[Outgoing]) -> None:
        """Raises ValueError, sending nothing, when a task id is too long for
        a RabbitMQ ``message_id`` (``MAX_MESSAGE_ID_BYTES``)."""
        if messages:
            for m in messages:
                check_message_id(m.message_id)
            if len(messages) == 1 and self.settings.confirm_publish:
                m = messages[0]
                pool = self.pool
                if (m.eta is None and pool.base_declared and m.queue in pool.declared
                        and not (self.settings.celery_queues and m.queue in self.settings.celery_queues)):
                    self._publish_shared(m)
                    return
            self.pool.run(self._publish, list(messages))

    def _publish_shared(self, m: Outgoing) -> None:
        """One ready message with confirms, its queue declared: on the pool's
        shared publisher, so concurrent callers share confirm waits."""
        confirm = self.pool.publish_confirmed(encode_outgoing(m, 0.0, self.settings), m.message_id)
        if confirm.returned is not None:   # the queue vanished since we declared it: declare, publish again
            self.pool.run(self._republish, m)
        elif confirm.state == NACKED:
            raise BrokerError(f"RabbitMQ refused 1 message(s) (nack), e.g. {m.message_id}")

    def _republish(self, pub: Publisher, m: Outgoing) -> None:
        self.pool.ensure_queues(pub, (m.queue,), force=True)
        pub.publish_raw(*encode_outgoing(m, 0.0, self.settings), item=m)
        nacked, returned = pub.wait_confirms()
        if returned:
            raise BrokerError(f"RabbitMQ could not route {len(returned)} message(s): {returned[0][0]}")
        if nacked:
            raise BrokerError(f"RabbitMQ refused {len(nacked)} message(s) (nack), e.g. {nacked[0].message_id}")

    def _publish(self, pub: Publisher, messages: List[Outgoing]) -> None:
        pool = self.pool
        if len(messages) == 1 and messages[0].eta is None:   # one delay(): the hot path
            m = messages[0]
            if not pool.base_declared or m.queue not in pool.declared:
                pool.ensure_queues(pub, (m.queue,))
                self._known.add(m.queue)
            pub.publish_raw(*publish_calls(messages, 0.0, self.settings)[0], item=m)   # no eta: now unused
        else:
            now = time.time()
            queues = {m.queue for m in messages}
            pool.ensure_queues(pub, queues, delayed={m.queue for m in messages if delay_ms(m, now)})
            self._known.update(queues)
            now = time.time()   # after declaring: making a delay cascade takes a moment
            for call, m in zip(publish_calls(messages, now, self.settings), messages):
                pub.publish_raw(*call, item=m)
        if not pub.confirm:
            return
        nacked, returned = pub.wait_confirms()
        if returned:   # a queue vanished since we declared it: declare again, publish once more
            by_id = {m.message_id: m for m in messages}
            again = [by_id[msg.properties.get("message_id")] for _, msg in returned
                     if msg.properties.get("message_id") in by_id]
            self.pool.ensure_queues(pub, {m.queue for m in again}, force=True,
                                    delayed={m.queue for m in again if m.eta})
            for call, m in zip(publish_calls(again, time.time(), self.settings), again):
                pub.publish_raw(*call, item=m)
            nacked2, returned = pub.wait_confirms()
            nacked += nacked2
            if returned:
                raise BrokerError(f"RabbitMQ could not route {len(returned)} message(s): {returned[0][0]}")
        if nacked:
            raise BrokerError(f"RabbitMQ refused {len(nacked)} message(s) (nack), e.g. {nacked[0].message_id}")

    def publish_unconfirmed(self, items: Sequence[tuple]) -> bool:
        """Publish ``(body, encoded properties, exchange, routing key)`` items
        on the consumer channel, without confirms, and return True; False when
        this broker is not consuming or not connected (publish otherwise).
        RabbitMQ handles a channel's methods in order, so they are routed
        before any ack written after this returns (``rpc://`` results)."""
        c = self._consumer
        return c is not None and c.publish_unconfirmed(items)

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

    def _consumer_for(self, queues: Sequence[str]) -> "ConsumerLoop":
        c = self._consumer
        if c is None:
            with self._lock:
                c = self._consumer
                if c is None:
                    self._known.update(queues)
                    c = self._consumer = ConsumerLoop(
                        queues, url=self.url, params=self.params, settings=self.settings, pool=self.pool,
                        prefetch=self.prefetch, driver=self.driver,
                        max_message_size=self.config.max_message_size, body_limit=body_limit(self.config))
        else:
            c.want(queues)
        return c

    def fetch(self, queues: Sequence[str], count: int, timeout: float, max_bytes: int = 0) -> List[Delivery]:
        """Up to ``count`` deliveries (at most ``max_bytes`` of bodies) from the
        local buffer, waiting up to ``timeout`` for the first.  Never raises
        for a lost connection: while reconnecting it returns ``[]``."""
        return self._consumer_for(queues).take(queues, count, timeout, max_bytes)

    def ack(self, deliveries: Sequence[Delivery]) -> None:
        if deliveries and self._consumer is not None:
            self._consumer.settle(deliveries, requeue=False)

    def requeue(self, deliveries: Sequence[Delivery], started: bool = True) -> None:
        """``started``: a ``basic.reject`` (requeue); the message comes back
        marked redelivered and its count is raised.  Not ``started``: see
        ``ConsumerLoop.give_back`` (a confirmed copy with the same count)."""
        if deliveries and self._consumer is not None:
            if started:
                self._consumer.settle(deliveries, requeue=True)
            else:
                self._consumer.give_back(deliveries)

    def stop_consuming(self) -> None:
        """``basic.cancel`` every consumer and wait for CancelOk; what was
        prefetched and not handed out goes back with its count unchanged."""
        if self._consumer is not None:
            self._consumer.stop_consuming()

    def renew(self, deliveries: Sequence[Delivery]) -> None:
        """Nothing to extend: a message stays ours while our connection lives.
        Restarts the consumer loop should it have died."""
        if self._consumer is not None:
            self._consumer.check()

    def dead_letter(self, delivery: Delivery, reason: str) -> None:
        self._dead_cache = None
        c = self._consumer
        if c is None or not c.holds(delivery):
            return  # from a dead connection: it comes back and is judged again
        headers = {H_QUEUE: delivery.queue, H_REASON: reason[:4000], H_FAILED_AT: time.time(),
                   H_DEAD_ID: uuid.uuid4().hex, H_DELIVERIES: delivery.deliveries}
        msg = amqp.Message(delivery.body, message_id=fit_short_string(delivery.message_id), delivery_mode=2,
                           application_headers=headers, **({"priority": delivery.priority}
                                                           if delivery.priority else {}))

        def send(pub: Publisher) -> None:
            for force in (False, True):   # returned: P.dlq was deleted; declare it again
                self.pool.ensure_queues(pub, (), force=force)
                pub.publish(msg, self.settings.dlx, delivery.queue)
                if not pub.confirm:
                    return
                nacked, returned = pub.wait_confirms()
                if nacked:
                    break
                if not returned:
                    return
            raise BrokerError(f"RabbitMQ refused the dead letter of {delivery.message_id!r} "
                              f"({'nack' if nacked else 'unroutable'}); the message stays unacknowledged")
        self.pool.run(send)
        c.settle([delivery], requeue=False)   # only once the dead letter is safe

    def next_due(self, queues: Sequence[str]) -> Optional[float]:
        """The earliest ``greenq-eta`` in the delay cascades of ``queues``,
        found by browsing them (at most 1,000 messages per level), from the
        highest level down: a message only ever moves down the cascade, so
        one that moves while the scan goes on is met again further down
        instead of slipping past it (a scan upwards, or one that counted the
        levels first and then browsed those that had messages, could miss a
        message that is on its way the whole time)."""
        def scan(pub: Publisher) -> Optional[float]:
            best: Optional[float] = None
            for queue in queues:
                if _queue_count(pub, self.settings.delay_name(queue, 0)) is None:
                    continue    # no cascade: nothing was ever delayed on this queue
                for level in reversed(range(DELAY_LEVELS)):
                    name = self.settings.delay_name(queue, level)
                    msgs = browse(pub.channel, name, NEXT_DUE_SCAN_MAX)
                    reject_all(pub.channel, name, msgs)
                    for m in msgs:
                        eta = read_eta(m.headers)[0]   # a bad one: not ours, ignored
                        if eta is not None and (best is None or eta < best):
                            best = eta
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
        ``P.dlq`` (first 10,000).  Without ``queues``: the configured
        queues and those this process used (AMQP cannot list queues)."""
        names = list(queues) if queues else sorted(self._known)
        local = self._consumer.local_counts() if self._consumer is not None else {}

        def stats(pub: Publisher) -> List[QueueStats]:
            dead = self._dead_by_queue(pub)
            rows = []
            for name in names:
                buffered, handed = local.get(name, (0, 0))
                # the cascade before the queue: a message leaving it meanwhile is counted in the queue
                delayed = sum(_delay_counts(pub, self.settings, name).values())
                ready = _queue_count(pub, self.settings.queue_name(name)) or 0
                rows.append(QueueStats(name, ready=ready + buffered, delayed=delayed,
                                       held=handed, dead=dead.get(name, 0)))
            return rows
        return self.pool.run(stats)

    def _dead_by_queue(self, pub: Publisher) -> Dict[str, int]:
        """Dead letters by queue; a browse of P.dlq is reused for 10 s
        while its depth does not change (a --burst worker asks every second)."""
        total = _queue_count(pub, self.settings.dlq) or 0
        cached = self._dead_cache
        if cached is not None and cached[0] == total and time.monotonic() - cached[1] < 10:
            return cached[2]
        counts = _dead_counts(pub, self.settings, total)
        self._dead_cache = (total, time.monotonic(), counts)
        return counts

    def purge(self, queue: str) -> int:
        """Delete the ready and delayed messages of ``queue``, with those this
        broker prefetched and has not handed out (its consumer loop stops
        consuming the queue, drops them, purges and consumes again).
        Messages other workers prefetched stay with them."""
        c = self._consumer
        purged = c.purge(queue) if c is not None else None

        def purge(pub: Publisher) -> int:
            total = _purge(pub, self.settings.queue_name(queue)) if purged is None else purged
            for level in _delay_counts(pub, self.settings, queue):
                total += _purge(pub, self.settings.delay_name(queue, level))
            return total
        return self.pool.run(purge)

    def dlq_list(self, limit: int = 100, preview: Optional[int] = None) -> List[DeadLetter]:
        """RabbitMQ sends each body whole (no partial read); ``preview`` cuts it here."""
        def listing(pub: Publisher) -> List[DeadLetter]:
            self.pool.ensure_queues(pub, ())
            msgs = browse(pub.channel, self.settings.dlq, limit)
            reject_all(pub.channel, self.settings.dlq, msgs)
            letters = [_dead_letter(m, self.settings) for m in msgs]
            if preview is not None:
                for dead in letters:
                    dead.body = dead.body[:preview]
            return letters
        return self.pool.run(listing)

    def dlq_get(self, dead_id: str) -> Optional[DeadLetter]:
        def find(pub: Publisher) -> Optional[DeadLetter]:
            self.pool.ensure_queues(pub, ())
            msgs = browse(pub.channel, self.settings.dlq, DLQ_SCAN_MAX)
            reject_all(pub.channel, self.settings.dlq, msgs)
            for m in msgs:
                dead = _dead_letter(m, self.settings)
                if dead.id == dead_id:
                    return dead
            return None
        return self.pool.run(find)

    def dlq_requeue(self, dead_ids: Optional[Sequence[str]] = None) -> int:
        """Publish dead letters back to their queue (delivery count reset), then
        remove them from ``P.dlq``; the rest stay in order."""
        wanted = None if dead_ids is None else set(dead_ids)
        self._dead_cache = None

        def requeue(pub: Publisher) -> int:
            self.pool.ensure_queues(pub, ())
            total = _queue_count(pub, self.settings.dlq) or 0
            done = 0
            while total > 0:
                msgs = browse(pub.channel, self.settings.dlq, min(total, 1000))
                if not msgs:
                    break
                total -= len(msgs)
                letters = {id(m): _dead_letter(m, self.settings) for m in msgs}
                chosen = [m for m in msgs if (wanted is None or letters[id(m)].id in wanted)
                          and self.settings.usable(letters[id(m)].queue)]   # no queue to go back to: stays
                self.pool.ensure_queues(pub, {letters[id(m)].queue for m in chosen})
                for m in chosen:
                    dead = letters[id(m)]
                    if dead.queue in self.settings.celery_queues:   # as Celery's message (celery_broker)
                        pub.publish_raw(*encode_outgoing(Outgoing(dead.queue, m.body, dead.message_id or dead.id),
                                                         time.time(), self.settings))
                        continue
                    props = {k: v for k, v in m.properties.items() if k in ("message_id", "priority")}
                    props["delivery_mode"] = 2
                    headers = clean_headers(m.headers)
                    if headers:
                        props["application_headers"] = headers
                    pub.publish(amqp.Message(m.body, **props), "", self.settings.queue_name(dead.queue))
                pub.flush()
                if pub.confirm and chosen:
                    nacked, returned = pub.wait_confirms()
                    if nacked or returned:
                        reject_all(pub.channel, self.settings.dlq, msgs)
                        raise BrokerError("RabbitMQ refused requeued dead letters; they stay in the DLQ")
                picked = {id(m) for m in chosen}
                for m in chosen:
                    pub.channel.basic_ack(m.delivery_tag)
                rest = [m for m in msgs if id(m) not in picked]
                reject_all(pub.channel, self.settings.dlq, rest)
                done += len(chosen)
                if wanted is not None and len(wanted) <= done:
                    break
            return done
        return self.pool.run(requeue)

    def dlq_purge(self) -> int:
        self._dead_cache = None

        def purge(pub: Publisher) -> int:
            self.pool.ensure_queues(pub, ())
            return pub.channel.queue_purge(self.settings.dlq) or 0
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


def _delay_counts(pub: Publisher, names: Settings, queue: str) -> Dict[int, int]:
    """Messages waiting in each non-empty level of logical ``queue``'s delay
    cascade, counted from the highest level down (a message moving down while
    they are counted may be counted twice, never missed)."""
    if _queue_count(pub, names.delay_name(queue, 0)) is None:
        return {}   # no cascade: nothing was ever delayed on this queue
    counts = {}
    for level in reversed(range(DELAY_LEVELS)):
        count = _queue_count(pub, names.delay_name(queue, level))
        if count:
            counts[level] = count
    return counts


def _purge(pub: Publisher, name: str) -> int:
    try:
        return pub.channel.queue_purge(name) or 0
    except ChannelError:
        pub.reopen()
        return 0


def _dead_letter(msg: "amqp.Message", names: Settings) -> DeadLetter:
    """A message of ``P.dlq`` as a DeadLetter of a logical queue."""
    return read_dead_letter(msg.properties, msg.body, msg.delivery_info.get("routing_key"),
                            names.logical)


def _dead_counts(pub: Publisher, names: Settings, total: int) -> Dict[str, int]:
    """Dead letters by queue (browsing at most STATS_SCAN_MAX of them)."""
    if not total:
        return {}
    msgs = browse(pub.channel, names.dlq, STATS_SCAN_MAX)
    reject_all(pub.channel, names.dlq, msgs)
    counts: Dict[str, int] = {}
    for m in msgs:
        queue = _dead_letter(m, names).queue
        counts[queue] = counts.get(queue, 0) + 1
    return counts
