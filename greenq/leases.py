"""The scheduler's lease and its record of runs sent, kept in the broker
(greenq/beat.py).  Each implementation opens connections of its own:

* ``memory://`` -- in-process (schedulers in one process: users' tests);
* ``sqlite://`` -- tables ``beat_lease`` (name, holder, expires_at) and
  ``beat_runs`` (entry, slot) in the broker's file (``P_beat_lease``...
  under a key_prefix P other than ``greenq``), changed in short
  ``BEGIN IMMEDIATE`` transactions;
* ``redis://`` -- ``P:beat:lease`` (the holder, ``SET NX PX``, renewed by a
  script only by its holder) and ``P:beat:runs`` (hash entry -> slot, written
  by a script only while the writer holds the lease);
* ``amqp://`` -- the lease is the exclusive queue ``P.beat.lock``: only
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
from .drivers.base import UsesDriver
from .exceptions import ConfigError, MessageError
from .signing import Signer

if TYPE_CHECKING:  # pragma: no cover
    from .app import GreenQ

log = logging.getLogger("greenq.beat")

#: seconds by which a lease's expiry may exceed ``now + ttl`` (clocks of two
#: schedulers a little apart) before the lease counts as implausible
CLOCK_SLACK = 1.0
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
        return raw
    try:
        return bytes(raw).decode("utf-8")
    except (UnicodeDecodeError, TypeError, ValueError):
        log.warning("scheduler: a last-run record names no entry (%r): ignored", raw)
        return None


class Lease(UsesDriver):
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


def make_lease(app: "GreenQ", ttl: float) -> Lease:
    """The lease in ``app``'s broker."""
    from . import transports
    url = app.config.broker_url
    if transports.capability_of(url, "scheduler_lease", app.config) is None:
        raise ConfigError(f"periodic tasks: no scheduler lease for broker {url.split(':', 1)[0]}://")
    cls: Type[Lease] = transports.load(url, "scheduler_lease", "periodic tasks", app.config)
    return cls(url, app.config, ttl, app.driver)
