"""Periodic tasks (CONTRACT section 7): the schedule and the scheduler.

Entries come from ``[schedule:NAME]`` INI sections and ``app.add_periodic``.
Each has *slots*, the instants it is due: multiples of ``every`` seconds
since the epoch, or the times a five-field ``cron`` expression names in its
``timezone`` (parsed by cronsim, with zoneinfo).

Any number of schedulers may run (``greenq beat``, ``greenq-worker --beat``).
One holds a lease kept in the broker (greenq/leases.py), renewed every tick
and lost ``LEASE_SECONDS`` after its holder stopped renewing it, so a
scheduler that dies hands over within a few seconds.  The lease store also
keeps, per entry, the last slot sent; only the lease holder writes it.  On
each tick the holder sends, for every entry whose latest slot at or before
now is after the last slot sent, *one* run, and records that slot: runs
missed while no scheduler was up are sent once, not once per slot.  A new
entry starts at its next slot.  A run's task id is ``beat-NAME-SLOT``, so a
run sent twice (its scheduler died between sending it and recording it) is
the same task id twice.
"""
from __future__ import annotations

import logging
import math
import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone as dt_timezone
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence

from .exceptions import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from .app import GreenQ
    from .leases import Lease

log = logging.getLogger("greenq.beat")

LEASE_SECONDS = 5.0      # a dead scheduler's lease is free this long after its last renewal
TICK_SECONDS = 1.0       # longest sleep between two looks at the schedule
#: apply_async options an entry may carry
ENTRY_OPTIONS = ("queue", "priority", "expires", "time_limit", "soft_time_limit")


@dataclass
class Entry:
    """One periodic task."""
    name: str
    task: str
    every: Optional[float] = None
    cron: Optional[str] = None
    timezone: str = "UTC"
    args: Sequence[Any] = ()
    kwargs: Dict[str, Any] = field(default_factory=dict)
    options: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        where = f"schedule entry {self.name!r}"
        if not self.task:
            raise ConfigError(f"{where}: no task")
        if (self.every is None) == (self.cron is None):
            raise ConfigError(f"{where}: give exactly one of every (seconds) and cron")
        if self.every is not None and not (isinstance(self.every, (int, float)) and self.every > 0):
            raise ConfigError(f"{where}: every = {self.every!r}: expected seconds > 0")
        unknown = set(self.options) - set(ENTRY_OPTIONS)
        if unknown:
            raise ConfigError(f"{where}: unknown option(s) {sorted(unknown)}; expected some of {list(ENTRY_OPTIONS)}")
        self._zone = _zone(where, self.timezone)
        if self.cron is not None:
            self.cron = self.cron.strip()
            self.next_after(time.time())          # a bad expression fails now, not at its first slot

    def next_after(self, t: float) -> float:
        """The first slot strictly after ``t`` (epoch seconds)."""
        if self.every is not None:
            return (math.floor(t / self.every) + 1) * self.every
        return _cron_after(self, datetime.fromtimestamp(math.floor(t), self._zone)).timestamp()

    def latest_at(self, t: float) -> Optional[float]:
        """The last slot at or before ``t`` (epoch seconds), or None."""
        if self.every is not None:
            return math.floor(t / self.every) * self.every
        start = datetime.fromtimestamp(math.floor(t) + 1, self._zone)   # cronsim's reverse excludes its start
        return next(iter(_cronsim(self, start, reverse=True))).timestamp()


def _zone(where: str, name: str) -> Any:
    if name.upper() == "UTC":
        return dt_timezone.utc
    try:
        from zoneinfo import ZoneInfo
        return ZoneInfo(name)
    except Exception as exc:
        raise ConfigError(f"{where}: timezone = {name!r}: {exc}") from None


def _cronsim(entry: Entry, start: datetime, reverse: bool = False) -> Any:
    try:
        from cronsim import CronSim, CronSimError
    except ImportError:  # pragma: no cover - depends on the install
        raise ConfigError(f"schedule entry {entry.name!r}: cron needs the cronsim package: "
                          f"pip install greenq[cron]") from None
    try:
        return CronSim(entry.cron, start, reverse=reverse)
    except CronSimError as exc:
        raise ConfigError(f"schedule entry {entry.name!r}: cron = {entry.cron!r}: {exc}") from None


def _cron_after(entry: Entry, start: datetime) -> datetime:
    return next(iter(_cronsim(entry, start)))


def entries(app: "GreenQ") -> List[Entry]:
    """Every entry: ``[schedule:NAME]`` sections, then ``app.add_periodic``
    ones (a name given twice: the code's wins)."""
    found: Dict[str, Entry] = {}
    for name, spec in app.config.schedules.items():
        spec = dict(spec)
        options = {k: spec.pop(k) for k in ENTRY_OPTIONS if spec.get(k) is not None}
        found[name] = Entry(name, spec.get("task") or "", spec.get("every"), spec.get("cron"),
                            spec.get("timezone") or "UTC", spec.get("args") or (), spec.get("kwargs") or {},
                            options)
    found.update(getattr(app, "periodic", {}))
    return list(found.values())


def scheduled(app: "GreenQ", now: Optional[float] = None, lease: Optional["Lease"] = None) -> List[Dict[str, Any]]:
    """The schedule with each entry's next run (for ``greenq inspect scheduled``
    and the dashboard): name, task, every or cron, timezone, last run sent
    (when ``lease`` is given) and next run, as epoch seconds."""
    now = time.time() if now is None else now
    last = lease.last_runs() if lease is not None else {}
    rows = []
    for entry in entries(app):
        sent = last.get(entry.name)
        latest = entry.latest_at(now)
        due_now = sent is not None and latest is not None and latest > sent
        rows.append({"name": entry.name, "task": entry.task, "every": entry.every, "cron": entry.cron,
                     "timezone": entry.timezone, "last_run": sent,
                     "next_run": now if due_now else entry.next_after(now)})
    return sorted(rows, key=lambda row: row["next_run"])


class Scheduler:
    """Sends each entry's runs while it holds the lease; see the module docstring."""

    def __init__(self, app: "GreenQ", lease: Optional["Lease"] = None, sleep: Any = None,
                 tick: float = TICK_SECONDS) -> None:
        from .leases import make_lease
        self.app = app
        self.lease = lease or make_lease(app, LEASE_SECONDS)
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.tick_seconds = tick
        self._sleep = sleep or time.sleep
        self.leading = False
        self.stopped = False
        self.sent = 0
        self.entries = entries(app)
        self.handle: Any = None            # the greenlet or thread running ``run``, when spawned

    def stop(self, wait: float = 2.0) -> None:
        """Stop ticking; when running in a spawned greenlet, wait up to
        ``wait`` seconds for it to release the lease (the next scheduler then
        takes over at once rather than when the lease runs out)."""
        self.stopped = True
        if self.handle is not None and wait:
            self.handle.join(wait)

    def run(self) -> None:
        """Tick until ``stop()``; broker errors are logged and retried."""
        log.info("scheduler %s: %d entr%s", self.holder, len(self.entries), "y" if len(self.entries) == 1 else "ies")
        try:
            while not self.stopped:
                try:
                    wait = self.tick()
                except Exception as exc:
                    log.error("scheduler: %s; trying again", exc)
                    self.leading = False
                    wait = self.tick_seconds
                self._sleep(wait)
        finally:
            if self.leading:
                try:
                    self.lease.release(self.holder)
                except Exception as exc:
                    log.warning("scheduler: could not release the lease: %s", exc)
            self.lease.close()

    def tick(self, now: Optional[float] = None) -> float:
        """Renew (or take) the lease; when held, send what is due.  Returns
        how long to sleep before the next tick."""
        leading = self.lease.acquire(self.holder)
        if leading != self.leading:
            log.info("scheduler %s: %s", self.holder, "took the lease: sending runs" if leading
                     else "lost the lease: standing by")
            self.leading = leading
        if not leading:
            return self.tick_seconds
        now = time.time() if now is None else now
        last = self.lease.last_runs()
        upcoming = now + self.tick_seconds
        for entry in self.entries:
            slot = entry.latest_at(now)
            if slot is None:
                continue
            sent = last.get(entry.name)
            if sent is None:                     # a new entry: it starts at its next slot
                self.lease.record(self.holder, entry.name, slot)
            elif slot > sent:
                self._send(entry, slot)
                if not self.lease.record(self.holder, entry.name, slot):
                    self.leading = False
                    return self.tick_seconds
            upcoming = min(upcoming, entry.next_after(now))
        return max(0.01, min(self.tick_seconds, upcoming - time.time()))

    def _send(self, entry: Entry, slot: float) -> None:
        task_id = f"beat-{entry.name}-{int(slot)}"
        # ignore_result: no rpc:// reply queue for a scheduler that reads no result (stores keep them)
        self.app.send_task(entry.task, tuple(entry.args), dict(entry.kwargs), task_id=task_id,
                           ignore_result=True, **entry.options)
        self.sent += 1
        log.info("scheduler: sent %s (%s) for %s", entry.name, entry.task,
                 datetime.fromtimestamp(slot, dt_timezone.utc).isoformat())
