"""``redis://`` and ``rediss://``: Redis Streams with one consumer group.

Key layout (``P`` is ``[greenq] key_prefix``; two apps with different
prefixes share one Redis database without seeing each other)::

    P:q:<queue>:<0-9>   stream, one per queue and priority; entry fields
                        b=body, m=message id (or b=member, e=reason: a
                        malformed delayed member); consumer group "greenq"
    P:delayed:<queue>   sorted set of delayed messages, score = eta (epoch s),
                        member = <8 random chars><priority><len(id)>:<id><body>
    P:queues            set of every queue name seen (queue_stats, dlq)
    P:dead              stream of dead letters: q=queue p=priority m=message id
                        r=reason t=failed at b=body
    P:dead:count        hash queue -> number of its dead letters

(The result backend adds P:result:<id>, P:waiters:<id>, P:revoked:<id> and
the pub/sub channels P:reply:<random>; see greenq/transports/redis/results.py.)

Delivery: ``fetch`` runs one Lua script (``lua.FETCH``, scripts/fetch.lua) that moves due
delayed messages into their streams, then for each queue in order and each
priority from 9 down takes first the requeued entries (parked on the consumer
``~requeued``, so a requeued message keeps its place: it goes before newer
ones) and then new ones with XREADGROUP, until ``count``.  When nothing is
ready it blocks in one XREADGROUP BLOCK over every stream, for at most a second
(less than ``socket_timeout``, and no later than the next delayed eta).

A held message is an entry in the group's pending list, owned by this broker
instance's consumer (``host:pid:random``); its lease is the entry's idle time.
``renew`` re-claims owned entries to the owner (XCLAIM JUSTID resets the idle
time without counting a delivery); every lease/4 a fetch also claims entries
idle for longer than ``lease_seconds`` from any consumer (a dead worker's), and
forgets consumers idle for an hour with nothing pending.  Delivery counts are
the pending list's own (XREADGROUP: 1, each claim: +1).  ``ack`` is XACK+XDEL
of a whole batch in one script call.  ``requeue`` parks entries on
``~requeued`` without counting a delivery; the next hand-out counts one
(``started=False``: the count is lowered by one as the entry is parked).
``ack``, ``requeue``, ``renew`` and ``dead_letter`` act only on entries this
instance still owns: a stale holder (its lease ran out, another consumer
claimed the entry) changes nothing.

Sizes: an entry longer than ``body_limit`` (its field values together) is
never read whole by a script: FETCH and RECLAIM return its first
``PREVIEW_BYTES`` and its size, and the worker dead-letters it with that
preview.  FETCH also stops at the worker's byte budget (``max_bytes``).  The
one exception is the blocking read, which cannot look before it reads: it
takes one entry per stream (COUNT 1), checks its size here, and hands it
out at once; the next fetch's script reads the rest of the batch.

Every entry read is checked by ``entry_delivery``: a bad one (fields missing,
repeated or unknown, a message id that is not UTF-8) becomes a Delivery with
``error`` set, which the worker dead-letters; its neighbours are unaffected.

Every round trip goes through one reconnect state machine
(``greenq.reconnect.Reconnector``); see docs/brokers.md (Redis) for what each method
does while Redis is away.  Connections and their pool: ``greenq.transports.redis.client``.  Until
``declare`` (a client) the pool is small and a publish gives up after
``[redis] connect_timeout``; ``declare`` (a worker) grows the pool and makes
publishes patient.  Redis Cluster is not supported (scripts touch the
keys of several queues).
"""
from __future__ import annotations

import logging
import os
import re
import secrets
import socket
import threading
import time
import uuid
from collections import deque
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence, Tuple, cast

import redis

from ...config import Config, mask_url
from ...exceptions import BrokerError
from . import lua as lua
from . import resp
from .client import FAILURES, TRANSIENT, Pool, make_client, refused, worker_pool_size
from ...reconnect import Reconnecting, Reconnector, Unreachable
from ...brokers.base import PREVIEW_BYTES, Broker, DeadLetter, Delivery, Outgoing, QueueStats, body_limit

log = logging.getLogger("greenq.transports.redis.broker")

GROUP = "greenq"
PARKED = "~requeued"              # consumer owning requeued entries until fetched again
PRIORITIES = tuple(range(9, -1, -1))
BLOCK_CAP = 1.0                   # longest blocking read, seconds
SCRIPT_BATCH_MAX = 4000           # entries per script call (Lua's unpack limit is ~8000)
PUBLISH_CHUNK = 1000              # messages per publish script call (several per round trip)
MOVE_PER_FETCH = 500              # most delayed messages moved per queue per fetch
FORGET_CONSUMERS_MS = 3600 * 1000
REPLICATED = ("publish", "ack")   # what waits for [redis] min_replicas replicas
_STREAM_ID = re.compile(r"^\d+-\d+$")


def stats_row(queue: str, values: Sequence[Any]) -> QueueStats:
    """One queue's figures from the five STATS gives (the age in ms)."""
    ready, delayed, held, dead, age_ms = (int(v) for v in values)
    return QueueStats(queue, ready, delayed, held, dead, oldest_ready_age=age_ms / 1000.0 if ready else 0.0)


def block_seconds(config: Config) -> float:
    """Longest blocking read: under a second and under half the socket timeout."""
    timeout = config.section("redis")["socket_timeout"]
    return min(BLOCK_CAP, timeout / 2) if timeout else BLOCK_CAP


def _text(value: Any) -> str:
    """Text of a reply value; bytes that are not UTF-8 are shown escaped."""
    return value.decode("utf-8", "backslashreplace") if isinstance(value, bytes) else str(value)


def entry_delivery(queue: str, prio: int, stream: str, entry_id: bytes, body: Any, mid: Any,
                   deliveries: int) -> Delivery:
    """The one place where a stream entry's fields are checked.  A good entry
    has exactly the fields ``b`` (bytes) and ``m`` (UTF-8); any other shape
    (a missing, repeated or unknown field, a message id that is not UTF-8, an
    entry made from a malformed delayed member) gives a Delivery with
    ``error`` set: the worker dead-letters it through its token, and the
    entries fetched beside it are delivered as usual.

    An entry of the shape greenq writes (``b``, then ``m``) comes split: its
    body and message id (bytes).  Any other entry comes whole: its field list
    in ``body``, and ``mid`` not bytes (the scripts send 0)."""
    token = (stream, entry_id)
    if isinstance(mid, bytes):
        try:
            return Delivery(queue, body, mid.decode(), deliveries, token, prio)
        except UnicodeDecodeError as exc:
            return Delivery(queue, body, _text(mid), deliveries, token, prio,
                            error=f"message id field 'm' is not UTF-8: {exc}")
    fields, seen, error = body, {}, None
    if not isinstance(fields, (list, tuple)) or len(fields) % 2:
        error, fields = "stream entry is not a list of field/value pairs", ()
    for name, value in zip(fields[::2], fields[1::2]):
        if not isinstance(name, bytes) or not isinstance(value, bytes):
            error = "stream entry field of a bad type"
        elif name in seen:
            error = f"stream entry field {_text(name)!r} appears twice"
        elif name not in (b"b", b"m", b"e"):
            error = f"unknown stream entry field {_text(name)!r}"
        else:
            seen[name] = value
            continue
        break
    body, mid = seen.get(b"b", b""), seen.get(b"m")
    if error is None:
        if b"e" in seen:
            error = f"broker: {_text(seen[b'e'])}"
        elif b"b" not in seen:
            error = "stream entry has no body field 'b'"
        elif mid is None:
            error = "stream entry has no message id field 'm'"
        else:                               # the fields in another order: fine
            return entry_delivery(queue, prio, stream, entry_id, body, mid, deliveries)
    return Delivery(queue, body, _text(mid) if mid is not None else _text(entry_id),
                    deliveries, token, prio, error=error)


def split_fields(fields: Any) -> Tuple[Any, Any]:
    """(body, message id) of an entry of the usual shape, else (fields, 0):
    the arguments of entry_delivery, as the scripts produce them."""
    if isinstance(fields, list) and len(fields) == 4 and fields[0] == b"b" and fields[2] == b"m":
        return fields[1], fields[3]
    return fields, 0


def budget_left(max_bytes: int, taken: Sequence[Delivery]) -> Optional[int]:
    """What a further read may take of a fetch's ``max_bytes`` once ``taken``
    are in: 0 for no limit, None when the budget is spent (read nothing)."""
    if not max_bytes:
        return 0
    left = max_bytes - sum(len(d.body) for d in taken)
    return left if left > 0 else None


def _per_stream(deliveries: Sequence[Delivery]) -> List[Tuple[List[str], List[Any]]]:
    """Tokens as script calls of at most SCRIPT_BATCH_MAX ids each: (stream keys,
    then per key ``n, n entry ids``), the argument layout of ACK and TRANSFER."""
    by_key: Dict[str, List[bytes]] = {}
    for d in deliveries:
        by_key.setdefault(d.token[0], []).append(d.token[1])
    calls: List[Tuple[List[str], List[Any]]] = []
    size = SCRIPT_BATCH_MAX
    for key, ids in by_key.items():
        for start in range(0, len(ids), SCRIPT_BATCH_MAX):
            chunk = ids[start:start + SCRIPT_BATCH_MAX]
            if size + len(chunk) > SCRIPT_BATCH_MAX:
                calls.append(([], []))
                size = 0
            calls[-1][0].append(key)
            calls[-1][1].extend([len(chunk), *chunk])
            size += len(chunk)
    return calls


#: one call of a script: (KEYS, ARGV)
ScriptCall = Tuple[List[str], List[Any]]


def new_nonce() -> bytes:
    """The 8 random characters that open a delayed member (two equal
    messages with one eta stay two members of the sorted set)."""
    return secrets.token_hex(4).encode()


def delayed_member(m: Outgoing, prio: int, nonce: bytes) -> bytes:
    """The sorted-set member of a delayed message: ``<nonce><priority><len(id)>:<id><body>``."""
    mid = m.message_id.encode()
    return b"%s%d%d:%s%s" % (nonce, prio, len(mid), mid, m.body)


def xadd_command(m: Outgoing, streams: Callable[[str], List[str]]) -> Tuple[Any, ...]:
    """The XADD of a message that is ready now (``publish``'s one round trip);
    ``streams(queue)`` gives the queue's ten streams, priority 9 first."""
    return ("XADD", streams(m.queue)[9 - min(9, max(0, int(m.priority)))], "*", "b", m.body, "m", m.message_id)


def add_publish_args(args: List[Any], index: Dict[str, int], m: Outgoing, now: float,
                     streams: Callable[[str], List[str]], delayed: Callable[[str], str],
                     nonce: Callable[[], bytes]) -> None:
    """Append the 4 PUBLISH arguments of ``m`` to ``args``: its key's index in
    KEYS (``index`` maps the keys taken so far, KEYS[1] being the registry),
    then '' (ready) or its eta, message id or delayed member, body or ''."""
    prio = min(9, max(0, int(m.priority)))
    if m.eta is not None and m.eta > now:
        key = delayed(m.queue)
        args += [index.setdefault(key, len(index) + 2), repr(m.eta), delayed_member(m, prio, nonce()), b""]
    else:
        key = streams(m.queue)[9 - prio]
        args += [index.setdefault(key, len(index) + 2), b"", m.message_id, m.body]


def publish_calls(messages: Sequence[Outgoing], streams: Callable[[str], List[str]],
                  delayed: Callable[[str], str], registry: str, new_queues: Sequence[str], now: float,
                  nonce: Callable[[], bytes] = new_nonce) -> List[ScriptCall]:
    """The PUBLISH script calls (KEYS, ARGV) that write ``messages``, at most
    PUBLISH_CHUNK messages each; the first also adds ``new_queues`` to the
    ``registry`` set.  A message whose eta is after ``now`` goes to its
    queue's ``delayed(queue)`` sorted set, any other to the stream of its
    priority in ``streams(queue)``.  No I/O: ``publish_many`` sends them."""
    calls: List[ScriptCall] = []
    for start in range(0, len(messages), PUBLISH_CHUNK):
        index: Dict[str, int] = {}
        args: List[Any] = [0]
        if start == 0 and new_queues:
            args = [len(new_queues), *new_queues]
        for m in messages[start:start + PUBLISH_CHUNK]:
            add_publish_args(args, index, m, now, streams, delayed, nonce)
        calls.append(([registry, *index], args))
    return calls


class RedisBroker(Reconnecting, Broker):
    """Redis Streams broker; the module docstring has the key layout."""

    #: builds the client from the URL (Sentinel and Cluster subclasses use their own)
    client_factory = staticmethod(make_client)

    def __init__(self, url: str, config: Config, driver: Any = None) -> None:
        super().__init__(url, config, driver)
        self.prefix = config.key_prefix
        self.consumer = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.client = self.client_factory(url, config, "")
        self._min_replicas = config.section("redis")["min_replicas"]
        self.pool = cast(Pool, self.client.connection_pool)  # the Pool make_client gave it (a cluster's: _AllNodePools, with its grow and disconnect)
        #: publish's XADD (and publish_many's script call) goes straight to a
        #: pooled connection, packed by ``resp`` (``_send_packed``): a plain
        #: client on greenq's Pool, encoding as ``resp`` does, only (not a
        #: cluster's or a sentinel's)
        kwargs = getattr(self.pool, "connection_kwargs", {})
        self._direct = type(self.client) is redis.Redis and type(self.pool) is Pool \
            and kwargs.get("encoding", "utf-8").lower().replace("-", "").replace("_", "") == "utf8" \
            and kwargs.get("encoding_errors", "strict") == "strict"
        self.reconnector = Reconnector(f"redis broker {mask_url(url)}", TRANSIENT,
                                       reset=self._reset, on_recovered=self._recovered,
                                       sleep=self._sleep, failures=FAILURES, refused=refused)
        self._lease = float(config.lease_seconds)
        self._timeout = config.section("redis")["socket_timeout"] or 30.0
        self._publish_budget = config.section("redis")["connect_timeout"] or self._timeout
        self._block = block_seconds(config)
        self._limit = body_limit(config)
        # XREADGROUP replies unparsed: redis-py would fold an entry's fields
        # into a dict, hiding a repeated field from entry_delivery
        self.client.set_response_callback("XREADGROUP", lambda reply, **_: reply)
        s = self.client.register_script
        self._publish_script = s(lua.PUBLISH)
        self._declare_script, self._fetch_script = s(lua.DECLARE), s(lua.FETCH)
        self._reclaim_script, self._transfer_script = s(lua.RECLAIM), s(lua.TRANSFER)
        self._dead_script, self._dlq_requeue_script = s(lua.DEAD_LETTER), s(lua.DLQ_REQUEUE)
        self._ack_script, self._dlq_preview_script = s(lua.ACK), s(lua.DLQ_PREVIEW)
        self._stats_script, self._purge_script = s(lua.STATS), s(lua.PURGE)
        self._k_queues = f"{self.prefix}:queues"
        self._k_dead = f"{self.prefix}:dead"
        self._k_dead_count = f"{self.prefix}:dead:count"
        self._lock = threading.Lock()
        self._streams: Dict[str, List[str]] = {}              # queue -> its streams, priority 9 first
        self._where: Dict[bytes, Tuple[str, int]] = {}         # stream key -> (queue, priority)
        self._declared: set = set()                           # queues whose groups exist
        self._registered: set = set()                         # queues known in P:queues
        self._spares: Deque[Delivery] = deque()               # leased, not yet handed out
        self._unacked: List[Delivery] = []                    # acks that failed; retried
        self._next_reclaim = 0.0
        self._next_due: Optional[float] = None                # earliest delayed eta seen
        self._reclaims = 0
        self._interrupts = 0
        self._consuming = True                                # False after stop_consuming()

    def _reset(self) -> None:
        # idle connections only: a connection in use fails by itself in its owner
        self.pool.disconnect(inuse_connections=False)

    def _recovered(self) -> None:
        # Redis may have restarted without its data: groups and the registry
        # are re-made lazily (declare on next fetch, SADD on next publish).
        self._declared.clear()
        self._registered.clear()

    # -- keys --------------------------------------------------------------------
    def streams(self, queue: str) -> List[str]:
        """The queue's ten stream keys, priority 9 first."""
        keys = self._streams.get(queue)
        if keys is None:
            keys = [self._stream_key(queue, p) for p in PRIORITIES]
            for key, prio in zip(keys, PRIORITIES):
                self._where[key.encode()] = (queue, prio)
            self._streams[queue] = keys
        return keys

    def _stream_key(self, queue: str, priority: int) -> str:
        """The stream of one priority of ``queue`` (Redis Cluster: with the queue's hash tag)."""
        return f"{self.prefix}:q:{queue}:{priority}"

    def _delayed(self, queue: str) -> str:
        return f"{self.prefix}:delayed:{queue}"

    # -- publishing ----------------------------------------------------------------
    def publish(self, message: Outgoing) -> None:
        """One round trip: a plain XADD in the common case."""
        m = message
        if m.queue not in self._registered or (m.eta is not None and m.eta > time.time()) \
                or self._min_replicas:
            return self.publish_many([m])
        if self._direct:
            data = resp.xadd(self.streams(m.queue)[9 - min(9, max(0, int(m.priority)))], m.body, m.message_id)
            if data is not None:
                self._call(lambda: self._send_packed(data), self._publish_budget, "publish")
                return
        command = xadd_command(m, self.streams)
        self._call(lambda: self.client.execute_command(*command), self._publish_budget, "publish")

    def _send_packed(self, data: bytes) -> Any:
        """One command, already in RESP (``resp``), sent on a pooled
        connection of a plain client and its reply read, without redis-py's
        per-command layers (retries, which are off; observability hooks;
        packing).  The connection's own ``send_packed_command`` and
        ``read_response`` do the I/O: the health check when due, a connection
        that fails disconnects itself, an error reply raises; the connection
        goes back to the pool either way."""
        pool = self.pool
        conn = pool.get_connection()
        try:
            conn.send_packed_command((data,))
            return conn.read_response()
        finally:
            pool.release(conn)

    def publish_many(self, messages: Sequence[Outgoing]) -> None:
        """One pipelined round trip (plus the registry the first time a queue is
        seen).  Retried through reconnects for up to ``socket_timeout`` seconds,
        then BrokerError; a retry after a lost reply may publish twice."""
        if not messages:
            return
        new_queues = sorted({m.queue for m in messages} - self._registered)
        calls = publish_calls(messages, self.streams, self._delayed, self._k_queues, new_queues, time.time())
        self._call(lambda: self._run_script(self._publish_script, calls), self._publish_budget, "publish")
        self._registered.update(new_queues)

    def _run_script(self, script: Any, calls: List[Tuple[list, list]], what: str = "publish") -> List[Any]:
        """Several calls of one script in one round trip (EVALSHA in a pipeline;
        after a restart flushed the script cache, loaded once and retried);
        ``what`` says how ``min_replicas`` treats them (see _replicated)."""
        if len(calls) == 1 and not (self._min_replicas and what in REPLICATED):
            keys, args = calls[0]
            data = resp.pack(("EVALSHA", script.sha, len(keys), *keys, *args)) if self._direct else None
            if data is None:
                return [script(keys=keys, args=args)]
            try:
                return [self._send_packed(data)]
            except redis.exceptions.NoScriptError:     # a restart flushed the script cache
                self.client.script_load(script.script)
                return [self._send_packed(data)]
        for attempt in (1, 2):
            pipe = self.client.pipeline(transaction=False)
            for keys, args in calls:
                pipe.evalsha(script.sha, len(keys), *keys, *args)
            try:
                return self._replicated(pipe, what)
            except redis.exceptions.NoScriptError:
                if attempt == 2:
                    raise
                self.client.script_load(script.script)
        raise AssertionError("unreachable")

    # -- consuming ---------------------------------------------------------------------
    def declare(self, queues: Sequence[str]) -> None:
        """Create every stream and its consumer group; register the queues.
        This makes the broker a worker's: its pool grows to the concurrency
        plus the control plane, and publishes retry through outages for up to
        ``socket_timeout`` seconds (a client's give up after ``connect_timeout``)."""
        self.pool.grow(worker_pool_size(self.config))
        self._publish_budget = self._timeout
        self._call(lambda: self._declare(queues), self._timeout, "declare")

    def _declare(self, queues: Sequence[str]) -> None:
        keys = [k for q in queues for k in self.streams(q)]
        self._declare_script(keys=[self._k_queues] + keys, args=[GROUP, *queues])
        self._declared.update(queues)
        self._registered.update(queues)

    def fetch(self, queues: Sequence[str], count: int, timeout: float, max_bytes: int = 0) -> List[Delivery]:
        """Lease up to ``count`` messages (at most ``max_bytes`` of bodies, 0: no
        limit); see the module docstring.  While Redis is unreachable it
        retries until ``timeout`` and returns ``[]``."""
        if count <= 0 or not queues or not self._consuming:
            return []
        count = min(count, SCRIPT_BATCH_MAX)
        out = self._take_spares(count)
        if out:
            return out
        deadline = time.monotonic() + max(0.0, timeout)
        interrupts = self._interrupts
        while True:
            try:
                out = self.reconnector.call(lambda: self._fetch_once(queues, count, deadline, max_bytes),
                                            deadline, "fetch")
            except Unreachable:
                return []
            if not self._consuming:         # stopped while this read was under way
                self._give_back(out)
                return []
            if out or time.monotonic() >= deadline or self._interrupts != interrupts:
                return out

    def _fetch_once(self, queues: Sequence[str], count: int, deadline: float,
                    max_bytes: int = 0) -> List[Delivery]:
        if self._unacked:
            self._flush_unacked()
        if not self._declared.issuperset(queues):
            self._declare(queues)
        out: List[Delivery] = []
        if time.monotonic() >= self._next_reclaim:
            out = self._reclaim(queues, count)
        budget = budget_left(max_bytes, out)
        if len(out) < count and budget is not None:
            try:
                out += self._read(queues, count - len(out), budget)
            except Exception:
                with self._lock:            # reclaimed and leased to us: hand out next time
                    self._spares.extend(out)
                raise
        if out:
            return out
        now = time.monotonic()
        wait = min(deadline - now, self._block, self._next_reclaim - now)
        if self._next_due is not None:
            wait = min(wait, self._next_due - time.time())
        if wait <= 0.001:
            return []
        return self._block_read(queues, count, wait, max_bytes)

    def _delivery(self, queue: str, prio: int, stream: str, entry_id: bytes, body: Any, mid: Any,
                  size: int, deliveries: int) -> Delivery:
        """A Delivery of what a script returned: ``size`` > 0 means the entry
        was over ``body_limit`` and ``body`` is only its preview."""
        if size:
            message_id = _text(mid) if isinstance(mid, bytes) else _text(entry_id)
            return Delivery.oversized(queue, body, message_id, deliveries, (stream, entry_id), prio, size,
                                      self.config.max_message_size)
        return entry_delivery(queue, prio, stream, entry_id, body, mid, deliveries)

    def _read(self, queues: Sequence[str], count: int, max_bytes: int = 0) -> List[Delivery]:
        keys: List[str] = []
        for q in queues:
            keys.append(self._delayed(q))
            keys += self.streams(q)
        flat = self._fetch_script(keys=keys, args=[
            GROUP, self.consumer, PARKED, count, repr(time.time()), len(queues), MOVE_PER_FETCH,
            self._limit, PREVIEW_BYTES, max_bytes])
        self._next_due = float(flat[0]) if flat[0] else None
        out: List[Delivery] = []
        i, end = 1, len(flat)
        add = out.append
        while i < end:      # groups: queue index, priority, n, n messages (scripts/fetch.lua)
            queue, prio, n = queues[flat[i]], flat[i + 1], flat[i + 2]
            stream = self._streams[queue][9 - prio]
            i += 3
            for _ in range(n):
                item = flat[i]
                if item.__class__ is bytes:      # b"ID COUNT LEN MID" + body: a b/m entry in one reply
                    entry_id, times, length, rest = item.split(b" ", 3)
                    size = int(length)
                    try:        # entry_delivery's good case, inline (a message id not UTF-8: its error)
                        add(Delivery(queue, rest[size:], rest[:size].decode(), int(times), (stream, entry_id), prio))
                    except UnicodeDecodeError:
                        add(entry_delivery(queue, prio, stream, entry_id, rest[size:], rest[:size], int(times)))
                    i += 1
                else:                            # 0, then id, body, mid, size, count
                    add(self._delivery(queue, prio, stream, *flat[i + 1:i + 6]))
                    i += 6
        return out

    def _reclaim(self, queues: Sequence[str], count: int) -> List[Delivery]:
        """Claim entries whose lease ran out; runs at most every lease/4."""
        keys = [k for q in queues for k in self.streams(q)]
        self._reclaims += 1
        forget = FORGET_CONSUMERS_MS if self._reclaims % 100 == 1 else 0
        flat = self._reclaim_script(keys=keys, args=[
            GROUP, self.consumer, int(self._lease * 1000), count, forget, PARKED, self._limit, PREVIEW_BYTES])
        self._next_reclaim = time.monotonic() + max(0.05, self._lease / 4)
        out = []
        for i in range(0, len(flat), 6):
            key = keys[flat[i] - 1]
            queue, prio = self._where[key.encode()]
            out.append(self._delivery(queue, prio, key, *flat[i + 1:i + 6]))
        if out:
            log.info("reclaimed %d message(s) whose lease ran out", len(out))
        return out

    def _block_read(self, queues: Sequence[str], count: int, wait: float,
                    max_bytes: int = 0) -> List[Delivery]:
        """Wait for a first entry (one per stream: XREADGROUP cannot look at a
        size before reading) and hand it out at once: the next fetch's script
        reads the rest of the batch while the task runs, so a lone message
        (a round trip's) does not wait for a second read, and a busy queue
        costs no more round trips (the next fetch reads first anyway)."""
        keys = [k for q in queues for k in self.streams(q)]
        try:   # raw reply (see __init__): entry fields as the server sent them
            reply = self.client.execute_command(
                "XREADGROUP", "GROUP", GROUP, self.consumer, "COUNT", 1,
                "BLOCK", max(1, int(wait * 1000)), "STREAMS", *keys, *(">" for _ in keys))
        except redis.ResponseError as exc:
            if "NOGROUP" not in str(exc) and "UNBLOCKED" not in str(exc):
                raise
            self._declared.difference_update(queues)   # deleted or lost: declare again
            return []
        out = self._deliveries_of(reply)
        del reply                           # an oversized entry's bytes go with it
        if len(out) > count:   # a server that re-runs the read may serve several streams
            with self._lock:
                self._spares.extend(out[count:])
            out = out[:count]
        return out

    def _deliveries_of(self, reply: Any) -> List[Delivery]:
        """The Deliveries of a raw XREADGROUP reply."""
        out: List[Delivery] = []
        streams = reply.items() if isinstance(reply, dict) else (reply or ())   # RESP3 or RESP2
        for key, entries in streams:
            queue, prio = self._where[key if isinstance(key, bytes) else key.encode()]
            stream = self._streams[queue][9 - prio]
            out += [self._checked(queue, prio, stream, entry) for entry in entries]
        return out

    def _checked(self, queue: str, prio: int, stream: str, entry: Any) -> Delivery:
        """A Delivery of an entry read whole by the blocking read: one over
        ``body_limit`` is cut to its preview here."""
        fields = entry[1]
        size = sum(len(v) for v in fields[1::2] if isinstance(v, bytes)) if isinstance(fields, list) else 0
        if size > self._limit:
            named = dict(zip(fields[::2], fields[1::2]))
            body, mid = named.get(b"b", fields[1]), named.get(b"m", 0)
            mid = mid if isinstance(mid, bytes) and len(mid) <= 255 else 0
            size = len(body) if len(body) > self._limit else size
            return self._delivery(queue, prio, stream, entry[0], body[:PREVIEW_BYTES], mid, size, 1)
        return entry_delivery(queue, prio, stream, entry[0], *split_fields(fields), 1)

    def _take_spares(self, count: int) -> List[Delivery]:
        if not self._spares:
            return []
        with self._lock:
            out: List[Delivery] = []
            while self._spares and len(out) < count:
                out.append(self._spares.popleft())
            return out

    def ack(self, deliveries: Sequence[Delivery]) -> None:
        """XACK+XDEL of the entries this consumer still holds, in one round trip
        (a stale holder's ack, after its lease ran out and another consumer
        claimed the entry, is a no-op).  Does not raise when Redis is
        away: the acks are kept, renewed with the held messages, and sent after
        reconnecting (if Redis lost them meanwhile, they are simply redelivered)."""
        if not deliveries:
            return
        with self._lock:
            batch, self._unacked = self._unacked + list(deliveries), []
        try:
            self._call(lambda: self._send_acks(batch), min(self._timeout, 2.0), "ack")
        except Unreachable as exc:
            with self._lock:
                self._unacked[:0] = batch
            if len(batch) == len(deliveries):   # nothing was kept before: say it once
                log.warning("acks kept until Redis is back: %s", exc)

    def _send_acks(self, deliveries: List[Delivery]) -> None:
        self._run_script(self._ack_script, [(keys, [GROUP, self.consumer, *ids])
                                            for keys, ids in _per_stream(deliveries)], "ack")

    def _replicated(self, pipe: Any, what: str) -> List[Any]:
        """Run ``pipe``; with ``[redis] min_replicas = N`` it ends in WAIT N (on
        the same connection), so its writes are on N replicas when this returns.
        A publish that N replicas did not confirm within half the socket timeout
        raises BrokerError (it may still be delivered); an ack only warns (if
        lost in a failover, the message is delivered again)."""
        n = self._min_replicas if what in REPLICATED else 0
        if not n:
            return pipe.execute()
        pipe.execute_command("WAIT", n, int(self._timeout * 500))
        *replies, acked = pipe.execute()
        if acked < n:
            text = f"{what}: only {acked} of [redis] min_replicas = {n} replica(s) confirmed the write"
            if what == "publish":
                raise BrokerError(text)
            log.warning("%s", text)
        return replies

    def _flush_unacked(self) -> None:
        """Send acks kept while Redis was away (inside a round trip that worked)."""
        with self._lock:
            pending, self._unacked = self._unacked, []
        try:
            self._send_acks(pending)
        except Exception:
            with self._lock:
                self._unacked[:0] = pending
            raise
        log.info("sent %d ack(s) kept while Redis was away", len(pending))

    def _transfer(self, deliveries: Sequence[Delivery], target: str, budget: float, what: str,
                  uncount: bool = False) -> int:
        """TRANSFER the entries this consumer holds to ``target``, one round trip."""
        calls = [(keys, [GROUP, self.consumer, target, "1" if uncount else "0", *ids])
                 for keys, ids in _per_stream(deliveries)]
        return sum(self._call(lambda: self._run_script(self._transfer_script, calls, what), budget, what))

    def renew(self, deliveries: Sequence[Delivery]) -> None:
        """Reset the idle time of every entry still owned by this consumer (one
        round trip); spares and kept acks are renewed too."""
        with self._lock:
            extra = list(self._spares) + self._unacked
        everything = list(deliveries) + extra
        if everything:
            self._transfer(everything, self.consumer, min(self._timeout, self._lease / 3), "renew")

    def requeue(self, deliveries: Sequence[Delivery], started: bool = True) -> None:
        """Park the entries on ``~requeued``: fetched again before newer messages
        of their priority, with the delivery count going on from where it was
        (``started=False``: lowered by one first, so the next hand-out counts
        as the same delivery).  Entries this consumer no longer holds stay put."""
        if deliveries:
            self._transfer(deliveries, PARKED, self._timeout, "requeue", uncount=not started)

    def dead_letter(self, delivery: Delivery, reason: str) -> None:
        """Move the entry to the dead letters if this consumer still holds it;
        a stale holder's dead-letter is a no-op (the new holder decides)."""
        key, entry_id = delivery.token
        moved = self._call(lambda: self._dead_script(
            keys=[key, self._k_dead, self._k_dead_count, self._k_queues],
            args=[GROUP, entry_id, delivery.queue, delivery.priority, delivery.message_id,
                  reason, repr(time.time()), delivery.body, self.consumer]), self._timeout, "dead-letter")
        if not moved:
            log.warning("message %s not dead-lettered: no longer held by this worker "
                        "(its lease ran out)", delivery.message_id)

    def next_due(self, queues: Sequence[str]) -> Optional[float]:
        def ask() -> List[Any]:
            pipe = self.client.pipeline(transaction=False)
            for q in queues:
                pipe.zrange(self._delayed(q), 0, 0, withscores=True)
            return pipe.execute()
        firsts = [r[0][1] for r in self._call(ask, self._timeout, "next_due") if r]
        return min(firsts) if firsts else None

    def interrupt(self) -> None:
        """A blocked fetch returns at its next wake-up (within a second)."""
        self._interrupts += 1

    def stop_consuming(self) -> None:
        """Warm shutdown: fetch returns ``[]`` from now on, and the entries
        leased but not handed out (spares; and what a fetch blocked right now
        receives, when it wakes) are parked for other workers at once with
        their delivery count unchanged.  Held messages can still be acked,
        requeued and renewed."""
        self._consuming = False
        self.interrupt()
        with self._lock:
            spares, self._spares = list(self._spares), deque()
        self._give_back(spares)

    def _give_back(self, deliveries: Sequence[Delivery]) -> None:
        """Park leased entries that no task saw; if Redis is away they come
        back when their lease runs out."""
        if not deliveries:
            return
        try:
            self._transfer(deliveries, PARKED, min(self._timeout, 2.0), "requeue", uncount=True)
        except BrokerError as exc:
            log.warning("could not return %d unstarted message(s): %s (they come back after "
                        "their lease)", len(deliveries), exc)

    # -- administration --------------------------------------------------------------
    def queue_stats(self, queues: Optional[Sequence[str]] = None) -> List[QueueStats]:
        if queues is None:
            names = self._call(lambda: self.client.smembers(self._k_queues), self._timeout, "queue_stats")
            queues = sorted(_text(n) for n in names)
        if not queues:
            return []
        keys: List[str] = []
        for q in queues:
            keys += self.streams(q) + [self._delayed(q)]
        flat = self._call(lambda: self._stats_script(keys=keys + [self._k_dead_count],
                                                     args=[GROUP, PARKED, repr(time.time()), *queues]),
                          self._timeout, "queue_stats")
        return [stats_row(q, flat[i * 5:i * 5 + 5]) for i, q in enumerate(queues)]

    def purge(self, queue: str) -> int:
        keys = self.streams(queue) + [self._delayed(queue)]
        total = 0
        while True:
            deleted, more = self._call(lambda: self._purge_script(
                keys=keys, args=[GROUP, PARKED, 1000]), self._timeout, "purge")
            total += deleted
            if not more:
                return total

    def _dead_letter_of(self, entry_id: Any, fields: Dict[bytes, bytes]) -> DeadLetter:
        """A dead-letter entry as written by DEAD_LETTER; one written by hand
        with missing or bad fields is shown as well as it can be, never raises."""
        try:
            failed_at = float(fields.get(b"t") or 0)
        except ValueError:
            failed_at = 0.0
        return DeadLetter(id=_text(entry_id), queue=_text(fields.get(b"q", b"")),
                          body=fields.get(b"b", b""), reason=_text(fields.get(b"r", b"")),
                          message_id=_text(fields.get(b"m", b"")), failed_at=failed_at)

    def dlq_list(self, limit: int = 100, preview: Optional[int] = None) -> List[DeadLetter]:
        entries = self._dead_entries(self._k_dead, "-", limit, preview)
        return [self._dead_letter_of(i, f) for i, f in entries]

    def _dead_entries(self, key: str, start: str, limit: Optional[int],
                      preview: Optional[int]) -> List[Tuple[Any, Dict[bytes, bytes]]]:
        """XRANGE ``key`` from ``start``; with ``preview``, bodies cut in Redis (DLQ_PREVIEW)."""
        if preview is None:
            return self._call(lambda: self.client.xrange(key, start, "+", count=limit), self._timeout, "dlq list")
        flat = self._call(lambda: self._dlq_preview_script(keys=[key], args=[start, limit or 1000, preview]),
                          self._timeout, "dlq list")
        return [(entry_id, dict(zip(fields[::2], fields[1::2]))) for entry_id, fields in flat]

    def dlq_get(self, dead_id: str) -> Optional[DeadLetter]:
        if not _STREAM_ID.match(dead_id):
            return None
        entries = self._call(lambda: self.client.xrange(self._k_dead, dead_id, dead_id),
                             self._timeout, "dlq show")
        return self._dead_letter_of(*entries[0]) if entries else None

    def dlq_requeue(self, dead_ids: Optional[Sequence[str]] = None) -> int:
        keys = [self._k_dead, self._k_dead_count]
        if dead_ids is not None:
            ids = [i for i in dead_ids if _STREAM_ID.match(i)]
            moved = 0
            for offset in range(0, len(ids), 500):
                chunk = ids[offset:offset + 500]
                moved += self._call(lambda: self._dlq_requeue_script(
                    keys=keys, args=[self.prefix, *chunk]), self._timeout, "dlq requeue")[0]
            return moved
        moved, start = 0, "-"
        while True:                     # 500 at a time; unusable ones are stepped over
            n, last = self._call(lambda: self._dlq_requeue_script(
                keys=keys, args=[self.prefix, ">", start]), self._timeout, "dlq requeue")
            moved += n
            if not last:
                return moved
            start = "(" + _text(last)

    def dlq_purge(self) -> int:
        def purge() -> int:
            pipe = self.client.pipeline(transaction=True)
            pipe.xlen(self._k_dead)
            pipe.delete(self._k_dead, self._k_dead_count)
            return pipe.execute()[0]
        return self._call(purge, self._timeout, "dlq purge")

    def close(self) -> None:
        """Return unhanded spares (delivery count unchanged), send kept acks
        (briefly), drop the connections.  Safe to call twice, and from a plain
        client that never fetched.  Call it after the last fetch returned."""
        self.stop_consuming()
        try:
            if self._unacked:
                self._call(self._flush_unacked, 1.0, "ack")
        except BrokerError as exc:
            log.warning("closing with Redis away: %s (held messages come back after their lease)", exc)
        # idle connections: one still in use (a fetch returning) is closed with the pool
        self.pool.disconnect(inuse_connections=False)
