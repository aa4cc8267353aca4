"""gevent: the default driver.  ``patch()`` runs ``gevent.monkey.patch_all()``."""
from __future__ import annotations

from typing import Any, Callable, Optional, Type

import gevent
import gevent.event
import gevent.lock
import gevent.monkey
import gevent.queue

from .base import Driver, Handle, RawGreenletHandle, no_timeout


class GreenletHandle(Handle):
    __slots__ = ("glet",)

    def __init__(self, glet: "gevent.Greenlet") -> None:
        self.glet = glet

    def join(self, timeout: Optional[float] = None) -> bool:
        self.glet.join(timeout)
        return self.glet.dead

    @property
    def dead(self) -> bool:
        return self.glet.dead

    def kill(self, exc: Type[BaseException]) -> None:
        self.glet.kill(exc, block=False)


class RawHandle(RawGreenletHandle):
    """The handle of a raw greenlet (``gevent.spawn_raw``: the runners).  A
    kill is thrown from the hub's callbacks, as gevent's ``Greenlet.kill``
    does, and only into a greenlet still alive then."""
    __slots__ = ()
    _sleep = staticmethod(gevent.sleep)

    def kill(self, exc: Type[BaseException]) -> None:
        if not self.glet.dead:
            gevent.get_hub().loop.run_callback(_throw, self.glet, exc)


def _throw(glet: Any, exc: Type[BaseException]) -> None:
    if not glet.dead:
        glet.throw(exc)


class Greenlet(gevent.Greenlet):
    """greenq's own greenlets (control loops; runners are raw: ``spawn_light``): gevent's spawn tree
    (``spawning_greenlet``, ``spawn_tree_locals``) is kept, but not the
    ``spawning_stack``, ten frames of the worker's start-up that nothing
    reads, recorded per greenlet (1.3 KB a runner: docs/performance.md).
    The greenlets a task spawns are gevent's own and keep theirs.  Named as
    gevent's is, for the same repr."""
    __slots__ = ()
    spawning_stack_limit = 0


class GeventDriver(Driver):
    name = "gevent"
    green = True

    def is_patched(self) -> bool:
        return bool(gevent.monkey.is_module_patched("socket")
                    and gevent.monkey.is_module_patched("threading"))

    def spawn(self, fn: Callable[..., Any], *args: Any) -> Handle:
        return GreenletHandle(Greenlet.spawn(fn, *args))

    def spawn_light(self, fn: Callable[..., Any], *args: Any) -> Handle:
        """A raw greenlet (``gevent.spawn_raw``): 0.8 KB less than a
        ``Greenlet`` a running task; the spawn tree (``spawning_greenlet``,
        ``spawn_tree_locals``) is kept, as it is by greenq's ``Greenlet``."""
        return RawHandle(gevent.spawn_raw(fn, *args))

    #: gevent.sleep itself: a runner sleeps (0) after every task, and a method that
    #: called it would be one more Python call each time
    sleep = staticmethod(gevent.sleep)

    def event(self):
        return gevent.event.Event()

    def queue(self):
        # gevent's own: its Empty is queue.Empty, and a subclass would add a Python call to every get
        return gevent.queue.Queue()

    def lock(self):
        return gevent.lock.RLock()

    def run_in_thread(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return gevent.get_hub().threadpool.apply(fn, args, kwargs)

    def timeout(self, seconds: Optional[float], exc: Type[BaseException]):
        if not seconds:
            return no_timeout()
        return gevent.Timeout(seconds, exc)

    def current(self) -> Any:
        return gevent.getcurrent()

    def start_os_thread(self, fn: Callable[[], Any]) -> None:
        start = gevent.monkey.get_original("_thread", "start_new_thread")
        start(fn, ())

    def os_sleep(self, seconds: float) -> None:
        gevent.monkey.get_original("time", "sleep")(seconds)

    def os_thread_ident(self) -> int:
        return gevent.monkey.get_original("_thread", "get_ident")()

    def install_signal(self, signum: int, handler: Callable[[], None]) -> None:
        gevent.signal_handler(signum, handler)
