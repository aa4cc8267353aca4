"""The worker's state as others see it: the stop state, the counters, and the
snapshot that the monitor and the fleet view read instead of reaching into
the worker."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional


class StopState(enum.IntEnum):
    """Ordered: a stop only ever moves up."""
    RUNNING = 0
    WARM = 1     # stop fetching, let running tasks finish within shutdown_timeout
    COLD = 2     # stop now, return every unfinished message


class Stats:
    """Counters for /metrics, the summary line and ``inspect stats``.  The
    worker counts each outcome where it happens (the consumer, the runners,
    the finisher): they cost every task, so they are plain additions, not
    hook subscribers."""

    def __init__(self) -> None:
        self.started = time.time()
        self.received = 0
        self.succeeded = 0
        self.failed = 0
        self.retried = 0
        self.dead_lettered = 0
        self.revoked = 0
        self.hub_blocked = 0
        self.hub_blocked_seconds = 0.0

    def as_dict(self) -> Dict[str, Any]:
        return {k: v for k, v in vars(self).items()}


@dataclass(frozen=True)
class RunningTask:
    id: str
    name: str
    args: Any
    kwargs: Any
    started: float          # epoch seconds the task began (0 while waiting for its rate-limit slot)


@dataclass(frozen=True)
class Snapshot:
    """One consistent look at a worker, taken under its lock."""
    pool: str
    concurrency: int
    prefetch: int
    queues: List[str]
    stopping: StopState
    failed: Optional[str]                 # the control loop that died, if one did
    seconds_since_poll: float
    seconds_settling: float               # how long the finisher has been on its current batch
    held: int
    running: List[RunningTask] = field(default_factory=list)
