"""Plain OS threads, and solo (one task at a time).  Nothing is patched.

Time limits use ``PyThreadState_SetAsyncExc``: the exception arrives at the
thread's next Python bytecode, so a thread blocked inside C code only sees it
when that call returns.  The docs say so.
"""
from __future__ import annotations

import contextlib
import ctypes
import queue
import threading
import time
from typing import Any, Callable, Optional, Type

from .base import Driver, Handle


def _async_raise(ident: int, exc: Type[BaseException]) -> None:
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), ctypes.py_object(exc))


class ThreadHandle(Handle):
    def __init__(self, thread: threading.Thread) -> None:
        self.thread = thread

    def join(self, timeout: Optional[float] = None) -> bool:
        self.thread.join(timeout)
        return not self.thread.is_alive()

    @property
    def dead(self) -> bool:
        return not self.thread.is_alive()

    def kill(self, exc: Type[BaseException]) -> None:
        if self.thread.ident is not None and self.thread.is_alive():
            _async_raise(self.thread.ident, exc)


class ThreadsDriver(Driver):
    name = "threads"
    green = False

    def spawn(self, fn: Callable[..., Any], *args: Any) -> Handle:
        t = threading.Thread(target=fn, args=args, daemon=True)
        t.start()
        return ThreadHandle(t)

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    def event(self):
        return threading.Event()

    def queue(self):
        return queue.Queue()

    def lock(self):
        return threading.Lock()

    @contextlib.contextmanager
    def timeout(self, seconds: Optional[float], exc: Type[BaseException]):
        if not seconds:
            yield
            return
        ident = threading.get_ident()
        done = threading.Lock()

        def fire() -> None:
            with done:
                if not finished:
                    _async_raise(ident, exc)
        finished = False
        timer = threading.Timer(seconds, fire)
        timer.daemon = True
        timer.start()
        try:
            yield
        finally:
            with done:
                finished = True
            timer.cancel()

    def current(self) -> Any:
        return threading.get_ident()

    def start_os_thread(self, fn: Callable[[], Any]) -> None:
        threading.Thread(target=fn, daemon=True, name="greenq-watchdog").start()

    def os_sleep(self, seconds: float) -> None:
        time.sleep(seconds)


class SoloDriver(ThreadsDriver):
    """One task at a time; the worker forces concurrency to 1."""
    name = "solo"
