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
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Dict, Mapping, Optional, Tuple

from .drivers.base import UsesDriver
from .exceptions import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from .config import Config
    from .drivers.base import Driver

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
    def add_once(self, name: str, member: str, ttl: Optional[float] = None) -> Tuple[bool, int]:
        """Add ``member`` to set ``name``: ``(added, count)``, ``added`` False
        when it was a member already, ``count`` the members after the add,
        both read in the same atomic step.  ``ttl``: the set disappears that
        long after its last add."""
        raise NotImplementedError

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


def make_coordination(url: str, config: "Config", driver: Optional["Driver"] = None) -> Coordination:
    """The coordination of the transport serving ``url`` (a broker or result
    backend URL); ConfigError when that transport has none."""
    from . import transports
    if transports.capability_of(url, "coordination", config) is None:
        raise ConfigError(f"coordination: the transport of {url.split(':', 1)[0]}:// has none")
    cls = transports.load(url, "coordination", "coordination", config)
    coordination: Coordination = cls(url, config, driver)
    return coordination


__all__ = ["CLOCK_SLACK", "Coordination", "Record", "make_coordination"]
