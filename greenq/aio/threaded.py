"""The asyncio client parts that drive the blocking client from a thread.

* :class:`ThreadedPublisher`: the app's own broker (``app.broker``, the one
  ``delay()`` uses) publishes each gathered batch with one
  ``publish_many``, in a thread of the publisher's own.  Used for RabbitMQ
  (py-amqp blocks; its channel pool already publishes a batch with one
  confirm round trip), SQLite (one transaction per batch) and memory://.
* :class:`PollingResults`: for a store that cannot notify (SQLite,
  memory://): ONE poller task reads the final records of every task any
  caller waits for in one query, in a thread of its own, with a pause
  growing from 5 ms to 200 ms while nothing arrives (back to 5 ms when a
  record or a new waiter comes).  So 1,000 concurrent ``aget()`` cost one
  query per pause, not 1,000.
"""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional, Sequence, TypeVar

from ..result import READY_STATES
from .base import AsyncPublisher, AsyncResults, deadline_of, wait_event

if TYPE_CHECKING:  # pragma: no cover
    from ..app import GreenQ
    from ..brokers.base import Outgoing

T = TypeVar("T")

POLL_MIN = 0.005        # seconds between two polls while records keep arriving
POLL_MAX = 0.2          # ... and at most, while nothing does
POLL_GROWTH = 1.5


class _OwnThread:
    """One thread of a part's own (a blocked broker call never holds up the
    loop's default executor, nor the other part)."""

    def __init__(self, name: str) -> None:
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=name)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def close(self) -> None:
        self._executor.shutdown(wait=False)


class ThreadedPublisher(AsyncPublisher):
    """The blocking broker's ``publish_many`` in a thread (module docstring)."""

    def __init__(self, app: "GreenQ") -> None:
        super().__init__(app)
        self._thread = _OwnThread("greenq-aio-publish")

    async def _publish_many(self, messages: Sequence["Outgoing"]) -> None:
        await self._thread.run(self.app.broker.publish_many, list(messages))

    async def _close(self) -> None:
        self._thread.close()


class PollingResults(AsyncResults):
    """One shared poller for every waiter (module docstring).  Subclasses
    may replace ``_final_many`` with one query of their store."""

    def __init__(self, app: "GreenQ") -> None:
        super().__init__(app)
        self._thread = _OwnThread("greenq-aio-poll")
        self._records: Dict[str, bytes] = {}          # final records found, while someone waits
        self._poller: Optional["asyncio.Task[None]"] = None
        self._kick = asyncio.Event()                  # a new waiter: poll now
        self._rounds = 0                              # polls started
        self.polls = 0                                # ... and finished (tests and benchmarks)

    @property
    def subscriptions(self) -> int:
        return 0 if self._poller is None or self._poller.done() else 1

    async def _wait(self, task_id: str, timeout: Optional[float]) -> Optional[bytes]:
        deadline = deadline_of(timeout)
        event = self.waiters.add(task_id)
        first_round = self._rounds + 1                # the first poll that looks for this task
        try:
            if self._poller is None or self._poller.done():
                self._poller = asyncio.ensure_future(self._poll())
            self._kick.set()
            while True:
                data = self._records.get(task_id)
                if data is not None:
                    return data
                if not await wait_event(event, deadline):
                    if task_id in self._records or self.polls >= first_round:
                        return self._records.get(task_id)
                    # timed out before any poll looked (timeout=0): look once, as get(timeout=0) does
                    return (await self._thread.run(self._final_many, [task_id])).get(task_id)
                event.clear()
        finally:
            self.waiters.remove(task_id, event)
            if task_id not in self.waiters:
                self._records.pop(task_id, None)

    async def _poll(self) -> None:
        delay = POLL_MIN
        while len(self.waiters):
            self._kick.clear()
            ids = [t for t in self.waiters.ids() if t not in self._records]
            self._rounds += 1
            found = await self._thread.run(self._final_many, ids) if ids else {}
            self.polls += 1
            for task_id, data in found.items():
                self._records[task_id] = data
                self.waiters.wake(task_id)
            delay = POLL_MIN if found else min(delay * POLL_GROWTH, POLL_MAX)
            try:
                await asyncio.wait_for(self._kick.wait(), delay)
                delay = POLL_MIN
            except asyncio.TimeoutError:
                pass

    def _final_many(self, task_ids: Sequence[str]) -> Dict[str, bytes]:
        """The final records among ``task_ids`` (runs in the poller's
        thread).  Default: the backend's ``get_many``, each record read for
        its state."""
        app = self.app
        out: Dict[str, bytes] = {}
        for task_id, data in zip(task_ids, app.backend.get_many(task_ids)):
            if data is not None:
                try:
                    meta = app.codec.decode_result(data, task_id, where="asyncio poller")
                except Exception:           # unreadable: the waiter's own decode says why
                    out[task_id] = data
                    continue
                if meta.get("state") in READY_STATES:
                    out[task_id] = data
        return out

    async def _close(self) -> None:
        poller, self._poller = self._poller, None
        if poller is not None and not poller.done():
            poller.cancel()
            try:
                await poller
            except (asyncio.CancelledError, Exception):
                pass
        self._thread.close()
