"""``redis+cluster://`` result backend.

Keys carry the task id as their hash tag, so one task's keys share a slot and
different tasks spread over the masters::

    P:result:{<task id>}    as on redis:// ("F"/"P" + the record)
    P:revoked:{<task id>}   as on redis://
    P:revocations           as on redis:// (one sorted set, on one master)
    P:done:{<task id>}      sharded pub/sub channel (SPUBLISH, Redis 7): the
                            task's final record was stored

A store sets the record and, when final, SPUBLISHes the task id on the task's
own channel, in one pipelined round trip to the task's master.  A waiter
SSUBSCRIBEs to that channel on that master first, then reads the record, then
waits for the message: a store between the read and the wait is never missed,
and a notification reaches the one master that owns the slot (and its
replicas), never every node as a plain PUBLISH would.  Each waiting ``get()``
holds one pub/sub connection while it waits (the plain backend shares one per
process).  If the subscription's connection drops (a failover), the waiter
subscribes again on the slot's new master and reads the record again.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ...reconnect import Unreachable, reconnect_delay
from .topology import CLUSTER_TRANSIENT, make_cluster_client
from ...backends.base import ChordCount, Record, ResultBackend
from .results import FINAL, PARTIAL, RedisBackend

log = logging.getLogger("greenq.transports.redis.results_cluster")

WAIT_SLICE = 1.0     # seconds one pub/sub read blocks (a dead master is noticed by then)


class RedisClusterBackend(RedisBackend):
    """RedisBackend with per-task hash slots and sharded notifications."""

    client_factory = staticmethod(make_cluster_client)
    client: Any   # a LazyCluster, not a redis.Redis: it forwards redis.RedisCluster's calls (keyslot, nodes_manager...)

    def __init__(self, url: str, config: Any, driver: Any = None) -> None:
        super().__init__(url, config, driver)
        self.reconnector.transient = CLUSTER_TRANSIENT

    #: a member's result and its chord's keys lie in different slots: no one
    #: script can touch them all (ResultBackend.chord_members_done, on the
    #: cluster's coordination)
    counts_with_store = False

    def _key(self, kind: str, task_id: str) -> str:
        return f"{self.prefix}:{kind}:{{{task_id}}}"

    def _make_coordination(self) -> Any:
        from .coordination import RedisClusterCoordination
        return RedisClusterCoordination(self.url, self.config, self.driver, client=self.client)

    def chord_members_done(self, members: Sequence[ChordCount]) -> List[bool]:
        return ResultBackend.chord_members_done(self, members)

    def _chord_names(self, group_id: str) -> Tuple[str, str]:
        """The keys P:chord:{<id>}, P:chordstate:{<id>}, as _key names them."""
        return f"chord:{{{group_id}}}", f"chordstate:{{{group_id}}}"

    def _store_many(self, records: Sequence[Record]) -> None:
        def store() -> None:
            pipe = self.client.pipeline(transaction=False)
            for r in records:
                value = (FINAL if r.final else PARTIAL) + bytes(r.data)
                pipe.set(self._key("result", r.task_id), value, ex=self.expires or None)
                if r.final:
                    pipe.execute_command("SPUBLISH", self._key("done", r.task_id), r.task_id)
            pipe.execute()
        self._call(store, self._timeout, "store results")

    def _final(self, task_id: str, budget: Optional[float]) -> Optional[bytes]:
        value = self._call(lambda: self.client.get(self._key("result", task_id)), budget, "wait for result")
        return value[1:] if value is not None and value[:1] == FINAL else None

    def _wait(self, task_id: str, timeout: Optional[float]) -> Optional[bytes]:
        """Subscribe on the task's master, read, wait for the message; see the
        module docstring."""
        deadline = None if timeout is None else time.monotonic() + timeout
        channel = self._key("done", task_id)
        failures = 0

        def left() -> Optional[float]:
            return None if deadline is None else max(0.0, deadline - time.monotonic())

        while True:
            pubsub = None
            try:
                node = self.client.get_node_from_key(channel)
                pubsub = node.redis_connection.pubsub(ignore_subscribe_messages=True)
                pubsub.ssubscribe(channel)
                value = self._final(task_id, left())
                while value is None:
                    remaining = left()
                    if remaining is not None and remaining <= 0:
                        return None
                    slice_ = WAIT_SLICE if remaining is None else min(WAIT_SLICE, remaining)
                    message = pubsub.get_message(timeout=slice_)
                    if message is not None and message.get("type") == "smessage":
                        value = self._final(task_id, left())
                return value
            except CLUSTER_TRANSIENT as exc:
                failures += 1                       # the master went away: subscribe again
                try:
                    self.client.nodes_manager.initialize()
                except Exception:
                    pass
                pause = reconnect_delay(failures)
                remaining = left()
                if remaining is not None and remaining <= pause:
                    raise Unreachable(f"wait for result: {self.reconnector.name} is unreachable ({exc})") \
                        from None
                self._sleep(pause)
            finally:
                if pubsub is not None:
                    try:
                        pubsub.reset()
                    except Exception:  # pragma: no cover - its connection is gone
                        pass

    def _forget(self, task_id: str) -> None:
        self._call(lambda: self.client.delete(self._key("result", task_id)), self._timeout, "forget result")

    def get_many(self, task_ids: Sequence[str]) -> List[Optional[bytes]]:
        """The results in many slots: MGET split by slot (a chord's completer
        reads its members' results with it)."""
        keys = [self._key("result", t) for t in task_ids]
        values = self._call(lambda: self.client.mget_nonatomic(keys), self._timeout, "get results") if keys else []
        return [None if v is None else v[1:] for v in values]

    def _revoked(self, task_ids: Sequence[str]) -> Dict[str, bool]:
        """One attempt per master: the ids on a master that is away count as
        not revoked (as on any backend that cannot be reached), so the worker's
        intake never waits for a failover."""
        by_node: Dict[str, List[str]] = {}
        for t in task_ids:
            slot = self.client.keyslot(self._key("revoked", t))
            by_node.setdefault(self.client.nodes_manager.get_node_from_slot(slot).name, []).append(t)
        out: Dict[str, bool] = {}
        for name, ids in by_node.items():
            try:
                values = self.client.mget_nonatomic([self._key("revoked", t) for t in ids])
            except CLUSTER_TRANSIENT as exc:
                log.warning("revocations on %s not read (%s): its tasks run unless revoked elsewhere",
                            name, exc)
                continue
            out.update({t: v == b"1" for t, v in zip(ids, values) if v is not None})
        return out

    def close(self) -> None:
        self._close_coordination()
        self.pool.disconnect(inuse_connections=False)

