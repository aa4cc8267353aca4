"""Coordination between processes: the three primitives greenq builds its
fleet-wide features on, implemented once per transport
(greenq/transports/<technology>/coordination.py) and checked by one shared
suite (tests/integration/test_coordination_suite.py).

* **Counted lease** (``acquire`` / ``renew`` / ``release``): at most
  ``limit`` holders of ``name`` at once.  The scheduler's leadership is a
  lease of limit 1; resource permits (issue 20) are leases of limit N.
* **Add-once set** (``add_once``): add a member to a set and learn, in the
  same atomic step, whether it was new and how many members the set has.
  Chords count their finished members with it: a member run twice (its
  worker died before the ack) counts once.
* **Compare-and-set record** (``read`` / ``compare_and_set``): a small
  mapping of text fields to bytes, replaced whole only if it still is what
  the writer read.  The scheduler's last runs and a chord's completer live
  in records.

Names are the caller's (``"beat:lease"``, ``"chord:<group id>"``); each
implementation keeps them under ``[greenq] key_prefix`` so that apps sharing
a server never share a lease.  A name is used for one kind of primitive only.

What is promised under failure (the reason this interface exists):

* A holder that dies (kill -9, a lost machine) loses its counted lease at
  most ``ttl`` seconds after it last acquired or renewed it, and never
  before: a live holder renews well inside ``ttl``.  ``limit`` is never
  exceeded by holders whose lease has not run out, however many processes
  acquire at once.  A holder whose clock or connection stalls for longer
  than ``ttl`` may find its lease gone: ``renew`` then says False, and the
  holder must stop what the lease guarded.
* ``add_once`` is atomic: of concurrent calls adding the same member,
  exactly one gets ``added=True``; the count returned includes the member
  and never goes down while the set lives.
* ``compare_and_set`` returns whether it wrote; when two writers race from
  the same read, exactly one wins.  A record of any other shape found in the
  store (written by hand, a different version) counts as empty and is
  replaced by the next write.
* Sets and records given a ``ttl`` disappear that many seconds after their
  last write (None: kept until ``forget``).  An empty record and an absent
  one are the same.

With ``[greenq] signing_key`` set, :func:`make_coordination` (and every user
of a transport's coordination: result backends, the scheduler's leadership)
wraps the transport's primitives in :class:`SignedCoordination`, so that
someone who can write to the broker but has no key cannot plant or alter
what changes behaviour (docs/protocol.md, "Coordination records"):

* a record's values are wrapped (greenq/signing.py, domain
  ``coordination:<name>:<field>``): a field whose value is unsigned, forged
  or copied from another record or field is left out of ``read`` (logged
  once), and the next ``compare_and_set`` replaces it;
* a set's members are kept as ``<member>~<tag>`` (an HMAC of the set's name
  and the member): members without a good tag are not counted by
  ``add_once`` (to keep ``add_once`` one round trip, a caller passing
  ``enough`` has the members read and checked only once the raw count
  reaches ``enough``: below it the count may include unchecked ones);
* a lease's holders are kept as ``<holder>~<tag>``: when ``acquire`` finds
  the lease full, places whose holder has no good tag are given back (at
  most once per ``ttl / 2`` per lease and instance) and it tries again.

Without a key nothing is wrapped: what is stored is exactly what it was.
"""
from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Tuple

from .drivers.base import UsesDriver
from .exceptions import ConfigError, MessageError
from .signing import Signer

if TYPE_CHECKING:  # pragma: no cover
    from .config import Config
    from .drivers.base import Driver

log = logging.getLogger("greenq.coordination")

#: a compare-and-set record: text field -> bytes value
Record = Dict[str, bytes]
#: seconds by which a lease's expiry may exceed ``now + ttl`` (clocks of two
#: processes a little apart) before the lease counts as implausible, and free
CLOCK_SLACK = 1.0


class Coordination(UsesDriver, ABC):
    """One transport's coordination primitives (see the module docstring).
    Every method may raise the transport's connection errors; none retries
    on its own: the caller decides (a scheduler tries again at its next tick)."""

    #: True when records, members and holders are signed (SignedCoordination)
    signed = False

    def __init__(self, url: str, config: "Config", driver: Optional["Driver"] = None) -> None:
        self.url = url
        self.config = config
        self.driver = driver

    def stored_member(self, name: str, member: str) -> str:
        """``member`` of set ``name`` as kept in the store (here: as it is;
        signed: with its tag), for a caller that adds it by its own means
        (the Redis result backend's chord script)."""
        return member

    # -- counted lease -----------------------------------------------------------
    @abstractmethod
    def acquire(self, name: str, holder: str, limit: int, ttl: float) -> bool:
        """Take one of ``limit`` places of lease ``name`` for ``holder`` for
        ``ttl`` seconds; True when ``holder`` holds one now.  A holder that
        already holds a place keeps it and has it renewed (acquire is
        idempotent); a full lease answers False at once (never waits).
        ``holder`` must be unique to one holder (host, pid and a random part)."""
        raise NotImplementedError

    @abstractmethod
    def renew(self, name: str, holder: str, ttl: float) -> bool:
        """Extend ``holder``'s place for ``ttl`` seconds from now; False
        (and nothing changed) when it holds none, for instance because its
        lease ran out and another holder took the place."""
        raise NotImplementedError

    @abstractmethod
    def release(self, name: str, holder: str) -> None:
        """Give ``holder``'s place back at once; nothing when it holds none."""
        raise NotImplementedError

    # -- add-once set --------------------------------------------------------------
    @abstractmethod
    def add_once(self, name: str, member: str, ttl: Optional[float] = None,
                 enough: Optional[int] = None) -> Tuple[bool, int]:
        """Add ``member`` to set ``name``: ``(added, count)``, ``added`` False
        when it was a member already, ``count`` the members after the add,
        both read in the same atomic step.  ``ttl``: the set disappears that
        long after its last add.  ``enough``: the caller only asks whether
        the count reaches it (a chord's size); signed, a count below it may
        include members whose tag was not checked (see the module docstring)."""
        raise NotImplementedError

    # -- what is stored, as it is (for SignedCoordination's checks) -----------------
    def members(self, name: str) -> List[str]:
        """The members of set ``name`` as stored."""
        raise NotImplementedError(f"{type(self).__name__}: no members()")

    def holders(self, name: str, limit: int) -> List[str]:
        """The holders of the live places of lease ``name`` as stored ([] where
        a place stores no holder id: RabbitMQ's are its connections)."""
        return []

    # -- compare-and-set record ------------------------------------------------
    @abstractmethod
    def read(self, name: str) -> Record:
        """Record ``name`` ({} when absent, expired or not a record)."""
        raise NotImplementedError

    @abstractmethod
    def compare_and_set(self, name: str, expected: Mapping[str, bytes], new: Mapping[str, bytes],
                        ttl: Optional[float] = None) -> bool:
        """Replace record ``name`` by ``new`` (``{}``: delete it) if it is
        ``expected`` now; True when it wrote.  ``ttl``: the record
        disappears that long after this write."""
        raise NotImplementedError

    # -- both ------------------------------------------------------------------
    @abstractmethod
    def forget(self, name: str) -> None:
        """Delete set or record ``name`` (a chord's count when its group is forgotten)."""
        raise NotImplementedError

    def close(self) -> None:
        """Release connections."""


#: separates a signed member or holder from its tag
TAG_SEP = "~"
#: names whose raw record SignedCoordination remembers (see _seen), and whose
#: refusal it has logged, per instance (the oldest are dropped)
REMEMBERED = 1024


class SignedCoordination(Coordination):
    """A transport's coordination with its records, set members and lease
    holders authenticated (see the module docstring).  ``inner`` does the
    storing; any attribute this class lacks is ``inner``'s (``key`` on
    Redis, ``reset`` on memory)."""

    signed = True

    def __init__(self, inner: Coordination, signer: Signer) -> None:
        super().__init__(inner.url, inner.config, inner.driver)
        self.inner = inner
        self.signer = signer
        #: name -> (the record as read, checked; as stored) when the two differ
        #: otherwise than by wrapping with the signing key (a refused field, a
        #: value signed with an older key): compare_and_set must expect what
        #: is stored
        self._seen: "OrderedDict[str, Tuple[Record, Record]]" = OrderedDict()
        self._logged: "OrderedDict[Tuple[str, str], None]" = OrderedDict()
        self._holders_checked: Dict[str, float] = {}   # lease -> monotonic time of the last check

    def __getattr__(self, attr: str) -> Any:
        if attr == "inner":          # not set yet (a copy being made): no recursion
            raise AttributeError(attr)
        return getattr(self.inner, attr)

    # -- tags ------------------------------------------------------------------------
    def _tagged(self, kind: str, name: str, value: str) -> str:
        data = f"coordination-{kind}:{name}\0{value}".encode("utf-8", "surrogateescape")
        return f"{value}{TAG_SEP}{self.signer.tag(data)}"

    def _good(self, kind: str, name: str, stored: str) -> bool:
        value, sep, tag = stored.rpartition(TAG_SEP)
        return bool(sep) and self.signer.verify(f"coordination-{kind}:{name}\0{value}".encode(
            "utf-8", "surrogateescape"), tag)

    def _refused(self, name: str, what: str, count: int = 1) -> None:
        """Log, once per name and kind of entry, that something was refused."""
        key = (name, what)
        if key in self._logged:
            return
        self._logged[key] = None
        if len(self._logged) > REMEMBERED:
            self._logged.popitem(last=False)
        from .config import mask_url
        log.warning("coordination: %s of %r in %s: %d unsigned or forged, ignored (signing_key is set; "
                    "logged once)", what, name, mask_url(self.url), count)

    def stored_member(self, name: str, member: str) -> str:
        return self._tagged("member", name, member)

    # -- counted lease -----------------------------------------------------------------
    def acquire(self, name: str, holder: str, limit: int, ttl: float) -> bool:
        mine = self._tagged("holder", name, holder)
        if self.inner.acquire(name, mine, limit, ttl):
            return True
        now = time.monotonic()
        if now - self._holders_checked.get(name, -ttl) < ttl / 2:
            return False
        self._holders_checked[name] = now
        forged = [h for h in self.inner.holders(name, limit) if not self._good("holder", name, h)]
        if not forged:
            return False
        self._refused(name, "lease holders", len(forged))
        for h in forged:
            self.inner.release(name, h)
        return self.inner.acquire(name, mine, limit, ttl)

    def renew(self, name: str, holder: str, ttl: float) -> bool:
        return self.inner.renew(name, self._tagged("holder", name, holder), ttl)

    def release(self, name: str, holder: str) -> None:
        self.inner.release(name, self._tagged("holder", name, holder))

    def holders(self, name: str, limit: int) -> List[str]:
        """The holders with a good tag, without it."""
        return [h.rpartition(TAG_SEP)[0] for h in self.inner.holders(name, limit) if self._good("holder", name, h)]

    # -- add-once set --------------------------------------------------------------
    def add_once(self, name: str, member: str, ttl: Optional[float] = None,
                 enough: Optional[int] = None) -> Tuple[bool, int]:
        added, count = self.inner.add_once(name, self._tagged("member", name, member), ttl)
        if enough is not None and count < enough:
            return added, count           # the forged ones can only make it larger
        stored = self.inner.members(name)
        good = sum(1 for m in stored if self._good("member", name, m))
        if good < len(stored):
            self._refused(name, "set members", len(stored) - good)
        return added, good

    def members(self, name: str) -> List[str]:
        """The members with a good tag, without it."""
        return [m.rpartition(TAG_SEP)[0] for m in self.inner.members(name) if self._good("member", name, m)]

    # -- compare-and-set record ------------------------------------------------
    def _wrap(self, name: str, field: str, value: bytes) -> bytes:
        return self.signer.wrap(f"coordination:{name}:{field}", bytes(value))

    def read(self, name: str) -> Record:
        stored = self.inner.read(name)
        record: Record = {}
        refused = 0
        for field, value in stored.items():
            try:
                record[field] = self.signer.unwrap(f"coordination:{name}:{field}", value, "coordination record")
            except MessageError:
                refused += 1
        if refused:
            self._refused(name, "record fields", refused)
        if refused or any(self._wrap(name, f, v) != stored[f] for f, v in record.items()):
            self._seen[name] = (dict(record), dict(stored))
            if len(self._seen) > REMEMBERED:
                self._seen.popitem(last=False)
        else:
            self._seen.pop(name, None)
        return record

    def compare_and_set(self, name: str, expected: Mapping[str, bytes], new: Mapping[str, bytes],
                        ttl: Optional[float] = None) -> bool:
        seen = self._seen.get(name)
        if seen is not None and seen[0] == dict(expected):
            stored_expected = seen[1]
        else:
            stored_expected = {f: self._wrap(name, f, v) for f, v in expected.items()}
        wrote = self.inner.compare_and_set(name, stored_expected, {f: self._wrap(name, f, v) for f, v in new.items()},
                                           ttl)
        if wrote:
            self._seen.pop(name, None)
        return wrote

    def forget(self, name: str) -> None:
        self._seen.pop(name, None)
        self.inner.forget(name)

    def close(self) -> None:
        self.inner.close()


def signed_coordination(coordination: Coordination, config: "Config") -> Coordination:
    """``coordination`` wrapped in SignedCoordination when ``config`` has a
    signing key (once: a wrapped one is returned as it is)."""
    if coordination.signed:
        return coordination
    signer = Signer(getattr(config, "signing_key", ""))
    return SignedCoordination(coordination, signer) if signer else coordination


def unsigned_coordination(coordination: Coordination) -> Coordination:
    """The transport's own primitives under ``coordination`` (for a record
    whose values carry a signature of their own: the scheduler's runs)."""
    inner: Coordination = getattr(coordination, "inner", coordination)
    return inner


def make_coordination(url: str, config: "Config", driver: Optional["Driver"] = None) -> Coordination:
    """The coordination of the transport serving ``url`` (a broker or result
    backend URL), signed when ``config`` has a signing key; ConfigError when
    that transport has none."""
    from . import transports
    if transports.capability_of(url, "coordination", config) is None:
        raise ConfigError(f"coordination: the transport of {url.split(':', 1)[0]}:// has none")
    cls = transports.load(url, "coordination", "coordination", config)
    coordination: Coordination = cls(url, config, driver)
    return signed_coordination(coordination, config)


__all__ = ["CLOCK_SLACK", "Coordination", "Record", "SignedCoordination", "make_coordination",
           "signed_coordination", "unsigned_coordination"]
