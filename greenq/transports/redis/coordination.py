"""Coordination on Redis (greenq/coordination.py tells the contract).

Keys (``P`` is ``[greenq] key_prefix``; a name is the caller's)::

    P:<name>, P:<name>:1 ... P:<name>:<limit-1>
                 a counted lease's places: strings holding each holder's id,
                 with the lease's expiry (PX).  A lease of limit 1 is the one
                 key P:<name>: the scheduler's ``P:beat:lease`` is the same key,
                 written the same way, as before coordination existed.
    P:<name>     an add-once set (SADD/SCARD), or a compare-and-set record
                 (a hash: field -> value), e.g. ``P:chord:<group id>`` and
                 ``P:chordstate:<group id>`` (fields completer, sent).

Each operation is one script (scripts/coordination_*.lua, read once from
the package and sent by SHA), so it is atomic on the server; expiry is the
server's own (PX), so the clocks of the holders do not matter.  A holder
remembers which place it took and renews that key alone; another instance
(a restarted process) looks through the places of the largest limit it has
seen for the name.

On Redis Cluster every place of one lease must hash to one slot: a name
holding ``{...}`` is used as it is, any other is wrapped as ``{name}``
(``RedisClusterCoordination``).
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Tuple

from ...coordination import CLOCK_SLACK, Coordination, Record

if TYPE_CHECKING:  # pragma: no cover
    from ...config import Config
    from ...drivers.base import Driver

SCRIPTS = ("acquire", "renew", "add_once", "compare_and_set")
_HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts")
_TEXT: Dict[str, str] = {}


def script_text(name: str) -> str:
    """The text of ``scripts/coordination_<name>.lua``, read once per process."""
    text = _TEXT.get(name)
    if text is None:
        with open(os.path.join(_HERE, f"coordination_{name}.lua"), encoding="utf-8") as f:
            text = _TEXT[name] = f.read()
    return text


def _ms(seconds: Optional[float]) -> int:
    return max(1, int(seconds * 1000)) if seconds else 0


class RedisCoordination(Coordination):
    """See the module docstring.  ``client``: a redis-py client to share
    (a result backend's); by default one of its own, from the URL."""

    def __init__(self, url: str, config: "Config", driver: Optional["Driver"] = None,
                 client: Any = None) -> None:
        super().__init__(url, config, driver)
        self.prefix = config.key_prefix
        self._own = client is None
        if client is None:
            from .client import make_client
            client = make_client(url, config, "coordination")
        self.client = client
        self._scripts = {name: client.register_script(script_text(name)) for name in SCRIPTS}
        self._places: Dict[Tuple[str, str], int] = {}   # (name, holder) -> the place it took
        self._limits: Dict[str, int] = {}                # name -> the largest limit seen

    def key(self, name: str) -> str:
        return f"{self.prefix}:{name}"

    def place_keys(self, name: str, limit: int) -> List[str]:
        base = self.key(name)
        return [base] + [f"{base}:{i}" for i in range(1, limit)]

    def _call(self, script: str, keys: List[str], args: List[Any]) -> Any:
        # (redis-py is cooperative once patched: no thread hop, like the broker's calls)
        return self._scripts[script](keys=keys, args=args)

    # -- counted lease -----------------------------------------------------------
    def acquire(self, name: str, holder: str, limit: int, ttl: float) -> bool:
        if limit < 1:
            return False
        self._limits[name] = max(limit, self._limits.get(name, 1))
        place = int(self._call("acquire", self.place_keys(name, limit),
                               [holder, _ms(ttl), _ms(ttl + CLOCK_SLACK)]))
        if place:
            self._places[(name, holder)] = place - 1
        else:
            self._places.pop((name, holder), None)
        return bool(place)

    def _where(self, name: str, holder: str) -> List[str]:
        """The keys where ``holder`` may hold a place of ``name``."""
        place = self._places.get((name, holder))
        keys = self.place_keys(name, self._limits.get(name, 1))
        return [keys[place]] if place is not None and place < len(keys) else keys

    def renew(self, name: str, holder: str, ttl: float) -> bool:
        place = int(self._call("renew", self._where(name, holder), [holder, _ms(ttl)]))
        if not place:
            self._places.pop((name, holder), None)
        return bool(place)

    def release(self, name: str, holder: str) -> None:
        self._call("renew", self._where(name, holder), [holder, 0])
        self._places.pop((name, holder), None)

    # -- add-once set --------------------------------------------------------------
    def add_once(self, name: str, member: str, ttl: Optional[float] = None,
                 enough: Optional[int] = None) -> Tuple[bool, int]:
        added, count = self._call("add_once", [self.key(name)], [member, _ms(ttl)])
        return bool(added), int(count)

    def members(self, name: str) -> List[str]:
        import redis
        try:
            return sorted(_text(m) for m in self.client.smembers(self.key(name)))
        except redis.ResponseError:           # not a set: counts as empty
            return []

    def holders(self, name: str, limit: int) -> List[str]:
        values = self.client.mget(self.place_keys(name, limit))   # a key not a string reads as None
        return [_text(v) for v in values if v is not None]

    # -- compare-and-set record ------------------------------------------------
    def read(self, name: str) -> Record:
        import redis
        try:
            flat = self.client.hgetall(self.key(name))
        except redis.ResponseError:           # not a hash: counts as empty
            return {}
        return {_text(field): bytes(value) for field, value in flat.items()}

    def compare_and_set(self, name: str, expected: Mapping[str, bytes], new: Mapping[str, bytes],
                        ttl: Optional[float] = None) -> bool:
        args: List[Any] = [_ms(ttl), len(expected)]
        for record in (expected, new):
            for field, value in record.items():
                args += [field.encode("utf-8", "surrogateescape"), bytes(value)]
        return bool(self._call("compare_and_set", [self.key(name)], args))

    def forget(self, name: str) -> None:
        self.client.delete(self.key(name))

    def close(self) -> None:
        if self._own:
            self.client.close()


class RedisClusterCoordination(RedisCoordination):
    """On Redis Cluster: every key of a name in one slot (see the module docstring)."""

    def __init__(self, url: str, config: "Config", driver: Optional["Driver"] = None,
                 client: Any = None) -> None:
        made = client is None
        if client is None:
            from .topology import make_cluster_client
            client = make_cluster_client(url, config, "coordination")
        super().__init__(url, config, driver, client)
        self._own = made

    def key(self, name: str) -> str:
        return f"{self.prefix}:{name}" if "{" in name else f"{self.prefix}:{{{name}}}"


class RedisSentinelCoordination(RedisCoordination):
    """On Sentinel: the client of the master the sentinels name."""

    def __init__(self, url: str, config: "Config", driver: Optional["Driver"] = None,
                 client: Any = None) -> None:
        made = client is None
        if client is None:
            from .topology import make_sentinel_client
            client = make_sentinel_client(url, config, "coordination")
        super().__init__(url, config, driver, client)
        self._own = made


def _text(raw: Any) -> str:
    """A field name as text; bytes that are not UTF-8 are kept (surrogateescape),
    so that a record written back by compare-and-set has exactly the fields read."""
    return raw.decode("utf-8", "surrogateescape") if isinstance(raw, bytes) else str(raw)
