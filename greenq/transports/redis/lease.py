"""The periodic scheduler's lease on redis (greenq/leases.py tells what a lease is)."""
from __future__ import annotations

import logging
from typing import Any, Dict

from ...leases import CLOCK_SLACK, Lease, encode_slot

log = logging.getLogger("greenq.beat")

# A lease key that is not a string, has no expiry, or expires later than the
# lease's duration (ARGV[3] ms: ttl + CLOCK_SLACK) from now was not written by
# a scheduler's renewal: it counts as free.
_REDIS_ACQUIRE = """
local ttl = redis.call('PTTL', KEYS[1])
if redis.call('TYPE', KEYS[1]).ok ~= 'string' or ttl == -1 or ttl > tonumber(ARGV[3]) then
  redis.call('DEL', KEYS[1])
end
local current = redis.call('GET', KEYS[1])
if not current then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 1 end
if current == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end
return 0
"""
_REDIS_RECORD = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
local kind = redis.call('TYPE', KEYS[2]).ok
if kind ~= 'hash' and kind ~= 'none' then redis.call('DEL', KEYS[2]) end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
return 1
"""
_REDIS_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
"""


class RedisLease(Lease):
    def __init__(self, url: str, config: Any, ttl: float, driver: Any = None) -> None:
        super().__init__(url, config, ttl, driver)
        import redis
        timeout = config.section("redis")["socket_timeout"] or None
        self.client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout,
                                           socket_keepalive=True)
        prefix = config.key_prefix
        self.keys = [f"{prefix}:beat:lease", f"{prefix}:beat:runs"]
        self._acquire = self.client.register_script(_REDIS_ACQUIRE)
        self._record = self.client.register_script(_REDIS_RECORD)
        self._release = self.client.register_script(_REDIS_RELEASE)

    def acquire(self, holder: str) -> bool:
        return bool(self._acquire(keys=self.keys[:1], args=[holder, int(self.ttl * 1000),
                                                            int((self.ttl + CLOCK_SLACK) * 1000)]))

    def release(self, holder: str) -> None:
        self._release(keys=self.keys[:1], args=[holder])

    def last_runs(self) -> Dict[str, float]:
        import redis
        try:
            rows = self.client.hgetall(self.keys[1]).items()
        except redis.ResponseError as exc:          # not a hash: replaced at the next record
            log.warning("scheduler: %s is not a hash of last runs (%s): ignored", self.keys[1], exc)
            return {}
        return self._runs(rows)

    def record(self, holder: str, entry: str, slot: float) -> bool:
        return bool(self._record(keys=self.keys, args=[holder, entry, encode_slot(self.signer, entry, slot)]))

    def close(self) -> None:
        self.client.close()
