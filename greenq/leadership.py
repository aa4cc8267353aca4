"""The scheduler's leadership and its record of runs sent, kept in the broker
(greenq/beat.py).

On memory, SQLite and Redis the lease is built on the broker's coordination
(greenq/coordination.py; :class:`CoordinatedLeadership`): a counted lease of
limit 1 named ``beat:lease`` and a compare-and-set record ``beat:runs``
(entry -> the stored last slot), written only after the writer renewed the
lease and only if nobody wrote it since the writer read it:

* ``memory://`` -- in-process (schedulers in one process: users' tests);
* ``sqlite://`` -- rows of the ``leases`` and ``records`` tables of the
  broker's file (``P_leases``... under a key_prefix P other than ``greenq``);
  a file whose last runs were kept in the ``beat_runs`` table before has them
  copied over once (greenq/transports/sqlite/coordination.py);
* ``redis://`` -- ``P:beat:lease`` (the holder, ``SET NX PX``, renewed by a
  script only by its holder) and ``P:beat:runs`` (hash entry -> slot): the
  same keys, written the same way, as before coordination existed.
* ``amqp://`` -- (not on the coordination interface; greenq/transports/amqp/leadership.py says why)
  the lease is the exclusive queue ``P.beat.lock``: only
  one connection can hold it, and RabbitMQ deletes it when that connection
  dies (heartbeats of ``ttl / 2`` seconds find a dead holder within about
  ``ttl``).  Runs sent live in the durable queue ``P.beat.state`` as
  JSON messages that the holder takes unacknowledged; each change publishes
  a new one (confirmed) before acknowledging the old, so a holder dying
  leaves at least one behind and the next holder merges what it finds.

``acquire(holder)`` takes the lease when free or expired and renews it when
``holder`` has it; True while ``holder`` holds it.  ``record`` writes only
while the writer holds the lease (a fenced write) and says whether it did.
``P`` is ``[greenq] key_prefix`` (default ``greenq``).

What is read back is checked, never trusted: a lease whose expiry lies more
than its duration (plus ``CLOCK_SLACK``) ahead -- written by a scheduler whose
clock was fast, or by hand without an expiry -- counts as expired; a last-run
value that is not finite epoch seconds is logged and counts as absent for
that entry alone.  With ``signing_key``, each last-run record is signed
(``greenq.signing.Signer``, domain ``schedule``, bound to its entry's name)
and a record unsigned or forged is logged and ignored.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Dict, Optional, Type

from . import validation
from .coordination import Coordination, Record, make_coordination, signed_coordination, unsigned_coordination
from .drivers.base import UsesDriver
from .exceptions import ConfigError, MessageError
from .signing import Signer

if TYPE_CHECKING:  # pragma: no cover
    from .app import GreenQ

log = logging.getLogger("greenq.beat")

#: (CLOCK_SLACK, from greenq.coordination: how far ahead a lease's expiry may lie)
#: the signing domain of scheduler records
DOMAIN = "schedule"


def check_slot(entry: str, value: Any) -> Optional[float]:
    """``value`` as a slot (finite epoch seconds), or None, logged, when it
    is anything else: one garbage record never stops the other entries."""
    try:
        number = float(value)
        return validation.epoch("slot", number)
    except (TypeError, ValueError, OverflowError) as exc:
        log.warning("scheduler: last-run record of %r is not a time (%s): ignored", entry, exc)
        return None


def encode_slot(signer: Signer, entry: str, slot: float) -> bytes:
    """The stored form of a last-run record: the slot's text; signed (and
    bound to ``entry``, so it cannot be copied onto another entry) with a key."""
    text = repr(float(slot)).encode()
    return signer.wrap(DOMAIN, entry.encode() + b"\0" + text) if signer else text


def decode_slot(signer: Signer, entry: str, raw: Any) -> Optional[float]:
    """The slot of a stored last-run record, or None (logged) when it is
    garbage, unsigned or forged (with a key), or signed for another entry."""
    data = raw if isinstance(raw, bytes) else str(raw).encode("utf-8", "replace")
    try:
        payload = signer.unwrap(DOMAIN, data, f"last-run record of {entry!r}")
    except MessageError as exc:
        log.warning("scheduler: %s: ignored", exc)
        return None
    owner, sep, text = payload.rpartition(b"\0")
    if sep and owner != entry.encode():
        log.warning("scheduler: last-run record of %r is signed for another entry: ignored", entry)
        return None
    return check_slot(entry, text.decode("ascii", "replace"))


def entry_name(raw: Any) -> Optional[str]:
    """A stored entry name as text; None (logged) when it is not UTF-8."""
    if isinstance(raw, str):
        try:
            raw.encode("utf-8")          # a name read with surrogateescape (Redis) was not UTF-8
        except UnicodeEncodeError:
            log.warning("scheduler: a last-run record names no entry (%r): ignored", raw)
            return None
        return raw
    try:
        return bytes(raw).decode("utf-8")
    except (UnicodeDecodeError, TypeError, ValueError):
        log.warning("scheduler: a last-run record names no entry (%r): ignored", raw)
        return None


class Leadership(UsesDriver):
    """One named lease and the runs its holders sent."""

    def __init__(self, url: str, config: Any, ttl: float, driver: Any = None) -> None:
        self.url = url
        self.config = config
        self.ttl = ttl
        self.driver = driver
        self.signer = Signer(getattr(config, "signing_key", ""))

    def _runs(self, rows: Any) -> Dict[str, float]:
        """``{entry: slot}`` of stored ``(entry, value)`` rows, each checked
        by decode_slot; a bad row is left out alone."""
        runs: Dict[str, float] = {}
        for raw_entry, raw_slot in rows:
            entry = entry_name(raw_entry)
            slot = None if entry is None else decode_slot(self.signer, entry, raw_slot)
            if slot is not None and entry is not None:
                runs[entry] = slot
        return runs

    def acquire(self, holder: str) -> bool:
        raise NotImplementedError

    def release(self, holder: str) -> None:
        raise NotImplementedError

    def last_runs(self) -> Dict[str, float]:
        raise NotImplementedError

    def record(self, holder: str, entry: str, slot: float) -> bool:
        raise NotImplementedError

    def close(self) -> None:
        """Release connections."""


class CoordinatedLeadership(Leadership):
    """The lease on a transport's coordination (see the module docstring).

    The lease is a counted lease of limit 1 (``LEASE``); the runs are one
    compare-and-set record (``RUNS``).  ``record`` renews the lease, then
    writes the runs it last read plus the new one, only if they are still
    what it read: a holder that lost the lease, or whose view is stale
    (another scheduler wrote meanwhile), writes nothing and says False (the
    scheduler then stands by until its next tick)."""

    LEASE = "beat:lease"
    RUNS = "beat:runs"

    def __init__(self, url: str, config: Any, ttl: float, driver: Any = None,
                 coordination: Optional[Coordination] = None) -> None:
        super().__init__(url, config, ttl, driver)
        #: the lease's holders are signed with a signing key (SignedCoordination);
        #: the runs record's values carry their own signature (encode_slot,
        #: checked by decode_slot), so it is kept on the transport's own primitives
        self.coordination = signed_coordination(coordination or make_coordination(url, config, driver), config)
        self._records = unsigned_coordination(self.coordination)
        self._seen: Optional[Record] = None     # the runs record as last read or written

    def acquire(self, holder: str) -> bool:
        return self.coordination.acquire(self.LEASE, holder, 1, self.ttl)

    def release(self, holder: str) -> None:
        self.coordination.release(self.LEASE, holder)

    def last_runs(self) -> Dict[str, float]:
        self._seen = self._records.read(self.RUNS)
        return self._runs(self._seen.items())

    def record(self, holder: str, entry: str, slot: float) -> bool:
        if not self.coordination.renew(self.LEASE, holder, self.ttl):
            return False
        seen = self._seen if self._seen is not None else self._records.read(self.RUNS)
        runs = dict(seen, **{entry: encode_slot(self.signer, entry, slot)})
        if self._records.compare_and_set(self.RUNS, seen, runs):
            self._seen = runs
            return True
        self._seen = None
        return False

    def close(self) -> None:
        self.coordination.close()


def make_leadership(app: "GreenQ", ttl: float) -> Leadership:
    """The lease in ``app``'s broker."""
    from . import transports
    url = app.config.broker_url
    if transports.capability_of(url, "leadership", app.config) is None:
        raise ConfigError(f"periodic tasks: no scheduler leadership for broker {url.split(':', 1)[0]}://")
    cls: Type[Leadership] = transports.load(url, "leadership", "periodic tasks", app.config)
    return cls(url, app.config, ttl, app.driver)
