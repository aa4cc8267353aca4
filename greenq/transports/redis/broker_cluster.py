"""``redis+cluster://host:port[,host:port…]``: the Redis broker on a Redis Cluster.

Key layout (``P`` is ``[greenq] key_prefix``; ``{...}`` is the hash tag, so
every key of one queue lives in one slot, on one master, and different queues
spread over the masters)::

    {P:<queue>}:q:<0-9>      the queue's streams (as P:q:<queue>:<0-9> on redis://)
    {P:<queue>}:delayed      its delayed messages
    {P:<queue>}:dead         its dead letters; dead letter ids are "<queue>/<entry id>"
    {P:<queue>}:dead:count   hash queue -> number of its dead letters
    {P:<queue>}:dead:queue   set holding the queue's name (the dead-letter script
                             registers the queue in a key of its own slot)
    P:queues                 every queue name seen (its own slot)

The scripts of :mod:`greenq.transports.redis.lua` run unchanged, one queue per
call.  Fetching runs one *lane* per queue (a greenlet under a green driver, a
thread otherwise): each lane does the plain broker's move-delayed / reclaim /
read / block cycle for its queue on its own master, and what it leases lands
in the shared spares that ``fetch`` hands out.  A slow or failing master
stalls only the lanes of its own queues; the cost is that a fetch may lease
up to ``count`` messages per queue (the extra ones wait, renewed, in the
spares), and that the order between queues on different masters is not kept.

During a failover the round trips to the dead master's slots fail and are
retried with backoff until the cluster has promoted its replica (about twice
``cluster-node-timeout``); redis-py refreshes its slot map on each failure.
Set ``cluster-require-full-coverage no`` on the servers so the other masters
keep serving meanwhile.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import redis

from .topology import CLUSTER_TRANSIENT, make_cluster_client
from ...config import Config
from ...exceptions import BrokerError
from ...brokers.base import DeadLetter, Delivery, Outgoing, QueueStats
from ...reconnect import Unreachable
from . import lua
from .client import TRANSIENT
from .broker import (GROUP, PARKED, PUBLISH_CHUNK, REPLICATED, SCRIPT_BATCH_MAX, RedisBroker, ScriptCall,
                     _STREAM_ID, _text, add_publish_args, budget_left, new_nonce, stats_row)

log = logging.getLogger("greenq.transports.redis.broker_cluster")

#: errors that keep an ack for later (a master away, a slot moving)
ACK_RETRIED = CLUSTER_TRANSIENT + (redis.exceptions.MovedError, redis.exceptions.AskError)
LANE_GRACE = 2.0      # seconds stop_consuming/close wait for the lanes' last reads


def publish_calls(messages: Sequence[Outgoing], streams: Callable[[str], List[str]],
                  delayed: Callable[[str], str], now: float,
                  nonce: Callable[[], bytes] = new_nonce) -> List[ScriptCall]:
    """The PUBLISH script calls (KEYS, ARGV) that write ``messages`` on a
    cluster: one per queue (and per PUBLISH_CHUNK), so each call's keys are in
    the queue's slot.  KEYS[1] is the queue's first stream (in the slot, and
    unused: no queue is registered by the script, n = 0).  No I/O."""
    by_queue: Dict[str, List[Outgoing]] = {}
    for m in messages:
        by_queue.setdefault(m.queue, []).append(m)
    calls: List[ScriptCall] = []
    for queue, batch in by_queue.items():
        first = streams(queue)[0]
        for start in range(0, len(batch), PUBLISH_CHUNK):
            index: Dict[str, int] = {}
            args: List[Any] = [0]
            for m in batch[start:start + PUBLISH_CHUNK]:
                add_publish_args(args, index, m, now, streams, delayed, nonce)
            calls.append(([first, *index], args))
    return calls


class RedisClusterBroker(RedisBroker):
    """RedisBroker with one hash slot per queue and one fetch lane per queue."""

    client_factory = staticmethod(make_cluster_client)
    client: Any   # a LazyCluster, not a redis.Redis: it forwards redis.RedisCluster's calls (keyslot, nodes_manager...)

    def __init__(self, url: str, config: Config, driver: Any = None) -> None:
        super().__init__(url, config, driver)
        self.reconnector.transient = CLUSTER_TRANSIENT
        self._dlq_back_script = self.client.register_script(lua.DLQ_BACK)
        self._busy: set = set()                          # queues whose lane is running
        self._lanes: List[Any] = []                      # their handles
        self._reclaim_at: Dict[str, float] = {}
        self._lane_error: Optional[BaseException] = None
        self._arrived = threading.Event() if driver is None else driver.event()

    # -- keys --------------------------------------------------------------------
    def _tag(self, queue: str) -> str:
        return f"{{{self.prefix}:{queue}}}"

    def _stream_key(self, queue: str, priority: int) -> str:
        return f"{self._tag(queue)}:q:{priority}"

    def _delayed(self, queue: str) -> str:
        return f"{self._tag(queue)}:delayed"

    def _dead_keys(self, queue: str) -> List[str]:
        """Dead stream, dead counts hash, and the in-slot registry the shared
        dead-letter script writes to."""
        tag = self._tag(queue)
        return [f"{tag}:dead", f"{tag}:dead:count", f"{tag}:dead:queue"]

    # -- publishing ----------------------------------------------------------------
    def publish_many(self, messages: Sequence[Outgoing]) -> None:
        """One PUBLISH script call per queue (and per chunk), all pipelined; the
        registry is written apart, as it lives in a slot of its own."""
        if not messages:
            return
        new_queues = sorted({m.queue for m in messages} - self._registered)
        calls = publish_calls(messages, self.streams, self._delayed, time.time())
        self._call(lambda: self._run_script(self._publish_script, calls), self._timeout, "publish")
        if new_queues:
            self._register(new_queues)

    def _run_script(self, script: Any, calls: List[Tuple[list, list]], what: str = "publish") -> List[Any]:
        """Several calls of one script (each on the keys of one slot), one
        pipelined round trip per master (a cluster pipeline refuses EVALSHA);
        with ``min_replicas``, each master's batch ends in WAIT."""
        if len(calls) == 1 and not (self._min_replicas and what in REPLICATED):
            return [script(keys=calls[0][0], args=calls[0][1])]
        commands = [("EVALSHA", script.sha, len(keys), *keys, *args) for keys, args in calls]
        try:
            return self._per_master(commands, what)
        except redis.exceptions.NoScriptError:     # a promoted replica, a restart: load, retry once
            self.client.script_load(script.script)
            return self._per_master(commands, what)

    def ack(self, deliveries: Sequence[Delivery]) -> None:
        """One pipelined round trip per master, tried once: the acks of a
        master that fails are kept (renewed with the held messages) and sent
        by a later fetch, so a dead master never holds up the others' acks."""
        if not deliveries:
            return
        with self._lock:
            batch, self._unacked = self._unacked + list(deliveries), []
        failed = self._ack_by_master(batch)
        if failed:
            with self._lock:
                self._unacked[:0] = failed

    def _flush_unacked(self) -> None:
        with self._lock:
            pending, self._unacked = self._unacked, []
        failed = self._ack_by_master(pending)
        if failed:
            with self._lock:
                self._unacked[:0] = failed
        elif pending:
            log.info("sent %d ack(s) kept while a master was away", len(pending))

    def _ack_by_master(self, deliveries: List[Delivery]) -> List[Delivery]:
        """Send ``deliveries``' acks per master; return those that failed."""
        groups: Dict[str, List[Delivery]] = {}
        for d in deliveries:
            slot = self.client.keyslot(d.token[0])
            groups.setdefault(self.client.nodes_manager.get_node_from_slot(slot).name, []).append(d)
        failed: List[Delivery] = []
        for name, group in groups.items():
            try:
                self._send_acks(group)
            except ACK_RETRIED as exc:
                if not failed:
                    log.warning("acks kept until %s is back: %s", name, exc)
                failed += group
                self._refresh_slots()
        return failed

    def _send_acks(self, deliveries: List[Delivery]) -> None:
        """The ACK script once per stream (a call spans one slot)."""
        self._run_script(self._ack_script, [(keys, [GROUP, self.consumer, *ids])
                                            for keys, ids in _per_key(deliveries)], "ack")

    def _transfer(self, deliveries: Sequence[Delivery], target: str, budget: float, what: str,
                  uncount: bool = False) -> int:
        """TRANSFER once per stream, one round trip per master."""
        calls = [(keys, [GROUP, self.consumer, target, "1" if uncount else "0", *ids])
                 for keys, ids in _per_key(deliveries)]
        return sum(self._call(lambda: self._run_script(self._transfer_script, calls, what), budget, what))

    def _per_master(self, commands: List[tuple], what: str) -> List[Any]:
        """Run ``commands`` in one pipeline per master (ending in WAIT when
        ``[redis] min_replicas`` is set); replies in the commands' order."""
        n = self._min_replicas if what in REPLICATED else 0
        by_node: Dict[str, List[int]] = {}
        nodes: Dict[str, Any] = {}
        for i, args in enumerate(commands):
            node = self.client.nodes_manager.get_node_from_slot(self.client.determine_slot(*args))
            nodes[node.name] = node
            by_node.setdefault(node.name, []).append(i)
        replies: List[Any] = [None] * len(commands)
        short = []
        for name, positions in by_node.items():
            node_pipe = nodes[name].redis_connection.pipeline(transaction=False)
            for i in positions:
                node_pipe.execute_command(*commands[i])
            if n:
                node_pipe.execute_command("WAIT", n, int(self._timeout * 500))
            try:
                got = node_pipe.execute()
            except (redis.exceptions.MovedError, redis.exceptions.AskError, *TRANSIENT) as exc:
                self._refresh_slots()                   # a failover moved the slot: retry
                raise redis.ConnectionError(f"{name}: {exc}") from None
            if n:
                *got, acked = got
                if acked < n:
                    short.append(f"{name}: {acked}")
            for i, value in zip(positions, got):
                replies[i] = value
        if short:
            text = f"{what}: fewer than [redis] min_replicas = {n} replica(s) confirmed ({', '.join(short)})"
            if what == "publish":
                raise BrokerError(text)
            log.warning("%s", text)
        return replies

    def _refresh_slots(self) -> None:
        try:
            self.client.nodes_manager.initialize()
        except Exception as exc:  # the next round trip fails and retries
            log.debug("slot map refresh failed: %s", exc)

    # -- consuming ---------------------------------------------------------------------
    def _declare(self, queues: Sequence[str]) -> None:
        for q in queues:
            streams = self.streams(q)
            self._declare_script(keys=[streams[0], *streams], args=[GROUP])   # no in-script SADD
        self._declared.update(queues)
        self._register(queues)

    def _register(self, queues: Sequence[str]) -> None:
        """Add ``queues`` to the registry, best effort: it lives on one master,
        and while that master is away publishing and consuming go on (the
        queues are registered by a later publish or declare)."""
        try:
            self.client.sadd(self._k_queues, *queues)
        except ACK_RETRIED as exc:
            log.debug("queue registry not written (%s); later", exc)
            return
        self._registered.update(queues)

    def fetch(self, queues: Sequence[str], count: int, timeout: float, max_bytes: int = 0) -> List[Delivery]:
        """Start the lane of every queue that has none running, then hand out
        what the first lanes bring; see the module docstring.  Each lane reads
        at most ``max_bytes``; oversized entries come as previews as on the
        plain broker."""
        if count <= 0 or not queues or not self._consuming:
            return []
        count = min(count, SCRIPT_BATCH_MAX)
        out = self._take_spares(count)
        if out:
            return out
        deadline = time.monotonic() + max(0.0, timeout)
        interrupts = self._interrupts
        if self._unacked:
            self._flush_unacked()
        with self._lock:
            idle = [q for q in queues if q not in self._busy]
            self._busy.update(idle)
            self._lanes = [h for h in self._lanes if not _finished(h)]
        for q in idle:
            self._lanes.append(self._spawn(self._lane, q, count, deadline, max_bytes))
        while True:
            out = self._take_spares(count)
            if out:
                return out
            error, self._lane_error = self._lane_error, None
            if error is not None:
                raise error
            with self._lock:
                running = not self._busy.isdisjoint(queues)
            now = time.monotonic()
            if not running or now >= deadline or self._interrupts != interrupts:
                return []
            self._arrived.wait(min(deadline - now, 0.5))
            self._arrived.clear()

    def _spawn(self, fn: Any, *args: Any) -> Any:
        if self.driver is not None:
            return self.driver.spawn(fn, *args)
        thread = threading.Thread(target=fn, args=args, name="greenq-redis-lane", daemon=True)
        thread.start()
        return thread

    def _lane(self, queue: str, count: int, deadline: float, max_bytes: int = 0) -> None:
        got: List[Delivery] = []
        try:
            got = self.reconnector.call(lambda: self._lane_once(queue, count, deadline, max_bytes),
                                        deadline, "fetch")
        except Unreachable:
            pass
        except Exception as exc:  # raised by the next fetch, in the consumer
            self._lane_error = exc
        finally:
            with self._lock:
                self._spares.extend(got)
                self._busy.discard(queue)
            self._arrived.set()

    def _lane_once(self, queue: str, count: int, deadline: float, max_bytes: int = 0) -> List[Delivery]:
        """The plain broker's fetch cycle for one queue (one slot)."""
        if queue not in self._declared:
            self._declare([queue])
        out: List[Delivery] = []
        if time.monotonic() >= self._reclaim_at.get(queue, 0.0):
            out = self._reclaim([queue], count)
            self._reclaim_at[queue] = self._next_reclaim
        due: Optional[float] = None
        budget = budget_left(max_bytes, out)
        if len(out) < count and budget is not None:
            try:
                out += self._read([queue], count - len(out), budget)
                due = self._next_due
            except Exception:
                with self._lock:
                    self._spares.extend(out)
                raise
        if out or not self._consuming:
            return out
        now = time.monotonic()
        wait = min(deadline - now, self._block, self._reclaim_at[queue] - now)
        if due is not None:
            wait = min(wait, due - time.time())
        if wait <= 0.001:
            return []
        return self._block_read([queue], count, wait, max_bytes)

    def _join_lanes(self) -> None:
        end = time.monotonic() + self._block + LANE_GRACE
        for handle in list(self._lanes):
            handle.join(max(0.0, end - time.monotonic()))
        self._lanes = []

    def stop_consuming(self) -> None:
        """No lane starts after this; the running ones end within a blocking
        read, then everything leased and not handed out is parked (as on
        redis://, with the delivery count unchanged)."""
        self._consuming = False
        self.interrupt()
        self._join_lanes()
        super().stop_consuming()

    def dead_letter(self, delivery: Delivery, reason: str) -> None:
        """As on redis://, into the queue's own dead letters (its slot)."""
        key, entry_id = delivery.token
        moved = self._call(lambda: self._dead_script(
            keys=[key, *self._dead_keys(delivery.queue)],
            args=[GROUP, entry_id, delivery.queue, delivery.priority, delivery.message_id,
                  reason, repr(time.time()), delivery.body, self.consumer]), self._timeout, "dead-letter")
        if not moved:
            log.warning("message %s not dead-lettered: no longer held by this worker "
                        "(its lease ran out)", delivery.message_id)

    # -- administration --------------------------------------------------------------
    def _known_queues(self) -> List[str]:
        names = self._call(lambda: self.client.smembers(self._k_queues), self._timeout, "queue_stats")
        return sorted(_text(n) for n in names)

    def queue_stats(self, queues: Optional[Sequence[str]] = None) -> List[QueueStats]:
        if queues is None:
            queues = self._known_queues()
        stats = []
        for q in queues:
            keys = self.streams(q) + [self._delayed(q), self._dead_keys(q)[1]]
            flat = self._call(lambda: self._stats_script(keys=keys, args=[GROUP, PARKED, repr(time.time()), q]),
                              self._timeout, "queue_stats")
            stats.append(stats_row(q, flat[:5]))
        return stats

    def _dead_letters(self, queue: str, start: str, end: str, limit: Optional[int],
                      preview: Optional[int] = None) -> List[DeadLetter]:
        if end == "+":
            entries = self._dead_entries(self._dead_keys(queue)[0], start, limit, preview)
        else:
            entries = self._call(lambda: self.client.xrange(self._dead_keys(queue)[0], start, end, count=limit),
                                 self._timeout, "dlq list")
        out = []
        for entry_id, fields in entries:
            dead = self._dead_letter_of(entry_id, fields)
            dead.id = f"{queue}/{dead.id}"
            out.append(dead)
        return out

    def dlq_list(self, limit: int = 100, preview: Optional[int] = None) -> List[DeadLetter]:
        merged: List[DeadLetter] = []
        for q in self._known_queues():
            merged += self._dead_letters(q, "-", "+", limit, preview)
        merged.sort(key=lambda d: tuple(int(x) for x in d.id.rpartition("/")[2].split("-")))
        return merged[:limit]

    def dlq_get(self, dead_id: str) -> Optional[DeadLetter]:
        queue, _, entry = dead_id.rpartition("/")
        if not queue or not _STREAM_ID.match(entry):
            return None
        found = self._dead_letters(queue, entry, entry, None)
        return found[0] if found else None

    def dlq_requeue(self, dead_ids: Optional[Sequence[str]] = None) -> int:
        by_queue: Dict[str, List[str]] = {}
        if dead_ids is None:
            by_queue = {q: [] for q in self._known_queues()}
        else:
            for dead_id in dead_ids:
                queue, _, entry = dead_id.rpartition("/")
                if queue and _STREAM_ID.match(entry):
                    by_queue.setdefault(queue, []).append(entry)
        moved = 0
        for queue, ids in by_queue.items():
            keys = self._dead_keys(queue)[:2] + self.streams(queue)
            for start in range(0, max(1, len(ids)), 500):
                chunk = ids[start:start + 500]
                while True:
                    n = self._call(lambda: self._dlq_back_script(keys=keys, args=[queue, *chunk]),
                                   self._timeout, "dlq requeue")
                    moved += n
                    if chunk or n < 500:
                        break
        return moved

    def dlq_purge(self) -> int:
        total = 0
        for q in self._known_queues():
            dead, counts, _ = self._dead_keys(q)

            def purge() -> int:
                pipe = self.client.pipeline(transaction=False)
                pipe.xlen(dead)
                pipe.delete(dead)
                pipe.delete(counts)
                return pipe.execute()[0]
            total += self._call(purge, self._timeout, "dlq purge")
        return total


def _finished(handle: Any) -> bool:
    dead = getattr(handle, "dead", None)
    if dead is not None:
        return bool(dead() if callable(dead) else dead)
    return not handle.is_alive()


def _per_key(deliveries: Sequence[Delivery]) -> List[Tuple[List[str], List[Any]]]:
    """Tokens as script calls on one stream each (ACK and TRANSFER layout:
    the key, then ``n, n entry ids``), at most SCRIPT_BATCH_MAX ids a call."""
    by_key: Dict[str, List[bytes]] = {}
    for d in deliveries:
        by_key.setdefault(d.token[0], []).append(d.token[1])
    return [([key], [len(ids[i:i + SCRIPT_BATCH_MAX]), *ids[i:i + SCRIPT_BATCH_MAX]])
            for key, ids in by_key.items() for i in range(0, len(ids), SCRIPT_BATCH_MAX)]
