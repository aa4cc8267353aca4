"""The asyncio client on ``redis://`` and ``rediss://`` (redis.asyncio).

* :class:`RedisPublisher` writes the calls ``broker.publish_calls`` makes of
  each gathered batch (the PUBLISH script, the key names of the app's own
  RedisBroker: the same keys and entries as ``delay()``) in one pipelined
  round trip, with ``WAIT`` when ``[redis] min_replicas`` is set.
* :class:`RedisResults` follows the result backend's protocol
  (greenq/transports/redis/results.py): ONE pub/sub connection per client,
  subscribed to a reply channel of its own, read by one task that wakes the
  waiters of each task id published on it.  A waiter runs the backend's
  CHECK_IN script (the record if final, else its channel added to the
  task's ``waiters`` set, atomically) once subscribed, then sleeps until
  woken.  After a reconnect every waiter checks in again.  The reader ends
  after ``[redis] idle_timeout`` seconds without waiters (the next wait
  starts another on the same channel).

Commands share a pool of ``[redis] max_connections`` (default 10)
connections per part, named ``greenq-<prefix>-<pid>-aio`` in CLIENT LIST: a
thousand concurrent waits queue for them, they never open a thousand.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import TYPE_CHECKING, Any, List, Optional, Sequence, Set, Tuple

import redis
import redis.asyncio as aredis

from ...aio.base import AsyncPublisher, AsyncResults, Batcher, deadline_of, wait_event
from ...backends import backend_url_for
from ...config import Config, mask_url
from ...exceptions import BrokerError
from ...reconnect import reconnect_delay
from . import lua
from .broker import publish_calls
from .client import CLIENT_CONNECTIONS, client_name
from .results import CHECK_IN, FINAL

if TYPE_CHECKING:  # pragma: no cover
    from ...app import GreenQ
    from ...brokers.base import Outgoing

log = logging.getLogger("greenq.transports.redis.aio")

LISTEN_SLICE = 1.0      # seconds the reader waits for a message before it looks at its idle time


def make_async_client(url: str, config: Config, role: str, extra: int = 0) -> "aredis.Redis":
    """A redis.asyncio client on a pool of ``[redis] max_connections`` (or
    CLIENT_CONNECTIONS) plus ``extra`` connections, where callers over the
    cap wait for a connection; set up from ``[redis]`` as the blocking
    client is (greenq/transports/redis/client.py)."""
    opts = config.section("redis")
    timeout = opts["socket_timeout"] or None
    connect = opts["connect_timeout"] or timeout or 2.0
    try:
        pool = aredis.BlockingConnectionPool.from_url(
            url, max_connections=(opts["max_connections"] or CLIENT_CONNECTIONS) + extra, timeout=None,
            socket_timeout=timeout, socket_connect_timeout=connect, socket_keepalive=True,
            health_check_interval=opts["health_check_interval"],
            client_name=client_name(config.key_prefix, role))
    except (ValueError, TypeError) as exc:
        raise BrokerError(f"bad Redis URL {mask_url(url)}: {exc}") from None
    return aredis.Redis(connection_pool=pool)


class RedisPublisher(AsyncPublisher):
    """Batches written with the PUBLISH script (module docstring)."""

    def __init__(self, app: "GreenQ") -> None:
        super().__init__(app)
        self._client: Optional["aredis.Redis"] = None
        self._script: Any = None
        self._registered: Set[str] = set()     # queues known in P:queues
        self._names: Any = None            # the app's RedisBroker: key names only, no I/O

    async def start(self) -> None:
        config = self.app.config
        self._names = self.app.broker      # made by the client's start, in a thread
        self._min_replicas = config.section("redis")["min_replicas"]
        self._timeout = config.section("redis")["socket_timeout"] or 30.0
        self._client = make_async_client(config.broker_url, config, "aio")
        self._script = self._client.register_script(lua.PUBLISH)

    async def _publish_many(self, messages: Sequence["Outgoing"]) -> None:
        client, names = self._client, self._names
        assert client is not None, "started"
        new_queues = sorted({m.queue for m in messages} - self._registered)
        calls = publish_calls(messages, names.streams, names._delayed, names._k_queues, new_queues, time.time())
        for attempt in (1, 2):
            pipe = client.pipeline(transaction=False)
            for keys, args in calls:
                pipe.evalsha(self._script.sha, len(keys), *keys, *args)
            if self._min_replicas:
                pipe.execute_command("WAIT", self._min_replicas, int(self._timeout * 500))
            try:
                replies = await pipe.execute()
            except redis.exceptions.NoScriptError:
                if attempt == 2:
                    raise
                await client.script_load(lua.PUBLISH)
                continue
            except redis.RedisError as exc:
                raise BrokerError(f"redis broker {mask_url(self.app.config.broker_url)}: publish: {exc}") from exc
            if self._min_replicas and replies[-1] < self._min_replicas:
                raise BrokerError(f"publish: only {replies[-1]} of [redis] min_replicas = "
                                  f"{self._min_replicas} replica(s) confirmed the write")
            break
        self._registered.update(new_queues)

    async def _close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose(close_connection_pool=True)


class RedisResults(AsyncResults):
    """One pub/sub subscription for every waiter (module docstring)."""

    def __init__(self, app: "GreenQ") -> None:
        super().__init__(app)
        config = app.config
        self.url = backend_url_for(config)
        self.prefix = config.key_prefix
        self.expires = int(config.result_expires)
        self.idle_close = float(config.section("redis")["idle_timeout"] or 0)
        self.channel = f"{self.prefix}:reply:{uuid.uuid4().hex}"
        self._client: Optional["aredis.Redis"] = None
        self._check_in: Any = None
        self._reader: Optional["asyncio.Task[None]"] = None
        self._subscribed = asyncio.Event()
        self._last_wait = 0.0
        self._check_ins: Batcher[Tuple[str, int], Optional[bytes]] = Batcher(self._check_in_many)

    async def start(self) -> None:
        self._client = make_async_client(self.url, self.app.config, "aio", extra=1)   # +1: the subscription
        self._check_in = self._client.register_script(CHECK_IN)

    @property
    def subscriptions(self) -> int:
        return int(self._reader is not None and not self._reader.done() and self._subscribed.is_set())

    def _key(self, kind: str, task_id: str) -> str:
        return f"{self.prefix}:{kind}:{task_id}"

    def _error(self, what: str, exc: BaseException) -> BrokerError:
        return BrokerError(f"redis result backend {mask_url(self.url)}: {what}: {exc}")

    async def _wait(self, task_id: str, timeout: Optional[float]) -> Optional[bytes]:
        deadline = deadline_of(timeout)
        event = self.waiters.add(task_id)
        self._last_wait = time.monotonic()
        try:
            if self._reader is None or self._reader.done():
                self._subscribed.clear()
                self._reader = asyncio.ensure_future(self._listen())
            if not await wait_event(self._subscribed, deadline):
                if self._reader.done() or timeout is None:
                    raise BrokerError(f"wait for result: redis result backend {mask_url(self.url)}: "
                                      "the result listener could not subscribe")
                return await self._final_now(task_id)     # timed out before subscribing (timeout=0): look once
            lifetime = int(timeout if timeout is not None else (self.expires or 86400)) + 60
            while True:
                event.clear()
                value = await self._check_ins.submit((task_id, lifetime))
                if value is not None:
                    return value
                if not await wait_event(event, deadline):
                    return None
        finally:
            self.waiters.remove(task_id, event)
            self._last_wait = time.monotonic()

    async def _check_in_many(self, calls: List[Tuple[str, int]]) -> List[Optional[bytes]]:
        """CHECK_IN for each (task id, seconds), in one pipelined round trip:
        the final record of each, or None (and this client's channel added
        to the task's waiters)."""
        assert self._client is not None, "started"
        for attempt in (1, 2):
            pipe = self._client.pipeline(transaction=False)
            for task_id, lifetime in calls:
                pipe.evalsha(self._check_in.sha, 2, self._key("result", task_id), self._key("waiters", task_id),
                             self.channel, lifetime)
            try:
                values = await pipe.execute()
            except redis.exceptions.NoScriptError:
                if attempt == 2:
                    raise
                await self._client.script_load(CHECK_IN)
                continue
            except redis.RedisError as exc:
                raise self._error("wait for result", exc) from exc
            return [bytes(v[1:]) if v is not None and v[:1] == FINAL else None for v in values]
        raise AssertionError("unreachable")

    async def _listen(self) -> None:
        """The reader: subscribed to ``channel``, it wakes the waiters of
        each task id published there; reconnects with backoff."""
        assert self._client is not None, "started"
        failures = 0
        while True:
            pubsub = self._client.pubsub()
            try:
                await pubsub.subscribe(self.channel)
                while True:
                    message = await pubsub.get_message(timeout=LISTEN_SLICE)
                    if message is None:
                        if self._idle():
                            return
                        continue
                    if message["type"] == "subscribe":
                        if failures >= 2:
                            log.warning("%s: asyncio result listener reconnected", mask_url(self.url))
                        failures = 0
                        self._subscribed.set()
                        self.waiters.wake_all()      # anything stored while away is read again
                    elif message["type"] == "message":
                        data = message["data"]
                        self.waiters.wake(data.decode() if isinstance(data, bytes) else str(data))
            except asyncio.CancelledError:
                raise
            except Exception as exc:       # the reader must outlive any failure
                self._subscribed.clear()
                failures += 1
                if failures == 2:
                    log.warning("%s: asyncio result listener lost its connection (%s); reconnecting",
                                mask_url(self.url), exc)
                if self._idle():
                    return
                await asyncio.sleep(reconnect_delay(failures))
            finally:
                self._subscribed.clear()
                try:
                    await asyncio.shield(pubsub.aclose())
                except Exception:  # pragma: no cover - its connection is gone already
                    pass

    def _idle(self) -> bool:
        """True when nobody has waited for ``idle_timeout`` seconds."""
        return bool(self.idle_close) and not len(self.waiters) and \
            time.monotonic() - self._last_wait > self.idle_close

    async def _read(self, task_id: str) -> Optional[bytes]:
        """The stored value: b"F" (final) or b"P", then the record."""
        assert self._client is not None, "started"
        try:
            value: Optional[bytes] = await self._client.get(self._key("result", task_id))   # type: ignore[assignment]  # bytes: no decode_responses
        except redis.RedisError as exc:
            raise self._error("get result", exc) from exc
        return value

    async def _get(self, task_id: str) -> Optional[bytes]:
        value = await self._read(task_id)
        return None if value is None else value[1:]

    async def _final_now(self, task_id: str) -> Optional[bytes]:
        value = await self._read(task_id)
        return value[1:] if value is not None and value[:1] == FINAL else None

    async def _forget(self, task_id: str) -> None:
        assert self._client is not None, "started"
        try:
            await self._client.delete(self._key("result", task_id), self._key("waiters", task_id))
        except redis.RedisError as exc:
            raise self._error("forget result", exc) from exc

    async def _close(self) -> None:
        self._check_ins.cancel()
        reader, self._reader = self._reader, None
        if reader is not None and not reader.done():
            reader.cancel()
            try:
                await reader
            except (asyncio.CancelledError, Exception):
                pass
        client, self._client = self._client, None
        if client is not None:
            await client.aclose(close_connection_pool=True)
