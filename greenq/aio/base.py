"""The two pluggable parts of the asyncio client, one small base class each.

* :class:`AsyncPublisher` writes encoded messages (``Outgoing``, made by the
  same ``MessageBuilder`` and ``Codec`` as a plain ``delay()``).  Its public
  ``publish`` is written once here: calls made while a write is under way
  are gathered and go out together in the next ``_publish_many``, so 200
  concurrent ``adelay`` cost a few round trips, not 200.
* :class:`AsyncResults` waits for result records.  Every implementation
  serves any number of concurrent ``wait`` calls from one source of
  notifications per client (a Redis pub/sub subscription, a RabbitMQ reply
  queue read by one thread, one poller): never one poll per result.  The
  waiters of a client are kept in one :class:`Waiters` table, which the
  source wakes by task id.

Implementations live beside their transport (greenq/transports/<tech>/aio.py)
or, for those that reuse the blocking client in a thread, in
greenq/aio/threaded.py; greenq/aio/client.py picks them by URL scheme.
Every one is bound to the event loop it was started on.
"""
from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Awaitable, Callable, Dict, Generic, List, Optional, Sequence, Set, Tuple, TypeVar

if TYPE_CHECKING:  # pragma: no cover
    from ..app import GreenQ
    from ..brokers.base import Outgoing

I = TypeVar("I")
O = TypeVar("O")


class Waiters:
    """The waits of one client, by task id: ``add`` gives an event that
    ``wake(task_id)`` (or ``wake_all()``, after a reconnect) sets.  Only
    touched from the loop's thread (threads hand over with
    ``loop.call_soon_threadsafe``)."""

    def __init__(self) -> None:
        self._events: Dict[str, Set[asyncio.Event]] = {}

    def __len__(self) -> int:
        return sum(len(events) for events in self._events.values())

    def __contains__(self, task_id: str) -> bool:
        return task_id in self._events

    def ids(self) -> List[str]:
        """The task ids someone waits for."""
        return list(self._events)

    def add(self, task_id: str) -> asyncio.Event:
        event = asyncio.Event()
        self._events.setdefault(task_id, set()).add(event)
        return event

    def remove(self, task_id: str, event: asyncio.Event) -> None:
        events = self._events.get(task_id)
        if events is not None:
            events.discard(event)
            if not events:
                del self._events[task_id]

    def wake(self, task_id: str) -> None:
        for event in self._events.get(task_id, ()):
            event.set()

    def wake_all(self) -> None:
        for events in self._events.values():
            for event in events:
                event.set()


class Batcher(Generic[I, O]):
    """Gathers calls: the items submitted during one turn of the loop, and
    while a batch is under way, go together to ``run(items)`` (at most
    ``limit`` a batch), which returns one result per item.  One task runs
    the batches, one after the other; a batch that raises raises in each of
    its callers.  So N concurrent calls cost a few round trips, and no turn
    of the loop packs more than ``limit`` of them."""

    def __init__(self, run: Callable[[List[I]], Awaitable[List[O]]], limit: int = 100) -> None:
        self._run = run
        self._limit = limit
        self._items: List[Tuple[I, "asyncio.Future[O]"]] = []
        self._task: Optional["asyncio.Task[None]"] = None

    async def submit(self, item: I) -> O:
        done: "asyncio.Future[O]" = asyncio.get_running_loop().create_future()
        self._items.append((item, done))
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._drain())
        return await done

    async def _drain(self) -> None:
        await asyncio.sleep(0)          # let the callers of this turn of the loop join the batch
        while self._items:
            batch, self._items = self._items[:self._limit], self._items[self._limit:]
            try:
                results = await self._run([item for item, _ in batch])
            except asyncio.CancelledError:
                for _, done in batch:
                    done.cancel()
                raise
            except BaseException as exc:
                for _, done in batch:
                    if not done.done():
                        done.set_exception(exc)
                continue
            for (_, done), result in zip(batch, results):
                if not done.done():
                    done.set_result(result)

    def cancel(self) -> None:
        """Stop the batches (closing): callers still waiting get CancelledError."""
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
        for _, done in self._items:
            done.cancel()
        self._items = []


class AsyncPublisher:
    """Writes messages for asyncio callers (module docstring)."""

    #: most messages one ``_publish_many`` writes
    batch_limit = 100

    def __init__(self, app: "GreenQ") -> None:
        self.app = app
        self._batcher: Batcher["Outgoing", None] = Batcher(self._publish_batch, self.batch_limit)
        #: [greenq] tracing: each message's producer span ends once its batch is written
        #: (greenq/tracing.py; a blocking broker's publish_many, watched, ends it first)
        self._traced = bool(app.config.tracing and not app.config.eager)

    async def start(self) -> None:
        """Make what publishing needs (called once, before the first publish)."""

    async def publish(self, message: "Outgoing") -> None:
        """Write ``message``; returns once the broker has it (as a plain
        ``publish`` does), or raises what the broker raised.  Concurrent
        calls are written together (``Batcher``)."""
        await self._batcher.submit(message)

    async def _publish_batch(self, messages: List["Outgoing"]) -> List[None]:
        if not self._traced:
            await self._publish_many(messages)
            return [None] * len(messages)
        from ..tracing import published
        try:
            await self._publish_many(messages)
        except BaseException as exc:
            published(messages, exc)
            raise
        published(messages)
        return [None] * len(messages)

    async def aclose(self) -> None:
        """Stop writing (callers still waiting get CancelledError); release
        connections and threads."""
        self._batcher.cancel()
        await self._close()

    # -- primitives --------------------------------------------------------------
    async def _publish_many(self, messages: Sequence["Outgoing"]) -> None:
        raise NotImplementedError

    async def _close(self) -> None:
        """Release connections and threads."""


class AsyncResults:
    """Waits for, reads and forgets result records for asyncio callers
    (module docstring)."""

    def __init__(self, app: "GreenQ") -> None:
        self.app = app
        self.waiters = Waiters()

    async def start(self) -> None:
        """Make what waiting needs (called once, before the first call)."""

    @property
    def subscriptions(self) -> int:
        """How many sources of notifications this client holds now (pub/sub
        connections, reply-queue readers, pollers): 0 or 1."""
        return 0

    async def wait(self, task_id: str, timeout: Optional[float]) -> Optional[bytes]:
        """The final record of ``task_id``, or None after ``timeout`` seconds
        (None: forever).  Never blocks the loop; cancelling it leaves nothing
        behind."""
        return await self._wait(task_id, timeout)

    async def get(self, task_id: str) -> Optional[bytes]:
        """The last record stored for ``task_id`` (final or not), or None."""
        return await self._get(task_id)

    async def forget(self, task_id: str) -> None:
        await self._forget(task_id)

    async def aclose(self) -> None:
        """Stop the source of notifications (waiters still waiting get
        CancelledError or time out); release connections and threads."""
        await self._close()

    # -- primitives --------------------------------------------------------------
    async def _wait(self, task_id: str, timeout: Optional[float]) -> Optional[bytes]:
        raise NotImplementedError

    async def _get(self, task_id: str) -> Optional[bytes]:
        """Default: the blocking backend's ``get``, in a thread."""
        return await asyncio.to_thread(self.app.backend.get, task_id)

    async def _forget(self, task_id: str) -> None:
        """Default: the blocking backend's ``forget``, in a thread."""
        await asyncio.to_thread(self.app.backend.forget, task_id)

    async def _close(self) -> None:
        """Release connections and threads."""


async def wait_event(event: asyncio.Event, deadline: Optional[float]) -> bool:
    """Wait for ``event`` until ``deadline`` (the loop's clock; None: no
    limit); True when it was set."""
    if deadline is None:
        await event.wait()
        return True
    left = deadline - asyncio.get_running_loop().time()
    if left <= 0:
        return event.is_set()
    try:
        await asyncio.wait_for(event.wait(), left)
    except asyncio.TimeoutError:
        return event.is_set()
    return True


def deadline_of(timeout: Optional[float]) -> Optional[float]:
    """``timeout`` seconds from now on the running loop's clock (None: none)."""
    return None if timeout is None else asyncio.get_running_loop().time() + max(0.0, timeout)
