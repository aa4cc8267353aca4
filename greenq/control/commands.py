"""What a worker answers: the ``inspect`` and ``control`` commands.

Each command is a function ``(agent, **args) -> JSON-able result``, run in the
worker's control greenlet (outside the task pool, so a full pool still
answers).  An exception becomes an ``error`` reply naming it.

Commands reach the worker only through ``ControlledWorker`` below: what they
read (a snapshot, the counters, the held messages not started) and the
operations they call (``resize``, ``add_queue``, ``cancel_queue``,
``set_rate_limit``, ``request_stop``, the revocations' ``received``).  They
check their arguments; the worker does the change.  Nothing here imports
greenq.worker.consumer.
"""
from __future__ import annotations

import logging
import os
import reprlib
import socket
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Protocol

from .. import __version__, validation
from ..config import mask_url
from ..resources.observe import heartbeat_summary
from ..worker.revocations import CLOCK_SKEW
from .base import dumps

if TYPE_CHECKING:  # pragma: no cover
    from ..brokers.base import Delivery
    from ..config import Config
    from ..drivers.base import Driver
    from ..hooks import Hooks
    from ..message import Codec
    from ..worker.revocations import Revocations
    from ..worker.state import Snapshot, Stats
    from .agent import ControlAgent


class ControlledWorker(Protocol):
    """What the control plane uses of a worker (greenq.worker.consumer.Worker
    is one; a test may give a fake)."""

    name: str
    config: "Config"
    driver: "Driver"
    hooks: "Hooks"
    codec: "Codec"
    stats: "Stats"
    revocations: "Revocations"
    concurrency: int
    max_tasks: int
    shutdown_timeout: float

    def snapshot(self) -> "Snapshot": ...

    def resource_stats(self) -> Dict[str, Dict[str, Any]]: ...

    def reserved(self) -> List["Delivery"]: ...

    def task_names(self) -> List[str]: ...

    def request_stop(self, cold: bool = False) -> None: ...

    def resize(self, concurrency: int) -> None: ...

    def add_queue(self, queue: str) -> bool: ...

    def cancel_queue(self, queue: str) -> bool: ...

    def set_rate_limit(self, task: str, rate: Optional[str]) -> None: ...

log = logging.getLogger("greenq.control")

Command = Callable[..., Any]
COMMANDS: Dict[str, Command] = {}

#: characters of a task's args (and of its kwargs) an inspect reply carries as
#: they are; longer ones are sent as a cut JSON text (``preview``)
ARGS_PREVIEW = 1000


def command(name: str) -> Callable[[Command], Command]:
    def register(fn: Command) -> Command:
        COMMANDS[name] = fn
        return fn
    return register


def rss_bytes() -> int:
    """Resident set size of this process (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def worker_info(agent: "ControlAgent") -> Dict[str, Any]:
    """Who the worker is and what it does now: the heartbeat's payload and
    the core of ``inspect stats``."""
    w = agent.worker
    snap = w.snapshot()
    s = w.stats
    return {
        "worker": agent.name, "hostname": socket.gethostname(), "pid": os.getpid(),
        "version": __version__, "pool": snap.pool, "concurrency": snap.concurrency,
        "prefetch": snap.prefetch, "queues": snap.queues, "running": len(snap.running),
        "held": snap.held, "processed": s.succeeded + s.failed, "received": s.received,
        "succeeded": s.succeeded, "failed": s.failed, "retried": s.retried,
        "dead_lettered": s.dead_lettered, "revoked": s.revoked, "rss": rss_bytes(),
        "started": s.started, "uptime": round(time.time() - s.started, 3),
        "stopping": bool(snap.stopping), "events": agent.events_enabled,
        **_resources_summary(w),
    }


def _resources_summary(w: ControlledWorker) -> Dict[str, Any]:
    """A heartbeat's ``resources`` (small, bounded: greenq/resources/observe.py); none without resources."""
    section = w.resource_stats()
    return {"resources": heartbeat_summary(section)} if section else {}


def _held_not_running(agent: "ControlAgent") -> List[Dict[str, Any]]:
    """The held messages no runner has started, decoded (inspect is rare: decoding is fine)."""
    w = agent.worker
    out = []
    for d in w.reserved():
        try:
            msg = d.decode(w.codec)
        except Exception:
            continue
        out.append({"id": msg.id, "name": msg.task, "args": preview(msg.args), "kwargs": preview(msg.kwargs),
                    "queue": d.queue, "eta": msg.eta, "priority": msg.priority})
    return out


def preview(value: Any) -> Any:
    """``value`` when its JSON is at most ``ARGS_PREVIEW`` characters; else
    that JSON cut there, as a string ending ``... (N chars)``: an inspect
    reply stays small whatever the tasks carry."""
    text = dumps(value)
    if len(text) <= ARGS_PREVIEW:
        return value
    return f"{text[:ARGS_PREVIEW]}... ({len(text)} chars)"


# -- inspect -------------------------------------------------------------------
@command("ping")
def ping(agent: "ControlAgent") -> str:
    return "pong"


@command("active")
def active(agent: "ControlAgent") -> List[Dict[str, Any]]:
    return [{"id": t.id, "name": t.name, "args": preview(t.args), "kwargs": preview(t.kwargs),
             "started": t.started or None}
            for t in agent.worker.snapshot().running]


@command("reserved")
def reserved(agent: "ControlAgent") -> List[Dict[str, Any]]:
    return _held_not_running(agent)


@command("scheduled")
def scheduled(agent: "ControlAgent") -> List[Dict[str, Any]]:
    """Held messages with a future eta.  Delayed messages wait in the broker,
    not in workers, so this is usually empty (``greenq queues`` counts them)."""
    now = time.time()
    return [m for m in _held_not_running(agent) if m["eta"] and m["eta"] > now]


@command("stats")
def stats(agent: "ControlAgent") -> Dict[str, Any]:
    info = worker_info(agent)
    w = agent.worker
    info.update(broker=mask_url(w.config.broker_url), hub_blocked=w.stats.hub_blocked,
                hub_blocked_seconds=round(w.stats.hub_blocked_seconds, 3),
                max_tasks_per_child=w.max_tasks, shutdown_timeout=w.shutdown_timeout,
                resources=w.resource_stats())
    return info


@command("registered")
def registered(agent: "ControlAgent") -> List[str]:
    return agent.worker.task_names()


@command("revoked")
def revoked(agent: "ControlAgent") -> List[str]:
    """The revoked ids this worker knows (its copy: worker/revocations.py), oldest first."""
    return list(agent.worker.revocations.ids)


# -- sent by AsyncResult.revoke / greenq revoke, with no reply wanted ------------
@command("revoke")
def revoke(agent: "ControlAgent", ids: Any = (), terminate: Any = False, at: Any = None) -> str:
    """Revoke ``ids`` (at most ``validation.MAX_REVOKE_IDS``: a bigger command
    is refused whole, so one command cannot push the revocations this worker
    knows out of its copy; ``Control.revoke`` splits)."""
    if not isinstance(ids, list) or not all(isinstance(t, str) and t for t in ids):
        raise ValueError(f"ids must be a list of task ids, got {reprlib.repr(ids)}")
    if len(ids) > validation.MAX_REVOKE_IDS:
        raise ValueError(f"{len(ids)} ids in one revoke; at most {validation.MAX_REVOKE_IDS} per command")
    if not isinstance(terminate, bool):
        raise ValueError(f"terminate must be true or false, got {terminate!r}")
    now = time.time()
    if isinstance(at, bool) or not isinstance(at, (int, float)) or not 0 <= at < float("inf"):
        at = now
    elif at > now + CLOCK_SKEW:
        # the sender's clock is far ahead, or the command is garbled: the revoke
        # still holds, from now (refusing it would let the task run until the
        # next re-read); an ``at`` far ahead would keep it past result_expires
        log.warning("revoke: at %s is more than %.0f s ahead of this worker's clock; taken as now",
                    reprlib.repr(at), CLOCK_SKEW)     # reprlib: an int too large for a float
        at = now
    n = agent.worker.revocations.received(ids, terminate, float(at))
    return f"{n} revoked{' (terminate)' if terminate else ''}"


# -- control -------------------------------------------------------------------
@command("shutdown")
def shutdown(agent: "ControlAgent") -> str:
    agent.worker.request_stop()
    return "warm shutdown started"


def _count(n: Any) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"expected a whole number >= 1, got {n!r}")
    return n


@command("pool_grow")
def pool_grow(agent: "ControlAgent", n: int = 1) -> str:
    w = agent.worker
    n = _count(n)
    if w.driver.name == "solo":
        raise ValueError("the solo pool runs one task at a time; it cannot grow")
    if w.concurrency + n > validation.MAX_CONCURRENCY:
        raise ValueError(f"the pool has {w.concurrency} slot(s); growing it by {n} would pass the ceiling "
                         f"of {validation.MAX_CONCURRENCY} (greenq.validation.MAX_CONCURRENCY)")
    w.resize(w.concurrency + n)
    return f"pool grown by {n} to {w.concurrency}"


@command("pool_shrink")
def pool_shrink(agent: "ControlAgent", n: int = 1) -> str:
    """Retire ``n`` runners: each ends when it takes its retirement notice
    from the run queue (after the messages already queued before it)."""
    w = agent.worker
    n = min(_count(n), w.concurrency - 1)
    if n < 1:
        raise ValueError(f"the pool has {w.concurrency} slot(s); it cannot shrink below 1")
    w.resize(w.concurrency - n)
    return f"pool shrunk by {n} to {w.concurrency}"


@command("rate_limit")
def rate_limit(agent: "ControlAgent", task: str = "", rate: str = "") -> str:
    """Set (``100/s``, ``6/m``) or remove (``0``, ``none``) a task's rate limit in this worker."""
    w = agent.worker
    if str(rate).strip().lower() in ("", "0", "none", "off"):
        w.set_rate_limit(task, None)
        return f"{task}: rate limit removed"
    w.set_rate_limit(task, rate)
    return f"{task}: rate limit set to {rate}"


@command("add_consumer")
def add_consumer(agent: "ControlAgent", queue: str = "") -> str:
    validation.name("queue", queue)
    if not agent.worker.add_queue(queue):
        return f"already consuming {queue}"
    return f"now consuming {queue}"


@command("cancel_consumer")
def cancel_consumer(agent: "ControlAgent", queue: str = "") -> str:
    if not agent.worker.cancel_queue(queue):
        return f"not consuming {queue}"
    return f"no longer consuming {queue}"
