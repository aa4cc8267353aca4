"""Periodic tasks (CONTRACT section 7): the schedule and the scheduler.

Entries come from ``[schedule:NAME]`` INI sections and ``app.add_periodic``.
Each has *slots*, the instants it is due: multiples of ``every`` seconds
since the epoch, or the times a five-field ``cron`` expression names in its
``timezone`` (parsed by cronsim, with zoneinfo).

Any number of schedulers may run (``greenq beat``, ``greenq-worker --beat``).
One holds a lease kept in the broker (greenq/leadership.py), renewed every tick
and lost ``LEADERSHIP_SECONDS`` after its holder stopped renewing it, so a
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

import difflib
import logging
import math
import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone as dt_timezone
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence

from . import validation
from .exceptions import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from .app import GreenQ
    from .leadership import Leadership

log = logging.getLogger("greenq.beat")

LEADERSHIP_SECONDS = 5.0      # a dead scheduler's leadership is free this long after its last renewal
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
        """Check every field with the rules send_task applies
        (greenq.validation.schedule_entry): a bad entry is a ConfigError
        naming it, when it is defined, not an error at its first run."""
        where = f"schedule entry {self.name!r}"
        if not self.task:
            raise ConfigError(f"{where}: no task")
        if (self.every is None) == (self.cron is None):
            raise ConfigError(f"{where}: give exactly one of every (seconds) and cron")
        unknown = set(self.options) - set(ENTRY_OPTIONS)
        if unknown:
            raise ConfigError(f"{where}: unknown option(s) {sorted(unknown)}; expected some of {list(ENTRY_OPTIONS)}")
        spec = dict(self.options, task=self.task, timezone=self.timezone, args=list(self.args), kwargs=self.kwargs)
        spec.update({k: v for k, v in (("every", self.every), ("cron", self.cron)) if v is not None})
        try:
            validation.schedule_entry(spec)
        except validation.FieldError as exc:
            raise ConfigError(f"{where}: {exc.key} = {spec.get(exc.key)!r}: {exc}") from None
        self._zone = validation.timezone("timezone", self.timezone)
        if self.every is not None:
            self.every = float(self.every)
        if self.cron is not None:
            self.cron = self.cron.strip()

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
        found = next(iter(_cronsim(self, start, reverse=True)), None)
        return None if found is None else found.timestamp()


def _cronsim(entry: Entry, start: datetime, reverse: bool = False) -> Any:
    from cronsim import CronSim       # the expression was checked when the entry was built
    assert entry.cron is not None, "a cron entry"
    return CronSim(entry.cron, start, reverse=reverse)


def _cron_after(entry: Entry, start: datetime) -> datetime:
    try:
        return next(iter(_cronsim(entry, start)))
    except StopIteration:
        raise ConfigError(f"schedule entry {entry.name!r}: cron = {entry.cron!r} has no time after "
                          f"{start.isoformat()}") from None


def entries(app: "GreenQ", strict: bool = True) -> List[Entry]:
    """Every entry: ``[schedule:NAME]`` sections, then ``app.add_periodic``
    ones (a name given twice: the code's wins).  A bad entry raises
    ConfigError; with ``strict=False`` (a running scheduler, a listing) it is
    logged with its name and left out, and the others are returned."""
    found: Dict[str, Entry] = {}
    for name, spec in app.config.schedules.items():
        spec = dict(spec)
        options = {k: spec.pop(k) for k in ENTRY_OPTIONS if spec.get(k) is not None}
        try:
            found[name] = Entry(name, spec.get("task") or "", spec.get("every"), spec.get("cron"),
                                spec.get("timezone") or "UTC", spec.get("args") or (), spec.get("kwargs") or {},
                                options)
        except ConfigError as exc:
            if strict:
                raise
            log.error("scheduler: %s; this entry is skipped", exc)
    found.update(getattr(app, "periodic", {}))
    return list(found.values())


def unknown_tasks(app: "GreenQ") -> List[str]:
    """A warning for each schedule entry whose task is not registered in
    ``app``, with the nearest registered name: ``task = tasks.addd`` would
    otherwise be sent on every run and dead-lettered as an unknown task.
    Warnings, not errors: a schedule may send tasks only other workers run."""
    warnings = []
    for entry in entries(app, strict=False):
        if entry.task in app.tasks:
            continue
        close = difflib.get_close_matches(entry.task, list(app.tasks), n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]}?" if close else \
            f"; registered tasks: {', '.join(sorted(app.tasks)) or 'none'}"
        warnings.append(f"[schedule:{entry.name}] task = {entry.task} names no task registered in this "
                        f"app: unless another worker runs it, its runs will be dead-lettered{hint}")
    return warnings


def plausible_last_run(entry: str, sent: Optional[float], now: float) -> Optional[float]:
    """The last slot recorded for ``entry``, or None when it lies more than
    LEADERSHIP_SECONDS ahead of ``now``: written by a scheduler whose clock was
    fast, it would hold the entry back until that time.  Logged."""
    if sent is not None and sent > now + LEADERSHIP_SECONDS:
        log.warning("scheduler: the last run recorded for %r is %.0f s in the future (a scheduler with a "
                    "fast clock?): ignored; the entry starts again at its next slot", entry, sent - now)
        return None
    return sent


def scheduled(app: "GreenQ", now: Optional[float] = None, leadership: Optional["Leadership"] = None) -> List[Dict[str, Any]]:
    """The schedule with each entry's next run (for ``greenq inspect scheduled``
    and the dashboard): name, task, every or cron, timezone, last run sent
    (when ``leadership`` is given) and next run, as epoch seconds.  A bad entry is
    logged and left out; it never hides the others."""
    now = time.time() if now is None else now
    last = leadership.last_runs() if leadership is not None else {}
    rows = []
    for entry in entries(app, strict=False):
        try:
            sent = plausible_last_run(entry.name, last.get(entry.name), now)
            latest = entry.latest_at(now)
            due_now = sent is not None and latest is not None and latest > sent
            next_run = now if due_now else entry.next_after(now)
        except (ConfigError, ValueError, OverflowError, OSError) as exc:
            log.error("scheduler: entry %r: %s; left out", entry.name, exc)
            continue
        rows.append({"name": entry.name, "task": entry.task, "every": entry.every, "cron": entry.cron,
                     "timezone": entry.timezone, "last_run": sent, "next_run": next_run})
    return sorted(rows, key=lambda row: row["next_run"])


class Scheduler:
    """Sends each entry's runs while it holds the lease; see the module docstring."""

    def __init__(self, app: "GreenQ", leadership: Optional["Leadership"] = None, sleep: Any = None,
                 tick: float = TICK_SECONDS) -> None:
        from .leadership import make_leadership
        self.app = app
        self.leadership = leadership or make_leadership(app, LEADERSHIP_SECONDS)
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.tick_seconds = tick
        self._sleep = sleep or time.sleep
        self.leading = False
        self.stopped = False
        self.sent = 0
        self.entries = entries(app, strict=False)
        #: entry name -> the error it last failed with (logged once, until it succeeds)
        self.failing: Dict[str, str] = {}
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
                    self.leadership.release(self.holder)
                except Exception as exc:
                    log.warning("scheduler: could not release the lease: %s", exc)
            self.leadership.close()

    def tick(self, now: Optional[float] = None) -> float:
        """Renew (or take) the lease; when held, send what is due.  Returns
        how long to sleep before the next tick."""
        leading = self.leadership.acquire(self.holder)
        if leading != self.leading:
            log.info("scheduler %s: %s", self.holder, "took the lease: sending runs" if leading
                     else "lost the lease: standing by")
            self.leading = leading
        if not leading:
            return self.tick_seconds
        now = time.time() if now is None else now
        last = self.leadership.last_runs()
        upcoming = now + self.tick_seconds
        for entry in self.entries:
            try:
                if not self._due(entry, now, last.get(entry.name)):
                    self.leading = False          # the lease was lost under us: stand by
                    return self.tick_seconds
                upcoming = min(upcoming, entry.next_after(now))
            except Exception as exc:              # one bad entry never holds the others back
                self._failed(entry, exc)
        return max(0.01, min(self.tick_seconds, upcoming - time.time()))

    def _due(self, entry: Entry, now: float, sent: Optional[float]) -> bool:
        """Send ``entry``'s run when a slot passed since ``sent`` and record
        the slot; False when the record was refused (the lease is lost)."""
        slot = entry.latest_at(now)
        if slot is None:
            return True
        sent = plausible_last_run(entry.name, sent, now)
        if sent is None:                         # a new entry: it starts at its next slot
            return self.leadership.record(self.holder, entry.name, slot)
        if slot > sent:
            self._send(entry, slot)
            self.failing.pop(entry.name, None)
            return self.leadership.record(self.holder, entry.name, slot)
        return True

    def _failed(self, entry: Entry, exc: Exception) -> None:
        """Log a failing entry (once per distinct error); it is tried again
        at the next tick, and the other entries go on meanwhile."""
        text = f"{type(exc).__name__}: {exc}"
        if self.failing.get(entry.name) != text:
            log.error("scheduler: entry %r (%s) failed: %s; the other entries go on", entry.name, entry.task, text)
            self.failing[entry.name] = text

    def _send(self, entry: Entry, slot: float) -> None:
        task_id = f"beat-{entry.name}-{int(slot)}"
        # ignore_result: no rpc:// reply queue for a scheduler that reads no result (stores keep them)
        self.app.send_task(entry.task, tuple(entry.args), dict(entry.kwargs), task_id=task_id,
                           ignore_result=True, **entry.options)
        self.sent += 1
        log.info("scheduler: sent %s (%s) for %s", entry.name, entry.task,
                 datetime.fromtimestamp(slot, dt_timezone.utc).isoformat())
