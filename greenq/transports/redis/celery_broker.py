"""Queues in ``[greenq] celery_queues`` on ``redis://``: kombu's list format
and kombu's own ack bookkeeping, so Celery workers and greenq workers can
share a queue (docs/celery.md).  Every other queue keeps greenq's streams
(``RedisBroker``, which this class is for every queue not listed).

Key layout, kombu's (no ``key_prefix``: Celery's clients and workers must
find them)::

    <queue>             list, priority step 0 (kombu's highest on Redis)
    <queue>\\x06\\x16<N>   list of priority step N (3, 6, 9)
    unacked             hash delivery_tag -> JSON [message, exchange, routing key]
    unacked_index       sorted set delivery_tag -> delivered at (epoch s)
    unacked_mutex       the lock kombu's restore takes (``redis-py`` Lock)

Producers ``LPUSH`` the JSON element (``greenq.celery.protocol``) and consumers
pop from the right, so each list is FIFO.  kombu (and greenq) restores an
entry of ``unacked`` whose ``unacked_index`` score is older than
``now - visibility_timeout`` back onto its list.  greenq's own, beside them
(with ``key_prefix`` ``P``)::

    P:celery:held:<tag>  the greenq consumer holding the message; expires with
                         its lease (``lease_seconds``), renewed with it
    P:celery:n:<tag>     how many times greenq handed the message out

How greenq fits kombu's scheme:

* ``fetch`` pops, in one script per call (nothing half-moved is ever seen),
  from each queue's lists (step 0 first), writes the message into ``unacked``
  exactly as kombu does, and scores it ``now + lease_seconds -
  visibility_timeout``: Celery's restore (and greenq's) gives it back when
  greenq's lease, not Celery's hour, runs out.  ``renew`` moves the score on.
* An ``Outgoing`` with an eta in the future is written straight into
  ``unacked`` under a fresh tag with the score ``eta - visibility_timeout``:
  whichever worker restores next, Celery's or greenq's, puts it on its list
  at its eta (greenq restores every second; Celery every
  ``unacked_restore_interval`` x ``unacked_restore_throttle``, about 100 s).
  That is a message a greenq worker received before its eta and defers
  (``Codec.outgoing(sent=False)``); what greenq *sends* with an eta goes on
  the list at once with the eta in its header, as Celery's client does
  (``Codec.outgoing`` leaves ``Outgoing.eta`` unset for it).
* ``ack``, ``requeue``, ``renew`` and ``dead_letter`` act only while this
  consumer holds the message (``P:celery:held:<tag>`` names it), as greenq's
  leases do elsewhere.
* A list element that is not a kombu message with a delivery tag (or is
  larger than ``max_message_size``) is moved by the fetch script straight to
  greenq's dead letters with the reason; one that is, but does not decode
  (``greenq.celery.protocol``), is handed out and dead-lettered by the worker.

kombu's ``visibility_timeout`` is ``[greenq] celery_visibility_timeout``
(kombu's default, one hour, unless set): it must equal the one of every Celery
app on the database, since ``unacked_index`` is one per database and each
worker restores by its own.  kombu's default key names and no
``global_keyprefix`` are assumed.
"""
from __future__ import annotations

import bisect
import json
import logging
import time
from typing import Any, List, Optional, Sequence, Tuple, cast

from ...brokers.base import PREVIEW_BYTES, Delivery, Outgoing, QueueStats
from ...celery import protocol
from ...config import Config
from ...exceptions import BrokerError, MessageError, describe
from ...reconnect import Unreachable
from . import lua
from .broker import RedisBroker

log = logging.getLogger("greenq.transports.redis.celery")

SEP = "\x06\x16"
PRIORITY_STEPS = (0, 3, 6, 9)          # kombu's default ``priority_steps``
UNACKED, UNACKED_INDEX, UNACKED_MUTEX = "unacked", "unacked_index", "unacked_mutex"
MUTEX_SECONDS = 300                    # kombu's ``unacked_mutex_expire``
VISIBILITY_TIMEOUT = 3600.0            # kombu's default ``visibility_timeout``
COUNT_TTL = 7 * 86400                  # how long a delivery count outlives its last hand-out
POLL_FIRST, POLL_CAP = 0.02, 0.25      # empty-fetch polling: first wait, longest wait
RESTORE_EVERY = 1.0                    # seconds between restores of due unacked entries
RESTORE_BATCH = 100
#: the scripts (scripts/celery_*.lua, each with its KEYS, ARGV and reply in its header)
FETCH, SETTLE, DLQ_BACK = lua.load("celery_fetch"), lua.load("celery_settle"), lua.load("celery_dlq_back")


def list_key(queue: str, priority: int) -> str:
    """kombu's list of ``queue`` for ``priority`` (its step: 0-2 -> 0, 3-5 -> 3, ...)."""
    step = PRIORITY_STEPS[max(0, bisect.bisect(PRIORITY_STEPS, priority) - 1)]
    return f"{queue}{SEP}{step}" if step else queue


def list_keys(queue: str) -> List[str]:
    """Every list of ``queue``, in kombu's consuming order (step 0 first)."""
    return [list_key(queue, step) for step in PRIORITY_STEPS]


class CeleryDelivery(Delivery):
    """A Celery message handed out: decoded at fetch (``message``) or not
    (``problem``, the dead-letter reason, raised by ``decode``)."""

    __slots__ = ("message", "problem")

    def __init__(self, queue: str, body: bytes, message_id: str, deliveries: int, token: Any,
                 priority: int, message: Optional[protocol.CeleryMessage],
                 problem: Optional[MessageError]) -> None:
        super().__init__(queue, body, message_id, deliveries, token, priority)
        self.message = message
        self.problem = problem

    def decode(self, codec: Any) -> Any:
        if self.message is None:
            raise self.problem or MessageError("undecodable Celery message")
        return self.message


class CeleryRedisBroker(RedisBroker):
    """``RedisBroker`` for every queue, except that those in ``[greenq]
    celery_queues`` are kombu's lists (module docstring)."""

    def __init__(self, url: str, config: Config, driver: Any = None) -> None:
        super().__init__(url, config, driver)
        self.celery_queues = frozenset(getattr(config, "celery_queues", None) or ())
        self.visibility_timeout = float(getattr(config, "celery_visibility_timeout", VISIBILITY_TIMEOUT))
        self._accept = tuple(config.accept_content) + ("json",)
        self._k_held = f"{self.prefix}:celery:held:"
        self._k_count = f"{self.prefix}:celery:n:"
        self._celery_fetch = self.client.register_script(FETCH)
        self._celery_settle = self.client.register_script(SETTLE)
        self._celery_dlq_back = self.client.register_script(DLQ_BACK)
        self._next_restore = 0.0

    def _celery(self, queues: Sequence[str]) -> Tuple[List[str], List[str]]:
        mine = [q for q in queues if q in self.celery_queues]
        return mine, ([q for q in queues if q not in self.celery_queues] if mine else list(queues))

    def _score(self) -> float:
        """The unacked_index score of a message greenq holds: kombu's restore
        (``score < now - visibility_timeout``) comes when the lease runs out."""
        return time.time() + self._lease - self.visibility_timeout

    # -- publishing -------------------------------------------------------------------
    def publish_many(self, messages: Sequence[Outgoing]) -> None:
        if not self.celery_queues:
            return super().publish_many(messages)
        mine = [m for m in messages if m.queue in self.celery_queues]
        if len(mine) < len(messages):
            super().publish_many([m for m in messages if m.queue not in self.celery_queues])
        if mine:
            self._call(lambda: self._push(mine), self._publish_budget, "publish")

    def _push(self, messages: Sequence[Outgoing]) -> None:
        now = time.time()
        pipe = self.client.pipeline(transaction=True)
        for m in messages:
            body = m.body
            if m.eta is not None and m.eta > now:
                tag = protocol.delivery_tag(body)
                if tag is None:
                    raise BrokerError(f"message {m.message_id} for Celery queue {m.queue} has no delivery tag")
                pipe.hset(UNACKED, tag, b"[" + body + b"," + json.dumps("").encode() + b","
                          + json.dumps(m.queue).encode() + b"]")
                pipe.zadd(UNACKED_INDEX, {tag: m.eta - self.visibility_timeout})
            else:
                pipe.lpush(list_key(m.queue, m.priority), body)
        pipe.execute()

    # -- consuming ----------------------------------------------------------------------
    def declare(self, queues: Sequence[str]) -> None:
        super().declare(self._celery(queues)[1])

    def fetch(self, queues: Sequence[str], count: int, timeout: float, max_bytes: int = 0) -> List[Delivery]:
        mine, native = self._celery(queues)
        if not mine:
            return super().fetch(queues, count, timeout, max_bytes)
        if count <= 0 or not self._consuming:
            return []
        deadline = time.monotonic() + max(0.0, timeout)
        interrupts = self._interrupts
        pause = POLL_FIRST
        while True:
            try:
                out = self.reconnector.call(lambda: self._take(mine, count, max_bytes), deadline, "fetch")
            except Unreachable:
                return []
            if out:
                return out
            left = deadline - time.monotonic()
            if native:
                out = super().fetch(native, count, max(0.0, min(left, pause)), max_bytes)
                if out:
                    return out
            elif left > 0:
                self._sleep(min(left, pause))
            pause = min(POLL_CAP, pause * 2)
            if time.monotonic() >= deadline or self._interrupts != interrupts or not self._consuming:
                return []

    def _take(self, queues: Sequence[str], count: int, max_bytes: int) -> List[Delivery]:
        if time.monotonic() >= self._next_restore:
            self._next_restore = time.monotonic() + RESTORE_EVERY
            self._restore_due()
        keys: List[str] = []
        owners: List[str] = []
        for q in queues:
            for key in list_keys(q):
                keys.append(key)
                owners.append(q)
        bad, taken = self._celery_fetch(
            keys=[UNACKED, UNACKED_INDEX, self._k_dead, self._k_dead_count, self._k_queues, *keys],
            args=[count, repr(self._score()), max_bytes, self._limit, self._k_held, self._k_count, COUNT_TTL,
                  repr(time.time()), PREVIEW_BYTES, self.consumer, int(self._lease * 1000), *owners])
        if bad:
            log.warning("%d element(s) of Celery queue(s) %s were not kombu messages (or too large): "
                        "dead-lettered", bad, ", ".join(queues))
        return [self._delivery_of(keys[i - 1], owners[i - 1], tag, item, n) for i, tag, item, n in taken]

    def _delivery_of(self, key: str, queue: str, tag: Any, item: bytes, n: int) -> Delivery:
        tag = tag.decode() if isinstance(tag, bytes) else str(tag)
        message: Optional[protocol.CeleryMessage] = None
        problem: Optional[MessageError] = None
        try:
            message = protocol.decode_redis(item, self._accept, queue, self.config.max_message_size)
        except MessageError as exc:
            problem = exc
        mid = message.id if message is not None else tag
        step = PRIORITY_STEPS.index(int(key.rpartition(SEP)[2])) if SEP in key else 0
        return CeleryDelivery(queue, item, mid, int(n), (tag, key), message.priority if message else step,
                              message, problem)

    def _settle(self, action: str, deliveries: Sequence[Delivery], reason: str = "",
                budget: Optional[float] = None) -> int:
        args: List[Any] = [action, self.consumer, self._k_held, self._k_count, int(self._lease * 1000),
                           repr(self._score()), repr(time.time())]
        carry = action in ("requeue", "unstarted", "dead")      # the element goes somewhere: send it
        for d in deliveries:
            tag, key = d.token
            args += [tag, key, d.queue, d.body if carry else b"", reason]
        return self._call(lambda: self._celery_settle(
            keys=[UNACKED, UNACKED_INDEX, self._k_dead, self._k_dead_count, self._k_queues], args=args),
            self._timeout if budget is None else budget, action)

    def _split(self, deliveries: Sequence[Delivery]) -> Tuple[List[Delivery], List[Delivery]]:
        if not self.celery_queues:
            return [], list(deliveries) if not isinstance(deliveries, list) else deliveries
        mine: List[Delivery] = [d for d in deliveries if isinstance(d, CeleryDelivery)]
        if not mine:
            return [], list(deliveries)
        return mine, [d for d in deliveries if not isinstance(d, CeleryDelivery)]

    def ack(self, deliveries: Sequence[Delivery]) -> None:
        mine, native = self._split(deliveries)
        if native:
            super().ack(native)
        if mine:
            try:
                self._settle("ack", mine, budget=min(self._timeout, 2.0))
            except Unreachable as exc:     # they come back when their lease runs out
                log.warning("acks of %d Celery message(s) not sent: %s", len(mine), exc)

    def renew(self, deliveries: Sequence[Delivery]) -> None:
        mine, native = self._split(deliveries)
        super().renew(native)
        if mine:
            self._settle("renew", mine, budget=min(self._timeout, self._lease / 3))

    def requeue(self, deliveries: Sequence[Delivery], started: bool = True) -> None:
        mine, native = self._split(deliveries)
        if native:
            super().requeue(native, started)
        if mine:
            self._settle("requeue" if started else "unstarted", mine)

    def dead_letter(self, delivery: Delivery, reason: str) -> None:
        if not isinstance(delivery, CeleryDelivery):
            return super().dead_letter(delivery, reason)
        if not self._settle("dead", [delivery], reason):
            log.warning("message %s not dead-lettered: no longer held by this worker "
                        "(its lease ran out)", delivery.message_id)

    def _restore_due(self) -> int:
        """Put back on their lists the unacked entries whose time came (a dead
        worker's, Celery's or greenq's, or an eta that is due), as kombu's
        ``restore_visible`` does, under its mutex."""
        ceil = time.time() - self.visibility_timeout
        due = self.client.zrangebyscore(UNACKED_INDEX, "-inf", ceil, start=0, num=RESTORE_BATCH)
        if not due:
            return 0
        lock = self.client.lock(UNACKED_MUTEX, timeout=MUTEX_SECONDS)
        if not lock.acquire(blocking=False):
            return 0
        restored = 0
        try:
            for tag in due:
                def one(pipe: Any, tag: Any = tag) -> Any:
                    return self._restore_one(pipe, tag, ceil)
                restored += cast(int, self.client.transaction(one, UNACKED, UNACKED_INDEX,
                                                              value_from_callable=True))
        finally:
            try:
                lock.release()
            except Exception:           # it expired: someone else may hold it now
                pass
        if restored:
            log.info("restored %d Celery message(s) whose lease or eta ran out", restored)
        return restored

    def _restore_one(self, pipe: Any, tag: Any, ceil: float) -> int:
        raw = pipe.hget(UNACKED, tag)
        score = pipe.zscore(UNACKED_INDEX, tag)
        name = tag.decode() if isinstance(tag, bytes) else str(tag)
        if score is None or score > ceil:      # acked or renewed meanwhile
            pipe.multi()
            return 0
        target: Optional[str] = None
        problem = ""
        payload: Any = None
        if raw:
            try:
                payload, exchange, routing_key = json.loads(raw)
                props = payload["properties"]
                queues = self._lookup(pipe, exchange, routing_key)
                if not queues:          # routed by a binding greenq cannot read: kombu restores it
                    pipe.multi()
                    return 0
                for where in (payload.get("headers"), props.get("delivery_info")):
                    if isinstance(where, dict):
                        where["redelivered"] = True
                priority = props.get("priority")
                priority = priority if isinstance(priority, int) and not isinstance(priority, bool) else 0
                target = list_key(queues[0], max(0, min(9, priority)))
            except Exception as exc:
                problem = f"unacked entry {name} could not be restored: {describe(exc)}"
        pipe.multi()
        pipe.zrem(UNACKED_INDEX, tag)
        pipe.hdel(UNACKED, tag)
        pipe.delete(self._k_held + name)
        if target is not None:
            pipe.rpush(target, json.dumps(payload))
        elif problem:
            pipe.xadd(self._k_dead, {"q": "", "p": 0, "m": name, "r": problem, "t": repr(time.time()), "b": raw})
        return 1

    @staticmethod
    def _lookup(pipe: Any, exchange: Any, routing_key: Any) -> List[str]:
        """kombu's routing on Redis: the default exchange routes to the queue
        named by the routing key; a direct one by its binding table."""
        if not isinstance(routing_key, str):
            raise ValueError("no routing key")
        if not exchange:
            return [routing_key]
        out = []
        for member in pipe.smembers(f"_kombu.binding.{exchange}"):
            key, _, queue = (member.decode() if isinstance(member, bytes) else member).split(SEP)
            if key == routing_key:
                out.append(queue)
        return out

    def next_due(self, queues: Sequence[str]) -> Optional[float]:
        mine, native = self._celery(queues)
        due = super().next_due(native) if native else None
        if mine:
            first = self._call(lambda: self.client.zrange(UNACKED_INDEX, 0, 0, withscores=True),
                               self._timeout, "next_due")
            if first:
                at = first[0][1] + self.visibility_timeout
                due = at if due is None else min(due, at)
        return due

    # -- administration -----------------------------------------------------------------
    def queue_stats(self, queues: Optional[Sequence[str]] = None) -> List[QueueStats]:
        if queues is None or not self.celery_queues:
            return super().queue_stats(queues)
        mine, native = self._celery(queues)
        stats = {s.name: s for s in super().queue_stats(native)} if native else {}
        if mine:
            stats.update({s.name: s for s in self._call(lambda: self._celery_stats(mine), self._timeout,
                                                       "queue_stats")})
        return [stats[q] for q in queues]

    def _celery_stats(self, queues: Sequence[str]) -> List[QueueStats]:
        pipe = self.client.pipeline(transaction=False)
        for q in queues:
            for key in list_keys(q):
                pipe.llen(key)
        pipe.hmget(self._k_dead_count, list(queues))
        replies = pipe.execute()
        out = {q: QueueStats(q, ready=sum(replies[i * 4:i * 4 + 4]), dead=int(replies[-1][i] or 0))
               for i, q in enumerate(queues)}
        if self.client.hlen(UNACKED):
            now = time.time()
            for _, raw in self.client.hscan_iter(UNACKED, count=1000):
                try:
                    payload, _, routing_key = json.loads(raw)
                    eta = payload["headers"].get("eta")
                except Exception:
                    continue
                if routing_key in out:
                    waiting = isinstance(eta, str) and protocol._iso_epoch("eta", eta) or 0
                    if waiting > now:
                        out[routing_key].delayed += 1
                    else:
                        out[routing_key].held += 1
        return [out[q] for q in queues]

    def dlq_requeue(self, dead_ids: Optional[Sequence[str]] = None) -> int:
        """Dead letters of Celery queues go back on their queue's list (the
        element as it was, a fresh delivery count); the others as greenq's."""
        if not self.celery_queues:
            return super().dlq_requeue(dead_ids)
        wanted = None if dead_ids is None else set(dead_ids)
        moved, rest = 0, []
        for dead in self.dlq_list(limit=10 ** 9, preview=1):
            if wanted is not None and dead.id not in wanted:
                continue
            if dead.queue not in self.celery_queues:
                rest.append(dead.id)
                continue
            full = self.dlq_get(dead.id)
            if full is None:
                continue
            try:
                priority = json.loads(full.body)["properties"]["priority"]
                priority = priority if isinstance(priority, int) and not isinstance(priority, bool) else 0
            except Exception:
                priority = 0
            target = list_key(dead.queue, max(0, min(9, priority)))
            moved += self._call(lambda: self._celery_dlq_back(keys=[self._k_dead, self._k_dead_count],
                                                             args=[dead.id, target]), self._timeout, "dlq requeue")
        if rest:
            moved += super().dlq_requeue(rest)
        return moved

    def purge(self, queue: str) -> int:
        if queue not in self.celery_queues:
            return super().purge(queue)

        def run() -> int:
            pipe = self.client.pipeline(transaction=True)
            for key in list_keys(queue):
                pipe.llen(key)
            for key in list_keys(queue):
                pipe.delete(key)
            return sum(pipe.execute()[:4])
        return self._call(run, self._timeout, "purge")
