"""eventlet: legacy, still fully supported.  Its maintainers discourage new
use; prefer gevent.  ``patch()`` runs ``eventlet.monkey_patch()``."""
from __future__ import annotations

import queue as std_queue
from typing import Any, Callable, Optional, Type

import eventlet
import eventlet.event
import eventlet.patcher
import eventlet.queue
import eventlet.semaphore
import eventlet.tpool
import greenlet

from .base import Driver, Handle, RawGreenletHandle, no_timeout


class GreenThreadHandle(Handle):
    """``join`` waits on an event of its own, set by a link (the
    GreenThread's ``wait`` would raise its error); both are made by the
    first ``join`` only (a link added after the end runs at once), as most
    handles (the runners') are never joined: 0.6 KB a runner."""
    __slots__ = ("gt", "_done")

    def __init__(self, gt: "eventlet.greenthread.GreenThread") -> None:
        self.gt = gt
        self._done: Optional[eventlet.event.Event] = None

    def _event(self) -> "eventlet.event.Event":
        done = self._done
        if done is None:
            done = self._done = eventlet.event.Event()
            self.gt.link(lambda *_: done.ready() or done.send(None))
        return done

    def join(self, timeout: Optional[float] = None) -> bool:
        done = self._event()
        if done.ready():
            return True
        with eventlet.Timeout(timeout, False):
            done.wait()
        return done.ready()

    @property
    def dead(self) -> bool:
        done = self._done
        return (done is not None and done.ready()) or self.gt.dead

    def kill(self, exc: Type[BaseException]) -> None:
        if not self.dead:
            eventlet.spawn_n(self.gt.kill, exc)


class RawHandle(RawGreenletHandle):
    """The handle of a raw greenlet (``eventlet.spawn_n``: the runners): no
    GreenThread, no event (0.7 KB less a running task).  A kill is thrown
    from a greenlet of its own, as ``GreenThreadHandle.kill`` does, into a
    greenlet still alive then."""
    __slots__ = ()
    _sleep = staticmethod(eventlet.sleep)

    def kill(self, exc: Type[BaseException]) -> None:
        if not self.glet.dead:
            eventlet.spawn_n(_kill, self.glet, exc)


def _kill(glet: Any, exc: Type[BaseException]) -> None:
    if not glet.dead:
        eventlet.kill(glet, exc)


class _Event:
    """A resettable event (eventlet's own Event fires only once)."""

    def __init__(self) -> None:
        self._flag = False
        self._event = eventlet.event.Event()

    def set(self) -> None:
        self._flag = True
        if not self._event.ready():
            self._event.send(True)

    def clear(self) -> None:
        if self._flag:
            self._flag = False
            self._event = eventlet.event.Event()

    def is_set(self) -> bool:
        return self._flag

    def wait(self, timeout: Optional[float] = None) -> bool:
        if self._flag:
            return True
        event = self._event
        with eventlet.Timeout(timeout, False):
            event.wait()
        return self._flag


class _Queue:
    def __init__(self) -> None:
        self._q = eventlet.queue.Queue()

    def put(self, item: Any) -> None:
        self._q.put(item)

    def get(self, block: bool = True, timeout: Optional[float] = None) -> Any:
        try:
            return self._q.get(block, timeout)
        except eventlet.queue.Empty:
            raise std_queue.Empty from None

    def qsize(self) -> int:
        return self._q.qsize()


class EventletDriver(Driver):
    name = "eventlet"
    green = True

    def is_patched(self) -> bool:
        return bool(eventlet.patcher.is_monkey_patched("socket")
                    and eventlet.patcher.is_monkey_patched("thread"))

    def spawn(self, fn: Callable[..., Any], *args: Any) -> Handle:
        return GreenThreadHandle(eventlet.spawn(fn, *args))

    def spawn_light(self, fn: Callable[..., Any], *args: Any) -> Handle:
        """A raw greenlet (``eventlet.spawn_n``), for the runners."""
        return RawHandle(eventlet.spawn_n(fn, *args))

    #: eventlet.sleep itself: a runner sleeps (0) after every task, and a method that
    #: called it would be one more Python call each time
    sleep = staticmethod(eventlet.sleep)

    def event(self):
        return _Event()

    def queue(self):
        return _Queue()

    def lock(self):
        return eventlet.semaphore.Semaphore(1)

    def run_in_thread(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return eventlet.tpool.execute(fn, *args, **kwargs)

    def timeout(self, seconds: Optional[float], exc: Type[BaseException]):
        if not seconds:
            return no_timeout()
        return eventlet.Timeout(seconds, exc)

    def current(self) -> Any:
        return greenlet.getcurrent()

    def start_os_thread(self, fn: Callable[[], Any]) -> None:
        eventlet.patcher.original("_thread").start_new_thread(fn, ())

    def os_sleep(self, seconds: float) -> None:
        eventlet.patcher.original("time").sleep(seconds)

    def os_thread_ident(self) -> int:
        return eventlet.patcher.original("_thread").get_ident()
