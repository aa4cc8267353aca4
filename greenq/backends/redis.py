"""``redis://`` and ``rediss://`` result backend.

Keys (``P`` is ``[greenq] key_prefix``)::

    P:result:<task id>   string, "F" (final) or "P" (not final) + the record;
                         expires after result_expires (0 = never)
    P:waiting:<task id>  counter: how many waits are blocked on the task
    P:notify:<task id>   list; a final store pushes one token per waiter
                         (expires after NOTIFY_TTL)
    P:revoked:<task id>  "1" (terminate) or "0"; expires after result_expires

``wait`` never polls: one script returns the record if it is final, else
counts the caller in ``waiting``; then it blocks in BLPOP on ``notify``.  The store script (one
round trip for a whole batch) sets the record and, only when someone waits,
pushes their tokens, so results nobody waits for leave no extra keys.
"""
from __future__ import annotations

import time
from typing import Any, Dict, Optional, Sequence

from ..brokers.redis import FAILURES, TRANSIENT, make_client
from ..brokers._reconnect import Reconnector
from ..config import Config, mask_url
from .base import Record, ResultBackend

NOTIFY_TTL = 60   # seconds a wake-up token outlives the store

#: KEYS, per record: result, waiting, notify.  ARGV: expiry (s, 0 = none),
#: notify ttl, then per record its value.
STORE = """
local ex, ttl = tonumber(ARGV[1]), ARGV[2]
for i = 1, #KEYS / 3 do
  local value = ARGV[i + 2]
  if ex > 0 then
    redis.call('SET', KEYS[3 * i - 2], value, 'EX', ex)
  else
    redis.call('SET', KEYS[3 * i - 2], value)
  end
  if string.byte(value, 1) == 70 then  -- 'F': final, wake the waiters
    local n = tonumber(redis.call('GET', KEYS[3 * i - 1]) or '0')
    if n > 0 then
      redis.call('DEL', KEYS[3 * i - 1])
      for _ = 1, n do redis.call('RPUSH', KEYS[3 * i], '1') end
      redis.call('EXPIRE', KEYS[3 * i], ttl)
    end
  end
end
return #KEYS / 3
"""

#: The record when final; else count one more waiter.  KEYS: result, waiting.
#: ARGV: seconds the waiting counter lives.
CHECK_IN = """
local value = redis.call('GET', KEYS[1])
if value and string.byte(value, 1) == 70 then return value end
redis.call('INCR', KEYS[2])
redis.call('EXPIRE', KEYS[2], ARGV[1])
return false
"""

FINAL, PARTIAL = b"F", b"P"


class RedisBackend(ResultBackend):
    """Results, waits and revocations in Redis; see the module docstring."""

    schemes = ("redis", "rediss")

    def __init__(self, url: str, config: Config, driver: Any = None) -> None:
        super().__init__(url, config, driver)
        self.prefix = config.key_prefix
        self.expires = int(config.result_expires)
        self.client = make_client(url, config, "results")
        self.pool = self.client.connection_pool
        self.reconnector = Reconnector(f"redis result backend {mask_url(url)}", TRANSIENT,
                                       reset=lambda: self.pool.disconnect(inuse_connections=False), sleep=self._sleep,
                                       failures=FAILURES)
        self._timeout = config.section("redis")["socket_timeout"] or 30.0
        # BLPOP slices must end before the socket timeout fires
        self._block = self._timeout / 2 if config.section("redis")["socket_timeout"] else 5.0
        self._store_script = self.client.register_script(STORE)
        self._check_in_script = self.client.register_script(CHECK_IN)

    @property
    def healthy(self) -> bool:
        return self.reconnector.healthy

    @property
    def last_ok(self) -> float:
        return self.reconnector.last_ok

    def _call(self, fn, budget: Optional[float], what: str) -> Any:
        deadline = None if budget is None else time.monotonic() + budget
        return self.reconnector.call(fn, deadline, what)

    def _key(self, kind: str, task_id: str) -> str:
        return f"{self.prefix}:{kind}:{task_id}"

    # -- primitives ------------------------------------------------------------
    def _store_many(self, records: Sequence[Record]) -> None:
        keys, values = [], []
        for r in records:
            keys += [self._key("result", r.task_id), self._key("waiting", r.task_id),
                     self._key("notify", r.task_id)]
            values.append((FINAL if r.final else PARTIAL) + bytes(r.data))
        self._call(lambda: self._store_script(keys=keys, args=[self.expires, NOTIFY_TTL, *values]),
                   self._timeout, "store results")

    @staticmethod
    def _unwrap(value: Optional[bytes]) -> Optional[bytes]:
        return None if value is None else value[1:]

    def _get(self, task_id: str) -> Optional[bytes]:
        return self._unwrap(self._call(lambda: self.client.get(self._key("result", task_id)),
                                       self._timeout, "get result"))

    def _is_final(self, task_id: str) -> Optional[bytes]:
        value = self._call(lambda: self.client.get(self._key("result", task_id)), self._timeout, "get result")
        return value[1:] if value is not None and value[:1] == FINAL else None

    def _wait(self, task_id: str, timeout: Optional[float]) -> Optional[bytes]:
        """Read the record or count in as a waiter (one script), then block on
        the notify list, in slices shorter than the socket timeout."""
        result, waiting, notify = (self._key(k, task_id) for k in ("result", "waiting", "notify"))
        deadline = None if timeout is None else time.monotonic() + timeout

        while True:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0.001:
                return self._is_final(task_id)
            slice_s = self._block if left is None else min(self._block, left)
            value = self._call(lambda: self._check_in_script(
                keys=[result, waiting], args=[int(slice_s) + NOTIFY_TTL]), left, "wait for result")
            if value is not None:
                return value[1:]
            left = None if deadline is None else deadline - time.monotonic()
            slice_s = self._block if left is None else min(self._block, left)
            if slice_s > 0.001 and self._call(lambda: self.client.blpop([notify], timeout=slice_s),
                                              left, "wait for result"):
                value = self._is_final(task_id)     # woken by a final store
                if value is not None:
                    return value

    def _forget(self, task_id: str) -> None:
        self._call(lambda: self.client.delete(*(self._key(k, task_id) for k in
                                                ("result", "waiting", "notify"))),
                   self._timeout, "forget result")

    def _revoke(self, task_id: str, terminate: bool) -> None:
        self._call(lambda: self.client.set(self._key("revoked", task_id), b"1" if terminate else b"0",
                                           ex=self.expires or None), self._timeout, "revoke")

    def _revoked(self, task_ids: Sequence[str]) -> Dict[str, bool]:
        values = self._call(lambda: self.client.mget([self._key("revoked", t) for t in task_ids]),
                            self._timeout, "read revocations")
        return {t: v == b"1" for t, v in zip(task_ids, values) if v is not None}

    def close(self) -> None:
        self.pool.disconnect()
