"""The concurrency driver interface.

A driver is the one object through which the worker and the brokers spawn,
sleep, wait, lock and offload blocking calls, so that the same code runs under
gevent, eventlet, plain threads and solo.  It is chosen once at start-up
(``get_driver(name)``); nothing in greenq branches on "are we green?" at import.
"""
from __future__ import annotations

import contextlib
import signal
import time
from typing import Any, Callable, ContextManager, Optional, Protocol, Type


class Event(Protocol):
    """What ``Driver.event()`` returns (threading.Event's shape)."""

    def set(self) -> None: ...
    def clear(self) -> None: ...
    def is_set(self) -> bool: ...
    def wait(self, timeout: Optional[float] = None) -> bool: ...


class Queue(Protocol):
    """What ``Driver.queue()`` returns (queue.Queue's shape; ``get`` raises
    ``queue.Empty`` when ``block`` is false or ``timeout`` passes)."""

    def put(self, item: Any) -> None: ...
    def get(self, block: bool = True, timeout: Optional[float] = None) -> Any: ...
    def qsize(self) -> int: ...


class Lock(Protocol):
    """What ``Driver.lock()`` returns: a context manager that excludes others."""

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool: ...
    def release(self) -> None: ...
    def __enter__(self) -> Any: ...
    def __exit__(self, *exc: Any) -> Any: ...


class Handle:
    """A running unit of work (greenlet or thread) returned by ``Driver.spawn``."""
    __slots__ = ()      # a driver's handle may have slots (one per runner: no dict each)

    def join(self, timeout: Optional[float] = None) -> bool:
        """Wait until it finished; True if it did within ``timeout``."""
        raise NotImplementedError

    @property
    def dead(self) -> bool:
        raise NotImplementedError

    def kill(self, exc: Type[BaseException]) -> None:
        """Raise ``exc`` inside it, without waiting.  Threads get it at the next
        bytecode; a thread stuck in C code does not see it until it returns."""
        raise NotImplementedError


class RawGreenletHandle(Handle):
    """The handle of a raw greenlet (the runners: no Greenlet/GreenThread
    object, no event).  ``_sleep`` (the hub's) polls ``join``; a driver's
    subclass throws kills its own way (``kill``)."""
    __slots__ = ("glet",)
    _sleep: Callable[[float], Any]

    def __init__(self, glet: Any) -> None:
        self.glet = glet

    def join(self, timeout: Optional[float] = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.glet.dead and (deadline is None or time.monotonic() < deadline):
            self._sleep(0.01)
        return bool(self.glet.dead)

    @property
    def dead(self) -> bool:
        return bool(self.glet.dead)


class Driver:
    """One concurrency model.  Subclasses fill in every method."""

    name = "base"
    green = False  # True when tasks run as greenlets on one hub

    # -- start-up (patching itself is the launcher's: greenq/worker/launch.py) --
    def is_patched(self) -> bool:
        """True when the process is patched as this driver needs (always, for threads)."""
        return True

    # -- concurrency primitives ----------------------------------------------
    def spawn(self, fn: Callable[..., Any], *args: Any) -> Handle:
        raise NotImplementedError

    def spawn_light(self, fn: Callable[..., Any], *args: Any) -> Handle:
        """``spawn`` for the worker's runners, one per running task: as light
        as the driver allows (gevent: a raw greenlet); its handle is killed
        and asked ``dead``, and need not be joinable cheaply."""
        return self.spawn(fn, *args)

    def sleep(self, seconds: float) -> None:
        raise NotImplementedError

    def event(self) -> Event:
        """A new event with set(), clear(), is_set() and wait(timeout) -> bool."""
        raise NotImplementedError

    def queue(self) -> Queue:
        """A new unbounded FIFO with put(item), get(timeout) (raises ``queue.Empty``) and qsize()."""
        raise NotImplementedError

    def lock(self) -> Lock:
        """A new mutex usable as a context manager."""
        raise NotImplementedError

    def run_in_thread(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run a blocking call (sqlite, a C library) where it cannot freeze the
        hub: a real OS thread for green drivers; the caller's thread otherwise."""
        return fn(*args, **kwargs)

    def timeout(self, seconds: Optional[float], exc: Type[BaseException]) -> ContextManager:
        """A context manager raising ``exc`` in the current task after ``seconds``."""
        raise NotImplementedError

    def current(self) -> Any:
        """An identity for the running greenlet or thread."""
        raise NotImplementedError

    # -- the control plane ---------------------------------------------------
    def start_os_thread(self, fn: Callable[[], Any]) -> None:
        """Start ``fn`` in a real OS thread that the hub cannot block (watchdogs)."""
        raise NotImplementedError

    def os_sleep(self, seconds: float) -> None:
        """The unpatched ``time.sleep``, for code running in ``start_os_thread``."""
        raise NotImplementedError

    def os_thread_ident(self) -> int:
        """The real OS thread id of the caller (the hub's, when called on the hub)."""
        import threading
        return threading.get_ident()

    def install_signal(self, signum: int, handler: Callable[[], None]) -> None:
        """Call ``handler()`` (which should only set flags) when ``signum`` arrives."""
        signal.signal(signum, lambda *_: handler())


@contextlib.contextmanager
def no_timeout():
    yield


class UsesDriver:
    """For brokers and backends: blocking calls and sleeps that go through the
    driver when one is set (a worker, a patched client) and run plainly otherwise."""

    driver: Optional[Driver] = None

    def _blocking(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run a blocking library call off the hub when a driver is set."""
        if self.driver is None:
            return fn(*args, **kwargs)
        return self.driver.run_in_thread(fn, *args, **kwargs)

    def _sleep(self, seconds: float) -> None:
        if self.driver is None:
            time.sleep(seconds)
        else:
            self.driver.sleep(seconds)
