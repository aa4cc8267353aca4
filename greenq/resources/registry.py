"""The app's permit pools, one per ``[resource:NAME]``, and ``app.resource``.

One ``Resources`` per process serves both ways of holding a permit: the
admission step (greenq.resources.step) takes a task's permits before it gets
a runner slot, and ``with app.resource("pg"):`` takes one around a section of
code.  Both go through the same pools, so a limit counts them together.  A
release tells the listeners (the admission step wakes the tasks waiting for
that resource).

The worker builds it with its driver (greenq/worker/assembly.py) and hands
it to the app; a process that is no worker (a script, a test) gets one made
on first use from the app's configuration (each pool of the scope its
section names).
"""
from __future__ import annotations

import contextlib
import difflib
import itertools
import os
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple

from ..exceptions import ConfigError
from .adaptive import AdaptiveLimit, resolve_errors
from .base import PermitPool, ResourceSettings, make_pool
from .lag import LoopLag, loop_lag

if TYPE_CHECKING:  # pragma: no cover
    from ..config import Config

#: no lag measured: (least, most)
NO_LAG = (0.0, 0.0)

#: how long ``app.resource`` sleeps between two asks at first, and at most
POLL_FIRST = 0.002
POLL_MAX = 0.05


def unknown(name: str, known: Mapping[str, Any]) -> ConfigError:
    """A ConfigError for a resource with no section, naming the nearest one."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.5)
    hint = f"; did you mean [resource:{close[0]}]?" if close else \
        (f"; configured resources: {', '.join(sorted(known))}" if known else "; no resource is configured")
    return ConfigError(f"resource {name!r} has no [resource:{name}] section{hint}")


def check_tasks(tasks: Iterable[Any], settings: Mapping[str, Any]) -> None:
    """ConfigError for the first task whose ``resources`` names a resource
    with no ``[resource:NAME]`` section, with the nearest valid name."""
    for task in tasks:
        for name in task.option("resources") or ():
            if name not in settings:
                raise ConfigError(f"task {task.name}: {unknown(name, settings)}")


def wait_keys(tasks: Iterable[Any]) -> int:
    """How many resources the tasks name: the permits step holds up to prefetch
    waiting messages per resource (a task naming two counts for both)."""
    return len({name for t in tasks for name in (t.option("resources") or ())})


class Resources:
    """The pools of one process, made on first use, and who to tell of a release."""

    def __init__(self, config: "Config", *, app_key: str, driver: Any = None,
                 settings: Optional[Mapping[str, ResourceSettings]] = None) -> None:
        self.config = config
        self.app_key = app_key
        self.driver = driver
        self.settings: Dict[str, ResourceSettings] = dict(config.resource_settings() if settings is None
                                                          else settings)
        self.pools: Dict[str, PermitPool] = {}
        #: the adaptive limit of each resource with ``adaptive = true`` (greenq/resources/adaptive.py)
        self.adaptive: Dict[str, AdaptiveLimit] = {}
        self._listeners: List[Callable[[str], None]] = []
        self._lock = threading.Lock()
        self._holders = itertools.count(1)
        #: the worker's own delay per sample (greenq/resources/lag.py): made with the
        #: first adaptive pool, gevent only; None otherwise (and then it costs nothing)
        self.lag: Optional[LoopLag] = None

    def pool(self, name: str) -> PermitPool:
        """The pool of resource ``name``; ConfigError (with the nearest name) if it has no section."""
        pool = self.pools.get(name)
        if pool is not None:
            return pool
        with self._lock:
            pool = self.pools.get(name)
            if pool is None:
                settings = self.settings.get(name)
                if settings is None:
                    raise unknown(name, self.settings)
                pool = make_pool(name, settings, app_key=self.app_key, config=self.config,
                                 driver=self.driver)
                if settings.adaptive:
                    adaptive = AdaptiveLimit(settings.min_limit, settings.limit,
                                             errors=resolve_errors(settings.errors))
                    pool.set_share(adaptive.limit)    # host, cluster: the lease stays `limit`
                    self.adaptive[name] = adaptive
                    if self.lag is None:
                        self.lag = loop_lag(self.driver)
                self.pools[name] = pool
        return pool

    def lag_begin(self, name: str) -> Any:
        """A mark for the worker's own delay met by the current green thread
        from now (``lag_end``): None unless ``name`` is adaptive and measured."""
        lag = self.lag
        if lag is None or name not in self.adaptive:
            return None
        return lag.begin()

    def lag_end(self, mark: Any) -> Tuple[float, float]:
        """Seconds the green thread of ``mark`` waited, ready, for the hub since
        it was made: the least and the most it can have been."""
        lag = self.lag
        if mark is None or lag is None:
            return NO_LAG
        _, low, high = lag.end_bounds(mark)
        return (low, high)

    def sample(self, name: str, latency: float, in_flight: int, error: Optional[BaseException],
               *, connection: bool = False, held: Optional[int] = None,
               lag: Tuple[float, float] = (0.0, 0.0)) -> None:
        """A holder of a permit of ``name`` ended after ``latency`` seconds
        (with ``error`` when it raised), ``in_flight`` permits held when it
        did, ``lag`` the least and the most of it that was the worker's own
        delay (``lag_end``): an
        adaptive resource moves its limit in force; others ignore it.
        A resource whose pool times its connections itself (``app.resource_pool``:
        ``connection=True``, the time a connection was out) ignores the holders'."""
        adaptive = self.adaptive.get(name)
        if adaptive is None:
            return
        if connection != getattr(self.pools.get(name), "times_connections", False):
            return
        before = adaptive.limit
        after = adaptive.on_sample(latency, in_flight=in_flight, error=error, held=held,
                                   lag=lag[0], lag_high=lag[1])
        if after != before:
            self.pool(name).set_share(after)
            self.freed(name)

    def check(self, names: Any) -> None:
        """ConfigError for the first of ``names`` that has no section."""
        for name in names:
            if name not in self.settings:
                raise unknown(name, self.settings)

    def on_release(self, listener: Callable[[str], None]) -> None:
        """``listener(name)`` after any permit of ``name`` was given back."""
        self._listeners.append(listener)

    def release(self, name: str, holder: str) -> None:
        self.pool(name).release(holder)
        self.freed(name)

    def freed(self, name: str) -> None:
        """Permits of ``name`` may be free now: tell the listeners (the
        admission step asks its waiters again).  Called on every release, and
        to be called after raising a pool's limit (``set_limit``)."""
        for listener in self._listeners:
            listener(name)

    def set_limit(self, name: str, limit: int) -> None:
        """The limit in force of ``name`` from now on (an adaptive limit); waiters are asked again."""
        self.pool(name).set_limit(limit)
        self.freed(name)

    def holder(self, name: str) -> str:
        """A holder id unique in the fleet: pid, a counter, the resource."""
        return f"{os.getpid()}.{next(self._holders)}:{name}"

    def acquire(self, name: str, holder: str, timeout: Optional[float] = None) -> bool:
        """Take one permit of ``name`` for ``holder``, waiting cooperatively
        (the driver's sleep) until one is free, or ``timeout`` seconds; False on time out."""
        pool = self.pool(name)
        if pool.try_acquire(holder):
            return True
        sleep = self.driver.sleep if self.driver is not None else time.sleep
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = POLL_FIRST
        while not pool.try_acquire(holder):
            if deadline is not None and time.monotonic() >= deadline:
                return False
            sleep(pause)
            pause = min(POLL_MAX, pause * 2)
        return True

    @contextlib.contextmanager
    def hold(self, name: str, count: int = 1, timeout: Optional[float] = None) -> Iterator[None]:
        """``with app.resource(name):``: ``count`` permits of ``name`` for the block."""
        taken: List[str] = []
        error: Optional[BaseException] = None
        started = 0.0
        mark = None
        try:
            for _ in range(count):
                holder = self.holder(name)
                if not self.acquire(name, holder, timeout):
                    raise TimeoutError(f"no permit of resource {name!r} came free within {timeout} s")
                taken.append(holder)
            started = time.monotonic()
            mark = self.lag_begin(name)
            yield
        except BaseException as exc:
            error = exc
            raise
        finally:
            lag = self.lag_end(mark)
            if taken and started:
                self.sample(name, time.monotonic() - started, self.pool(name).in_use(), error, lag=lag)
            for holder in reversed(taken):
                self.release(name, holder)

    def renew(self) -> None:
        for pool in list(self.pools.values()):
            pool.renew()

    def close(self) -> None:
        """Give back every permit this process holds (the worker's stop)."""
        lag, self.lag = self.lag, None
        if lag is not None:
            lag.close()
        for pool in list(self.pools.values()):
            pool.close()
