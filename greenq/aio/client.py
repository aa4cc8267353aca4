"""The asyncio client of an app: one per app and event loop.

``client_for(app)`` gives the running loop's client of ``app``, made on
first use: a publisher chosen by the broker URL's scheme and a results part
chosen by the result backend URL's scheme (the transport descriptor's
``async_publisher`` and ``async_results`` capabilities, greenq/transports/;
where it has none, the blocking client runs from a thread: greenq/aio/threaded.py).
``Task.adelay``, ``app.asend_task`` and ``AsyncResult.aget`` go through it.

Messages are built and encoded by the app exactly as ``delay()`` builds
them (``app.build_message``, ``app.codec.outgoing``): the same checks, the
same routing, the same bytes; only the write and the wait are asynchronous.
The builder reads the broker's name limits and the result backend's reply
address; the client makes both objects in a thread before its first send
(``rpc://`` opens its reply queue then), so building never blocks the loop.

``await greenq.aio.aclose(app)`` closes the running loop's client (FastAPI's
lifespan, Django's ``shutdown``); a loop that ends without it leaves its
connections to the garbage collector.
"""
from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Dict, Optional, Sequence

from ..backends import backend_url_for
from ..transports import capability_of, resolve
from .base import AsyncPublisher, AsyncResults
from .threaded import PollingResults, ThreadedPublisher

if TYPE_CHECKING:  # pragma: no cover
    from ..app import GreenQ
    from ..result import AsyncResult

#: loop -> app -> client.  Not weak: a client's futures hold its loop, so a
#: weak key would never go; the clients of closed loops are dropped instead
#: whenever a client is made.
_clients: "Dict[asyncio.AbstractEventLoop, Dict[GreenQ, AsyncClient]]" = {}


class AsyncClient:
    """Sends and waits for one app on one event loop (module docstring)."""

    def __init__(self, app: "GreenQ") -> None:
        self.app = app
        publisher = capability_of(app.config.broker_url, "async_publisher", app.config)
        results = capability_of(backend_url_for(app.config), "async_results", app.config)
        self.publisher: AsyncPublisher = (resolve(publisher)(app) if isinstance(publisher, str)
                                          else ThreadedPublisher(app))
        self.results: AsyncResults = resolve(results)(app) if isinstance(results, str) else PollingResults(app)
        self._started: Optional["asyncio.Future[None]"] = None
        self._forks = _forks()

    async def ready(self) -> None:
        """Start both parts once (concurrent first callers wait for the same start)."""
        started = self._started
        if started is not None and started.done():
            if not started.cancelled() and started.exception() is None:
                return
            started = None                   # it failed: the next caller tries again
        if started is None:
            started = self._started = asyncio.ensure_future(self._start())
        await asyncio.shield(started)

    async def _start(self) -> None:
        target = self.app.builder.target     # what building consults: made here, in a thread
        await asyncio.to_thread(lambda: (target.limits(), target.reply_to()))
        await self.publisher.start()
        await self.results.start()

    async def send(self, name: str, args: Sequence[Any], kwargs: Optional[Dict[str, Any]],
                   options: Dict[str, Any]) -> "AsyncResult[Any]":
        """``send_task``'s message, published without blocking the loop."""
        from ..result import AsyncResult
        await self.ready()
        app = self.app
        msg = app.build_message(name, args, kwargs, **options)
        await self.publisher.publish(app.codec.outgoing(msg))
        return AsyncResult(msg.id, app, name)

    async def wait(self, task_id: str, timeout: Optional[float]) -> Optional[bytes]:
        await self.ready()
        return await self.results.wait(task_id, timeout)

    async def get(self, task_id: str) -> Optional[bytes]:
        await self.ready()
        return await self.results.get(task_id)

    async def forget(self, task_id: str) -> None:
        await self.ready()
        await self.results.forget(task_id)

    async def aclose(self) -> None:
        started, self._started = self._started, None
        if started is not None and not started.done():
            started.cancel()
        await self.publisher.aclose()
        await self.results.aclose()


def _forks() -> int:
    from ..app import _FORKS
    return _FORKS[0]


def client_for(app: "GreenQ") -> AsyncClient:
    """The running loop's client of ``app``, made on first use (a forked
    child makes its own)."""
    loop = asyncio.get_running_loop()
    per_loop = _clients.get(loop)
    client = per_loop.get(app) if per_loop is not None else None
    if client is None or client._forks != _forks():
        for other in [other for other in _clients if other.is_closed()]:
            del _clients[other]        # ended without aclose: their sockets go with them
        client = _clients.setdefault(loop, {})[app] = AsyncClient(app)
    return client


async def aclose(app: "GreenQ") -> None:
    """Close ``app``'s client of the running loop, if it has one."""
    per_loop = _clients.get(asyncio.get_running_loop())
    client = per_loop.pop(app, None) if per_loop is not None else None
    if client is not None:
        await client.aclose()
