"""The interface every scope's permit pool implements, and the factory that picks one.

A pool is non-blocking on purpose: ``try_acquire`` answers at once.  Waiting is
the caller's job (the admission step parks the task; ``app.resource`` sleeps on
the driver), so a pool never blocks a greenlet and the same pool serves both.
A holder is a string unique per permit (``"<job id>:pg:0"``), so a release is
idempotent and a pool that loses track (a restart, a lease that expired) can
tell whose permit it is.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, Optional, Tuple

if TYPE_CHECKING:   # pragma: no cover
    from ..config import Config

#: where each scope's pool lives; imported on use, so a process-only app
#: never imports the host or cluster machinery
SCOPES: Dict[str, str] = {
    "process": "greenq.resources.process:ProcessPool",
    "host": "greenq.resources.host:HostPool",
    "cluster": "greenq.resources.cluster:ClusterPool",
}


@dataclass(frozen=True)
class ResourceSettings:
    """One ``[resource:NAME]`` section, checked (greenq.config)."""
    name: str
    limit: int
    scope: str = "process"                  # "process" | "host" | "cluster"
    adaptive: bool = False
    min_limit: int = 1
    errors: Tuple[str, ...] = ()            # dotted exception names that mean "overloaded"


class PermitPool:
    """One resource's permits in one scope.  Non-blocking: waiting is the caller's (admission) job."""

    def __init__(self, name: str, limit: int, *, app_key: str, config: "Config", driver: Any = None) -> None:
        self.name = name
        self.limit = limit
        #: the places every process of the scope shares (host, cluster); ``limit``
        #: is this process's bound, equal to it unless ``set_share`` lowered it
        self.shared_limit = limit
        self.app_key = app_key
        self.config = config
        self.driver = driver

    def set_limit(self, limit: int) -> None:
        """The limit in force (an adaptive limit moves it); held permits above it are not taken back,
        new ones are refused until the count falls below it."""
        self.limit = self.shared_limit = max(1, int(limit))

    def set_share(self, limit: int) -> None:
        """This process's bound only (an adaptive limit: each process adapts its
        share), the places shared with the other processes staying ``shared_limit``."""
        self.limit = max(1, min(int(limit), self.shared_limit))

    def try_acquire(self, holder: str) -> bool:
        """Take one permit for ``holder`` (unique per permit); False: none free."""
        raise NotImplementedError

    def release(self, holder: str) -> None:
        """Give ``holder``'s permit back; an unknown holder is a no-op (releases are idempotent)."""
        raise NotImplementedError

    def renew(self) -> None:
        """Called every few seconds by the worker: a cluster pool renews its leases here."""

    def fair_share(self) -> Optional[int]:
        """How many permits this process may hold now because other processes
        wait for the same places (greenq/resources/fair.py); None: no bound
        (nobody else waits, or the scope is this process alone)."""
        return None

    def poll_interval(self) -> Optional[float]:
        """Seconds between two asks of a refused waiter: None when a release
        in this process is the only way a permit comes free (process scope);
        host and cluster permits are freed by other processes too."""
        return None

    def in_use(self) -> int:
        """Permits this pool knows are held (process: exact; host/cluster: the best known count)."""
        raise NotImplementedError

    def close(self) -> None:
        """Release everything this process holds (worker stop)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} {self.in_use()}/{self.limit}>"


def pool_class(scope: str) -> type:
    """The PermitPool class for ``scope`` (imported on use)."""
    try:
        reference = SCOPES[scope]
    except KeyError:
        raise ValueError(f"unknown resource scope {scope!r}: one of {', '.join(SCOPES)}") from None
    module, _, attr = reference.partition(":")
    cls = getattr(importlib.import_module(module), attr)
    assert isinstance(cls, type) and issubclass(cls, PermitPool)
    return cls


def make_pool(name: str, settings: ResourceSettings, *, app_key: str, config: "Config",
              driver: Any = None) -> PermitPool:
    """The pool of ``settings.scope`` for resource ``name``: process here, host and cluster imported on use."""
    pool: PermitPool = pool_class(settings.scope)(name, settings.limit, app_key=app_key,
                                                   config=config, driver=driver)
    return pool
