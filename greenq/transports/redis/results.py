"""``redis://`` and ``rediss://`` result backend.

Keys (``P`` is ``[greenq] key_prefix``)::

    P:result:<task id>   string, "F" (final) or "P" (not final) + the record;
                         expires after result_expires (0 = never)
    P:waiters:<task id>  set of the reply channels of the processes waiting
                         for the task (expires with the longest wait)
    P:revoked:<task id>  "1" (terminate) or "0"; expires after result_expires
    P:revocations        sorted set of "1:<task id>" / "0:<task id>" scored by
                         the revoke time: what a worker starting later loads
                         (members older than result_expires are trimmed)

and one pub/sub channel ``P:reply:<random>:r`` per backend instance (process).

``wait`` never polls, and any number of waiters in a process share one
connection: a listener (one thread, or greenlet when patched) is subscribed to
the instance's reply channel.  A waiter reads the record, or else adds the
channel to ``waiters``, in one script; the store script sets the record and,
when final, publishes the task id and the record (NOTIFY_MAX) to every
channel in ``waiters``; the listener wakes the process's waiters of that
task, which take the record from the notification (or read it, when only the
id came: a record over NOTIFY_MAX, an older worker, a chord member's store).
The two scripts are atomic, so a store is never missed between the read and
the registration.  When the listener's connection drops, it reconnects and
wakes every waiter to read again.  A listener nobody has waited on for
``[redis] idle_timeout`` seconds ends and lets its connection go, like the
pool's idle connections; the next wait starts a new one on the same channel.
"""
from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, TypeVar, cast

from ...reconnect import Reconnecting, Reconnector, Unreachable, reconnect_delay
from .client import FAILURES, TRANSIENT, Pool, make_client, refused
from ...config import Config, mask_url
from ...backends.base import REVOCATIONS_MAX, ChordCount, Record, Revocation, ResultBackend
from ...coordination import Coordination
from . import lua
from .coordination import RedisCoordination

T = TypeVar("T")

log = logging.getLogger("greenq.transports.redis.results")

#: a final record up to this size travels in the notification itself (to a
#: channel ending in CARRY_MARK): the waiter needs no GET after the wake-up.
#: Small, so that many waiters' notifications at once stay far below Redis's
#: pub/sub output buffer limits (client-output-buffer-limit pubsub 32mb 8mb 60
#: by default), past which Redis drops the listener's connection
NOTIFY_MAX = 8192
#: the end of the reply channel of a listener that takes records in its
#: notifications (older listeners' channels end in their random hex and get
#: the task id alone, as before)
CARRY_MARK = ":r"

#: KEYS, per record: result, waiters.  ARGV: expiry (s, 0 = none), then per
#: record: task id, value.  A final value wakes the waiters' processes: to a
#: channel ending in CARRY_MARK it publishes NUL, the id's length, ":", the id
#: and the value (the value only when at most NOTIFY_MAX bytes), to any other
#: channel the id alone.
STORE = """
local ex = tonumber(ARGV[1])
for i = 1, #KEYS / 2 do
  local id, value = ARGV[2 * i], ARGV[2 * i + 1]
  if ex > 0 then
    redis.call('SET', KEYS[2 * i - 1], value, 'EX', ex)
  else
    redis.call('SET', KEYS[2 * i - 1], value)
  end
  if string.byte(value, 1) == 70 then  -- 'F': final
    local channels = redis.call('SMEMBERS', KEYS[2 * i])
    if #channels > 0 then
      local carried = id
      if #value <= NOTIFY_MAX then carried = '\\0' .. #id .. ':' .. id .. value end
      for _, channel in ipairs(channels) do
        if string.sub(channel, -2) == 'CARRY_MARK' then
          redis.call('PUBLISH', channel, carried)
        else
          redis.call('PUBLISH', channel, id)
        end
      end
      redis.call('DEL', KEYS[2 * i])
    end
  end
end
return #KEYS / 2
""".replace("NOTIFY_MAX", str(NOTIFY_MAX)).replace("CARRY_MARK", CARRY_MARK)

#: The record when final; else register the reply channel.  KEYS: result,
#: waiters.  ARGV: reply channel, seconds the registration lives.
CHECK_IN = """
local value = redis.call('GET', KEYS[1])
if value and string.byte(value, 1) == 70 then return value end
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('EXPIRE', KEYS[2], ARGV[2])
return false
"""

FINAL, PARTIAL = b"F", b"P"


def split_notification(data: Any) -> Tuple[str, Optional[bytes]]:
    """The task id of a notification and the final record it carries (with
    its "F"), or None when it is a bare task id (an older worker's, a
    record over NOTIFY_MAX, a chord member's)."""
    if isinstance(data, bytes) and data[:1] == b"\0":
        head, sep, rest = data[1:].partition(b":")
        if sep and head.isdigit():
            n = int(head)
            task_id, value = rest[:n], rest[n:]
            if len(task_id) == n and value[:1] == FINAL:
                return task_id.decode(), value
    return (data.decode() if isinstance(data, bytes) else str(data)), None


LISTEN_SLICE = 1.0   # seconds the listener blocks before looking at its stop flag


class _Listener:
    """The pub/sub connection every ``wait`` of one backend shares."""

    def __init__(self, backend: "RedisBackend") -> None:
        self.backend = backend
        self.channel = f"{backend.prefix}:reply:{uuid.uuid4().hex}{CARRY_MARK}"
        self._own = self.channel.encode("utf-8")   # as pub/sub messages name it
        self.ready = threading.Event()            # subscribed: registrations will be heard
        self._waiters: Dict[str, List[threading.Event]] = {}
        self._carried: Dict[str, bytes] = {}       # final records notified, of tasks waited on
        self._lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None
        self._closed = False
        self._last_wait = time.monotonic()         # when a waiter last came or went
        self._generation = 0                       # of the current listener thread
        #: other channels to hear (``watch``): channel -> (task id, subscribed event, watchers)
        self._watched: Dict[str, List[Any]] = {}
        #: what this listener's connection is subscribed to (True: confirmed); its thread's own
        self._subscribed: Dict[str, bool] = {}

    def register(self, task_id: str) -> threading.Event:
        event = threading.Event()
        with self._lock:
            self._last_wait = time.monotonic()
            self._waiters.setdefault(task_id, []).append(event)
            if self._thread is None or not self._thread.is_alive():
                self._generation += 1
                self._thread = threading.Thread(target=self._run, args=(self._generation,),
                                                name="greenq-results", daemon=True)
                self._thread.start()
        return event

    def unregister(self, task_id: str, event: threading.Event) -> None:
        with self._lock:
            self._last_wait = time.monotonic()
            events = self._waiters.get(task_id, [])
            if event in events:
                events.remove(event)
            if not events:
                self._waiters.pop(task_id, None)
                self._carried.pop(task_id, None)

    def carried(self, task_id: str) -> Optional[bytes]:
        """The final record (with its "F") a notification brought for
        ``task_id``, kept while someone waits for it; else None."""
        with self._lock:
            return self._carried.get(task_id)

    def watch(self, channel: str, task_id: str) -> threading.Event:
        """Also hear ``channel`` (Celery's backend publishes a record on its
        key's name): a message there wakes ``task_id``'s waiters.  The event
        returned is set once the subscription is confirmed; until then a
        publish may be missed.  Each ``watch`` takes one ``unwatch``."""
        with self._lock:
            entry = self._watched.get(channel)
            if entry is None:
                entry = self._watched[channel] = [task_id, threading.Event(), 0]
            entry[2] += 1
            event = entry[1]
        self._nudge()
        return cast(threading.Event, event)

    def unwatch(self, channel: str) -> None:
        with self._lock:
            entry = self._watched.get(channel)
            if entry is not None:
                entry[2] -= 1
                if entry[2] <= 0:
                    del self._watched[channel]
        self._nudge()

    def _nudge(self) -> None:
        """Wake the listener from its blocking read, so it (un)subscribes now."""
        try:
            self.backend.client.publish(self.channel, b"")
        except Exception:  # pragma: no cover - Redis away: it syncs within a slice
            pass

    def _sync(self, pubsub: Any) -> None:
        """(Un)subscribe the watched channels to match ``_watched``."""
        with self._lock:
            wanted = set(self._watched)
        subscribe = [c for c in wanted if c not in self._subscribed]
        drop = [c for c in self._subscribed if c not in wanted]
        if subscribe:
            pubsub.subscribe(*subscribe)
            for c in subscribe:
                self._subscribed[c] = False      # True once Redis confirms it
        with self._lock:                         # watched again while still subscribed: heard already
            for c, entry in self._watched.items():
                if self._subscribed.get(c) and not entry[1].is_set():
                    entry[1].set()
        if drop:
            pubsub.unsubscribe(*drop)
            for c in drop:
                self._subscribed.pop(c, None)

    def close(self) -> None:
        """Stop the listener before its connection is closed (a socket closed
        under a blocked green thread confuses eventlet's hub)."""
        self._closed = True
        thread = self._thread
        if thread is None or not thread.is_alive():
            return
        try:                                       # wake it now rather than within a slice
            self.backend.client.publish(self.channel, b"")
        except Exception:  # pragma: no cover - Redis away: it wakes within a slice
            pass
        thread.join(LISTEN_SLICE + 1.0)

    def _idled_out(self, generation: int) -> bool:
        """True when nobody waited for ``idle_timeout`` seconds: this thread is
        forgotten (the next ``register`` starts another) and ``ready``
        cleared, both under the lock, so a waiter never sees a stale ready."""
        idle = self.backend.pool.idle_close
        with self._lock:
            if not idle or self._waiters or time.monotonic() - self._last_wait <= idle:
                return False
            if generation == self._generation:
                self._thread = None
                self.ready.clear()
            return True

    def _wake(self, task_id: Optional[str], value: Optional[bytes] = None) -> None:
        """Wake the waiters of ``task_id``, or everyone (None), handing them
        the final record ``value`` when the notification carried it."""
        with self._lock:
            events = ([e for es in self._waiters.values() for e in es] if task_id is None
                      else list(self._waiters.get(task_id, ())))
            if value is not None and task_id is not None and events:
                self._carried[task_id] = value
        for event in events:
            event.set()

    def _run(self, generation: int) -> None:
        pubsub, failures = None, 0
        again = False       # subscribed before: a waiter may have missed a notification since
        try:
            while not self._closed:
                try:
                    if pubsub is None:
                        pubsub = self.backend.client.pubsub(ignore_subscribe_messages=False)
                        self._subscribed = {}
                        pubsub.subscribe(self.channel)
                    if self._watched or self._subscribed:
                        self._sync(pubsub)
                    message = pubsub.get_message(timeout=LISTEN_SLICE)
                except Exception as exc:       # the listener must outlive any failure
                    if self._closed or self._idled_out(generation):
                        return
                    self.ready.clear()
                    with self._lock:
                        for entry in self._watched.values():
                            entry[1].clear()     # subscribed again with the new connection
                    failures += 1
                    if failures == 2:
                        log.warning("%s: result listener lost its connection (%s); reconnecting",
                                    self.backend.reconnector.name, exc)
                    if pubsub is not None:
                        self._discard(pubsub)
                    pubsub = None
                    self.backend._sleep(reconnect_delay(failures))
                    continue
                if message is None:
                    if self._idled_out(generation):
                        return
                    continue
                channel = message.get("channel")
                if self._subscribed and channel is not None and channel != self._own \
                        and channel != self.channel:   # a watched channel (only while there are some)
                    self._heard(message["type"], channel.decode("utf-8", "replace")
                                if isinstance(channel, bytes) else channel)
                    continue
                if message["type"] == "subscribe":
                    if failures >= 2:
                        log.warning("%s: result listener reconnected", self.backend.reconnector.name)
                    failures = 0
                    self.ready.set()
                    if again:                     # anything stored while away is read again (the
                        self._wake(None)          # first time, waiters check in after ``ready``)
                    again = True
                elif message["type"] == "message":
                    self._wake(*split_notification(message["data"]))
        finally:
            with self._lock:
                if generation == self._generation:   # not replaced by a newer listener
                    self.ready.clear()
            if pubsub is not None:
                self._discard(pubsub)

    def _heard(self, kind: str, channel: str) -> None:
        """A watched channel's subscription confirmed, or a message on it."""
        if kind == "subscribe" and channel in self._subscribed:
            self._subscribed[channel] = True
        with self._lock:
            entry = self._watched.get(channel)
        if entry is None:
            return
        if kind == "subscribe":
            entry[1].set()
            self._wake(entry[0])             # stored while subscribing: read again
        elif kind == "message":
            self._wake(entry[0])

    @staticmethod
    def _discard(pubsub: Any) -> None:
        try:
            pubsub.reset()
        except Exception:  # pragma: no cover - its connection is already gone
            pass


class RedisBackend(Reconnecting, ResultBackend):
    """Results, waits and revocations in Redis; see the module docstring."""

    #: builds the client from the URL (Sentinel and Cluster subclasses use their own)
    client_factory = staticmethod(make_client)

    def __init__(self, url: str, config: Config, driver: Any = None) -> None:
        super().__init__(url, config, driver)
        self.prefix = config.key_prefix
        self.expires = int(config.result_expires)
        self.client = self.client_factory(url, config, "results", extra=1)   # +1: the listener's
        self.pool = cast(Pool, self.client.connection_pool)  # the Pool make_client gave it (a cluster's: _AllNodePools, with its grow and disconnect)
        self.reconnector = Reconnector(f"redis result backend {mask_url(url)}", TRANSIENT,
                                       reset=lambda: self.pool.disconnect(inuse_connections=False),
                                       sleep=self._sleep, failures=FAILURES, refused=refused)
        self._timeout = config.section("redis")["socket_timeout"] or 30.0
        self._store_script = self.client.register_script(STORE)
        self._check_in_script = self.client.register_script(CHECK_IN)
        self._chord_done_script = self.client.register_script(lua.CHORD_DONE)
        self._listener = _Listener(self)

    def _key(self, kind: str, task_id: str) -> str:
        return f"{self.prefix}:{kind}:{task_id}"

    # -- primitives ------------------------------------------------------------
    def _store_many(self, records: Sequence[Record]) -> None:
        keys: List[str] = []
        args: List[Any] = [self.expires]
        for r in records:
            keys += [self._key("result", r.task_id), self._key("waiters", r.task_id)]
            args += [r.task_id, (FINAL if r.final else PARTIAL) + bytes(r.data)]
        self._call(lambda: self._store_script(keys=keys, args=args), self._timeout, "store results")

    def _get(self, task_id: str) -> Optional[bytes]:
        value = self._call(lambda: self.client.get(self._key("result", task_id)), self._timeout, "get result")
        return None if value is None else value[1:]

    def _is_final(self, task_id: str) -> Optional[bytes]:
        value = self._call(lambda: self.client.get(self._key("result", task_id)), self._timeout, "get result")
        return value[1:] if value is not None and value[:1] == FINAL else None

    def _wait(self, task_id: str, timeout: Optional[float]) -> Optional[bytes]:
        """Read or register (one script), then sleep until the listener says
        the task finished; see the module docstring."""
        deadline = None if timeout is None else time.monotonic() + timeout

        def left() -> Optional[float]:
            return None if deadline is None else max(0.0, deadline - time.monotonic())

        listener = self._listener
        event = listener.register(task_id)
        try:
            if not listener.ready.wait(left()):
                raise Unreachable(f"wait for result: {self.reconnector.name}: "
                                  "the result listener could not subscribe")
            lifetime = int(timeout if timeout is not None else (self.expires or 86400)) + 60
            value = self._call(lambda: self._check_in_script(
                keys=[self._key("result", task_id), self._key("waiters", task_id)],
                args=[listener.channel, lifetime]), left(), "wait for result")
            while value is None:
                remaining = left()
                if remaining is not None and remaining <= 0:
                    return None
                if event.wait(remaining):
                    event.clear()
                    value = listener.carried(task_id)     # the record came with the wake-up
                    if value is None:                     # an id alone: read the record
                        value = self._call(lambda: self.client.get(self._key("result", task_id)),
                                           left(), "wait for result")
                    if value is not None and value[:1] != FINAL:
                        value = None
            return value[1:]
        finally:
            listener.unregister(task_id, event)

    def _forget(self, task_id: str) -> None:
        self._call(lambda: self.client.delete(self._key("result", task_id), self._key("waiters", task_id)),
                   self._timeout, "forget result")

    def _revoke(self, task_id: str, terminate: bool) -> None:
        flag = b"1" if terminate else b"0"
        now = time.time()
        log_key = f"{self.prefix}:revocations"

        def revoke() -> None:
            pipe = self.client.pipeline(transaction=False)
            pipe.set(self._key("revoked", task_id), flag, ex=self.expires or None)
            pipe.zadd(log_key, {flag + b":" + task_id.encode(): now})
            if self.expires:
                pipe.zremrangebyscore(log_key, "-inf", now - self.expires)
                pipe.expire(log_key, self.expires)
            pipe.execute()
        self._call(revoke, self._timeout, "revoke")

    def _revocations(self, since: float) -> List[Revocation]:
        oldest = max(since, time.time() - self.expires) if self.expires else since
        found = self._call(lambda: self.client.zrevrangebyscore(
            f"{self.prefix}:revocations", "+inf", oldest, start=0, num=REVOCATIONS_MAX, withscores=True),
            self._timeout, "read revocations")
        out: Dict[str, Revocation] = {}
        for member, at in reversed(found):          # oldest first; revoked twice: terminate wins
            flag, _, task_id = member.partition(b":")
            tid = task_id.decode("utf-8", "replace")
            earlier = out.pop(tid, None)
            out[tid] = Revocation(tid, flag == b"1" or bool(earlier and earlier.terminate), float(at))
        return list(out.values())

    def _revoked(self, task_ids: Sequence[str]) -> Dict[str, bool]:
        values = self._call(lambda: self.client.mget([self._key("revoked", t) for t in task_ids]),
                            self._timeout, "read revocations")
        return {t: v == b"1" for t, v in zip(task_ids, values) if v is not None}

    # -- groups and chords: P:group:<id> (string), P:chord:<id> (set of the
    # members counted), P:chordstate:<id> (hash: completer, sent): the last two
    # through RedisCoordination (greenq/transports/redis/coordination.py) ------
    stores_groups = True

    def get_many(self, task_ids: Sequence[str]) -> List[Optional[bytes]]:
        keys = [self._key("result", t) for t in task_ids]
        values = self._call(lambda: self.client.mget(keys), self._timeout, "get results") if keys else []
        return [None if v is None else v[1:] for v in values]

    def save_group(self, group_id: str, data: bytes) -> None:
        self._call(lambda: self.client.set(self._key("group", group_id), data, ex=self.expires or None),
                   self._timeout, "save group")

    def load_group(self, group_id: str) -> Optional[bytes]:
        return self._call(lambda: self.client.get(self._key("group", group_id)), self._timeout, "load group")

    def forget_group(self, group_id: str) -> None:
        # one DEL: the group record and the chord's set and record (the coordination's keys of _chord_names)
        self._call(lambda: self.client.delete(*(self._key(k, group_id) for k in ("group", "chord", "chordstate"))),
                   self._timeout, "forget group")

    # chord_member_done / chord_sent: ResultBackend's, on this client's coordination;
    # chord_members_done: one script (scripts/chord_done.lua) for the whole batch
    counts_with_store = True

    def chord_members_done(self, members: Sequence[ChordCount]) -> List[bool]:
        """Store, count and decide in one round trip (scripts/chord_done.lua):
        the script stores each member's record, adds the member to its
        chord's set and, when the set is full, claims the chord's state for
        it unless another member holds it, atomically: of members racing
        (or run twice) exactly one is the completer, as with
        ``chord_member_done``.  With a signing key the script only stores and
        counts (it cannot check the set's tags): a member that finds the set
        full goes on with ``chord_member_done``, which counts only the
        members whose tag is good (greenq/coordination.py SignedCoordination)."""
        if not members:
            return []
        coordination = self.coordination
        decide = not coordination.signed
        ttl = self.config.result_expires or None
        keys: List[str] = []
        args: List[Any] = [self.expires, int(ttl * 1000) if ttl else 0, 1 if decide else 0]
        for m in members:
            names = self._chord_names(m.group_id)
            keys += [self._key("result", m.member_id), self._key("waiters", m.member_id),
                     f"{self.prefix}:{names[0]}", f"{self.prefix}:{names[1]}"]
            args += [m.member_id, b"" if m.record is None else (FINAL if m.record.final else PARTIAL) + bytes(m.record.data),
                     coordination.stored_member(names[0], m.member_id), m.size]
        replies = self._call(lambda: self._chord_done_script(keys=keys, args=args), self._timeout,
                             "count chord members")
        answers = []
        for m, (_, count, decision) in zip(members, replies):
            if decide:
                answers.append(bool(decision))
            else:
                answers.append(int(count) >= m.size and self.chord_member_done(m.group_id, m.member_id, m.size))
        return answers

    def _make_coordination(self) -> Coordination:
        return RedisCoordination(self.url, self.config, self.driver, client=self.client)

    def _coordinate(self, call: Callable[[], T], what: str) -> T:
        result: T = self._call(call, self._timeout, what)
        return result

    def close(self) -> None:
        self._close_coordination()
        self._listener.close()
        self.pool.disconnect(inuse_connections=False)
