"""The asyncio client's results on ``rpc://`` (RabbitMQ).

py-amqp blocks, and greenq adds no asyncio AMQP library: the results part
is ONE thread per client that reads this process's reply queue (the
``rpc://`` backend's, greenq/transports/amqp/rpc.py: the queue every
message of this process names in ``reply_to``, whether sent by ``delay()``
or ``adelay()``) and hands each final record a coroutine waits for to the
loop with ``loop.call_soon_threadsafe``.  It takes the reply queue's reading
turn as any blocking ``get()`` does, so blocking and asyncio callers of one
process share the queue and its cache.  The thread ends after
``IDLE_SECONDS`` without waiters; the next wait starts another.

Publishing is the broker's own ``publish_many`` (its pool of publisher
connections, one confirm round trip per gathered batch) in a thread of the
publisher's: greenq/aio/threaded.py, ``ThreadedPublisher``.
"""
from __future__ import annotations

import asyncio
import threading
import time
from typing import TYPE_CHECKING, Any, Dict, Optional

from ...aio.base import AsyncResults, deadline_of, wait_event

if TYPE_CHECKING:  # pragma: no cover
    from ...app import GreenQ

READ_SLICE = 0.5        # seconds one read of the reply queue may block (how soon aclose is heard)
IDLE_SECONDS = 60.0     # the reader thread ends after this long without waiters


class RPCResults(AsyncResults):
    """One reader thread for every waiter (module docstring)."""

    def __init__(self, app: "GreenQ") -> None:
        super().__init__(app)
        self._lock = threading.Lock()
        self._wanted: Dict[str, int] = {}          # task id -> coroutines waiting for it (the thread reads it)
        self._work = threading.Event()             # a wait began
        self._thread: Optional[threading.Thread] = None
        self._stop = False
        self._loop: Optional[asyncio.AbstractEventLoop] = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()

    @property
    def subscriptions(self) -> int:
        thread = self._thread
        return int(thread is not None and thread.is_alive())

    def _replies(self) -> Any:
        """This process's reply queue (made by the client's start, in a thread)."""
        backend: Any = self.app.backend
        backend.reply_to()
        return backend._replies

    def _final(self, task_id: str) -> Optional[bytes]:
        """The final record of ``task_id`` in the reply queue's cache (never
        connects: the loop's side)."""
        backend: Any = self.app.backend       # the rpc:// backend these asyncio results are made for
        replies = backend._mine()
        if replies is None:
            return None
        with replies.cond:
            found = replies.results.get(task_id)
        return found[0] if found is not None and found[1] and not found[2] else None   # not Celery's (rpc.py)

    async def _wait(self, task_id: str, timeout: Optional[float]) -> Optional[bytes]:
        deadline = deadline_of(timeout)
        event = self.waiters.add(task_id)
        with self._lock:
            self._wanted[task_id] = self._wanted.get(task_id, 0) + 1
            if self._thread is None:
                self._stop = False
                self._thread = threading.Thread(target=self._run, name="greenq-aio-rpc", daemon=True)
                self._thread.start()
        self._work.set()
        try:
            while True:
                event.clear()
                data = self._final(task_id)
                if data is not None:
                    return data
                if not await wait_event(event, deadline):
                    return self._final(task_id)
        finally:
            self.waiters.remove(task_id, event)
            with self._lock:
                left = self._wanted.get(task_id, 1) - 1
                if left > 0:
                    self._wanted[task_id] = left
                else:
                    self._wanted.pop(task_id, None)

    def _run(self) -> None:
        """The reader thread: read the reply queue in turns, wake the waiters
        of every final record that arrived."""
        idle_since = time.monotonic()
        while True:
            with self._lock:
                if self._stop or (not self._wanted and time.monotonic() - idle_since > IDLE_SECONDS):
                    self._thread = None
                    return
                wanted = bool(self._wanted)
            if not wanted:
                self._work.wait(READ_SLICE)
                self._work.clear()
                continue
            idle_since = time.monotonic()
            try:
                replies = self._replies()
                self._read(replies)
                self._dispatch(replies)
            except Exception:              # the reader must outlive any failure (rpc.py logs them)
                time.sleep(READ_SLICE)

    def _read(self, replies: Any) -> None:
        with replies.cond:
            if replies.reading:            # a blocking get() reads: it notifies what arrives
                replies.cond.wait(READ_SLICE)
                return
            replies.reading = True
        try:
            replies._read(READ_SLICE)
        finally:
            with replies.cond:
                replies.reading = False
                replies.cond.notify_all()

    def _dispatch(self, replies: Any) -> None:
        with self._lock:
            wanted = list(self._wanted)
        with replies.cond:
            arrived = [t for t in wanted if (found := replies.results.get(t)) is not None and found[1]]
        if not arrived:
            return
        with self._lock:
            for task_id in arrived:
                self._wanted.pop(task_id, None)    # woken once; its waiters read the cache
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._wake, arrived)

    def _wake(self, task_ids: Any) -> None:
        for task_id in task_ids:
            self.waiters.wake(task_id)

    async def _close(self) -> None:
        with self._lock:
            self._stop = True
            thread = self._thread
        self._work.set()
        if thread is not None:
            await asyncio.to_thread(thread.join, READ_SLICE + 5.0)
