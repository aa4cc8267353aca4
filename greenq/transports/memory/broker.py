"""``memory://`` and ``memory://name``: an in-process broker for users' unit tests.

Every broker made for the same URL in one process shares one :class:`_Store`
(a module-level registry keyed by the name), so a client and an in-process
worker see the same queues.  Nothing survives the process.

Layout of a store, all guarded by ``store.lock`` (critical sections never
block or yield, so a plain lock is safe for threads and greenlets alike):

* ``queues[name]`` is a :class:`_Queue` holding its messages by sequence number
  (the delivery token; never reused) and three heaps:
  ``ready`` of ``(-priority, ready_since, seq)``, ``delayed`` of ``(eta, seq)``
  and ``leases`` of ``(lease_until, seq)``.  Heap entries are checked against
  the message when popped, so acking or renewing never has to search a heap.
* ``dead`` is the dead-letter store, oldest first.
* ``waiters`` are the events of blocked ``fetch`` calls; anything that makes a
  message ready sets them all.

Semantics match the SQLite broker: within a queue the highest priority goes
first, then the message ready longest (a requeued message goes to the front).
"""
from __future__ import annotations

import dataclasses
import heapq
import itertools
import threading
import time
import uuid
from typing import Dict, List, Optional, Sequence, Tuple

from .client import MAX_WAIT as _MAX_WAIT, Registry, store_name, waiter_event
from ...brokers.base import Broker, DeadLetter, Delivery, Outgoing, QueueStats

#: longest a blocked fetch sleeps before looking again, in case a wake-up from
#: another OS thread did not reach a green event
class _Message:
    __slots__ = ("seq", "queue", "body", "message_id", "priority", "eta", "deliveries",
                 "owner", "lease_until", "ready_since")

    def __init__(self, seq: int, queue: str, body: bytes, message_id: str, priority: int,
                 eta: float) -> None:
        self.seq = seq
        self.queue = queue
        self.body = body
        self.message_id = message_id
        self.priority = priority
        self.eta = eta
        self.deliveries = 0
        self.owner: Optional[str] = None   # consumer id while leased
        self.lease_until = 0.0
        self.ready_since = 0.0             # when it last became ready (queue_stats' oldest age)


class _Queue:
    def __init__(self) -> None:
        self.messages: Dict[int, _Message] = {}
        self.ready: List[tuple] = []
        self.delayed: List[tuple] = []
        self.leases: List[tuple] = []

    def make_ready(self, msg: _Message, since: float) -> None:
        msg.owner = None
        msg.lease_until = 0.0
        msg.ready_since = since
        heapq.heappush(self.ready, (-msg.priority, since, msg.seq))

    def add(self, msg: _Message, now: float) -> None:
        self.messages[msg.seq] = msg
        if msg.eta > now:
            heapq.heappush(self.delayed, (msg.eta, msg.seq))
        else:
            self.make_ready(msg, now)

    def refresh(self, now: float) -> None:
        """Make due delayed messages and expired leases ready."""
        delayed, leases, messages = self.delayed, self.leases, self.messages
        while delayed and delayed[0][0] <= now:
            eta, seq = heapq.heappop(delayed)
            msg = messages.get(seq)
            if msg is not None and msg.owner is None:
                self.make_ready(msg, eta)
        while leases and leases[0][0] <= now:
            lease_until, seq = heapq.heappop(leases)
            msg = messages.get(seq)
            if msg is not None and msg.owner is not None and msg.lease_until == lease_until:
                self.make_ready(msg, lease_until)

    def take(self, count: int, owner: str, lease_until: float) -> List[Delivery]:
        out: List[Delivery]
        ready, messages, out = self.ready, self.messages, []
        while ready and len(out) < count:
            seq = heapq.heappop(ready)[2]
            msg = messages.get(seq)
            if msg is None or msg.owner is not None:
                continue  # acked or dead-lettered meanwhile
            msg.owner = owner
            msg.lease_until = lease_until
            msg.deliveries += 1
            heapq.heappush(self.leases, (lease_until, seq))
            out.append(Delivery(msg.queue, msg.body, msg.message_id, msg.deliveries, seq,
                                msg.priority))
        return out

    def next_wake(self) -> Optional[float]:
        times = [h[0][0] for h in (self.delayed, self.leases) if h]
        return min(times) if times else None


class _Store:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.queues: Dict[str, _Queue] = {}
        self.dead: Dict[str, DeadLetter] = {}
        self.dead_priority: Dict[str, int] = {}
        self.waiters: set = set()
        self.seq = itertools.count(1)
        self.dead_seq = itertools.count(1)

    def queue(self, name: str) -> _Queue:
        q = self.queues.get(name)
        if q is None:
            q = self.queues[name] = _Queue()
        return q

    def wake(self) -> None:
        for event in self.waiters:
            event.set()
        self.waiters.clear()


_STORES = Registry(_Store)


def _priority(value: int) -> int:
    return min(9, max(0, int(value)))


#: what is stored of one message: queue, body, message id, priority (0-9), eta (0.0: none)
Write = Tuple[str, bytes, str, int, float]


def publish_calls(messages: Sequence[Outgoing]) -> List[Write]:
    """What ``publish_many`` stores of each message (its own copy of the body,
    the priority clamped to 0-9); the store gives each its sequence number."""
    return [(m.queue, bytes(m.body), m.message_id, _priority(m.priority), m.eta or 0.0) for m in messages]


class MemoryBroker(Broker):
    """In-process queues shared by every ``MemoryBroker`` of the same URL."""


    def __init__(self, url: str, config, driver=None) -> None:
        super().__init__(url, config, driver)
        self._store = _STORES.get(store_name(url, config.key_prefix))
        self._consumer = uuid.uuid4().hex
        self._interrupted = False

    # -- publishing ----------------------------------------------------------
    def publish_many(self, messages: Sequence[Outgoing]) -> None:
        store = self._store
        writes = publish_calls(messages)
        now = time.time()
        with store.lock:
            for queue, body, message_id, priority, eta in writes:
                store.queue(queue).add(_Message(next(store.seq), queue, body, message_id, priority, eta), now)
            store.wake()

    # -- consuming -----------------------------------------------------------
    def declare(self, queues: Sequence[str]) -> None:
        with self._store.lock:
            for name in queues:
                self._store.queue(name)

    def fetch(self, queues: Sequence[str], count: int, timeout: float, max_bytes: int = 0) -> List[Delivery]:
        """``max_bytes`` is not applied: the bodies already live in this
        process's memory, so holding them costs nothing more."""
        store = self._store
        deadline = time.monotonic() + timeout
        while True:
            now = time.time()
            with store.lock:
                out: List[Delivery] = []
                wake_at = None
                for name in queues:
                    q = store.queues.get(name)
                    if q is None:
                        continue
                    q.refresh(now)
                    if len(out) < count:
                        out.extend(q.take(count - len(out), self._consumer,
                                          now + self.config.lease_seconds))
                    at = q.next_wake()
                    if at is not None and (wake_at is None or at < wake_at):
                        wake_at = at
                left = deadline - time.monotonic()
                if out or left <= 0 or self._interrupted or count <= 0:
                    self._interrupted = False
                    return out
                event = waiter_event(self.driver)
                store.waiters.add(event)
            wait = min(left, _MAX_WAIT)
            if wake_at is not None:
                wait = min(wait, max(0.0, wake_at - now) + 0.001)
            event.wait(wait)
            with store.lock:
                store.waiters.discard(event)

    def interrupt(self) -> None:
        self._interrupted = True
        with self._store.lock:
            self._store.wake()

    def _held(self, q: Optional[_Queue], d: Delivery) -> Optional[_Message]:
        """The message of ``d`` if this consumer still holds it."""
        msg = q.messages.get(d.token) if q is not None else None
        if msg is not None and msg.owner == self._consumer:
            return msg
        return None

    def ack(self, deliveries: Sequence[Delivery]) -> None:
        store = self._store
        with store.lock:
            for d in deliveries:
                q = store.queues.get(d.queue)
                if q is not None:
                    q.messages.pop(d.token, None)

    def requeue(self, deliveries: Sequence[Delivery], started: bool = True) -> None:
        store = self._store
        with store.lock:
            for d in deliveries:
                q = store.queues.get(d.queue)
                msg = self._held(q, d)
                if msg is not None:
                    if not started:   # never began: this hand-out does not count
                        msg.deliveries = max(msg.deliveries - 1, 0)
                    q.make_ready(msg, 0.0)        # (first in line; ready since now)
                    msg.ready_since = time.time()
            store.wake()

    def renew(self, deliveries: Sequence[Delivery]) -> None:
        store = self._store
        lease_until = time.time() + self.config.lease_seconds
        with store.lock:
            for d in deliveries:
                q = store.queues.get(d.queue)
                msg = self._held(q, d)
                if msg is not None:
                    msg.lease_until = lease_until
                    heapq.heappush(q.leases, (lease_until, msg.seq))

    def dead_letter(self, delivery: Delivery, reason: str) -> None:
        store = self._store
        with store.lock:
            q = store.queues.get(delivery.queue)
            msg = q.messages.pop(delivery.token, None) if q is not None else None
            if msg is None:
                return  # already acked or dead-lettered
            dead_id = str(next(store.dead_seq))
            store.dead[dead_id] = DeadLetter(dead_id, msg.queue, msg.body, reason, msg.message_id)
            store.dead_priority[dead_id] = msg.priority

    def next_due(self, queues: Sequence[str]) -> Optional[float]:
        store = self._store
        now = time.time()
        with store.lock:
            etas = [msg.eta for name in queues if name in store.queues
                    for msg in store.queues[name].messages.values()
                    if msg.owner is None and msg.eta > now]
        return min(etas) if etas else None

    # -- administration ------------------------------------------------------
    def queue_stats(self, queues: Optional[Sequence[str]] = None) -> List[QueueStats]:
        store = self._store
        now = time.time()
        with store.lock:
            names = list(queues) if queues is not None else sorted(
                set(store.queues) | {d.queue for d in store.dead.values()})
            stats = {name: QueueStats(name) for name in names}
            for name in names:
                q = store.queues.get(name)
                oldest = now
                for msg in (q.messages.values() if q is not None else ()):
                    if msg.owner is not None and msg.lease_until > now:
                        stats[name].held += 1
                    elif msg.owner is None and msg.eta > now:
                        stats[name].delayed += 1
                    else:
                        stats[name].ready += 1
                        # not made ready yet: a due eta or a lease run out, since then
                        since = (msg.lease_until if msg.owner is not None else
                                 msg.ready_since if msg.ready_since else msg.eta)
                        oldest = min(oldest, since)
                stats[name].oldest_ready_age = max(0.0, now - oldest) if stats[name].ready else 0.0
            for dead in store.dead.values():
                if dead.queue in stats:
                    stats[dead.queue].dead += 1
        return [stats[name] for name in names]

    def purge(self, queue: str) -> int:
        store = self._store
        now = time.time()
        with store.lock:
            q = store.queues.get(queue)
            if q is None:
                return 0
            gone = [seq for seq, msg in q.messages.items()
                    if not (msg.owner is not None and msg.lease_until > now)]
            for seq in gone:
                del q.messages[seq]
            q.ready.clear()
            q.delayed.clear()
            return len(gone)

    def dlq_list(self, limit: int = 100, preview: Optional[int] = None) -> List[DeadLetter]:
        with self._store.lock:
            letters = list(itertools.islice(self._store.dead.values(), limit))
        if preview is None:
            return letters
        return [dataclasses.replace(d, body=d.body[:preview]) for d in letters]

    def dlq_get(self, dead_id: str) -> Optional[DeadLetter]:
        with self._store.lock:
            return self._store.dead.get(str(dead_id))

    def dlq_requeue(self, dead_ids: Optional[Sequence[str]] = None) -> int:
        store = self._store
        now = time.time()
        with store.lock:
            ids = list(store.dead) if dead_ids is None else [str(i) for i in dead_ids]
            moved = 0
            for dead_id in ids:
                dead = store.dead.pop(dead_id, None)
                if dead is None:
                    continue
                priority = store.dead_priority.pop(dead_id, 0)
                msg = _Message(next(store.seq), dead.queue, dead.body, dead.message_id, priority, 0.0)
                store.queue(dead.queue).add(msg, now)
                moved += 1
            store.wake()
        return moved

    def dlq_purge(self) -> int:
        with self._store.lock:
            n = len(self._store.dead)
            self._store.dead.clear()
            self._store.dead_priority.clear()
        return n

    def reset(self) -> None:
        """Forget every queue and dead letter of this URL (between users' tests)."""
        store = self._store
        with store.lock:
            store.queues.clear()
            store.dead.clear()
            store.dead_priority.clear()
            store.wake()
