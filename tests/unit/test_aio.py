"""The asyncio client's pieces that need no server: the Batcher that gathers
concurrent calls, eager mode, one client per app and loop.  The shared suite
on every broker: tests/integration/test_aio_suite.py."""
from __future__ import annotations

import asyncio

import pytest

from greenq import GreenQ
from greenq.aio import aclose, client_for
from greenq.aio.base import Batcher, Waiters
from greenq.aio.threaded import PollingResults, ThreadedPublisher
from greenq.result import EagerResult


def test_batcher_gathers_concurrent_calls_in_batches_of_at_most_limit():
    batches = []

    async def run(items):
        batches.append(list(items))
        await asyncio.sleep(0.01)
        return [item * 10 for item in items]

    async def main():
        batcher = Batcher(run, limit=4)
        values = await asyncio.gather(*(batcher.submit(i) for i in range(10)))
        assert values == [i * 10 for i in range(10)]
        assert batches == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
        assert await batcher.submit(42) == 420          # later calls start a new batch
    asyncio.run(main())


def test_batcher_failure_reaches_each_caller_of_its_batch_only():
    async def run(items):
        if "bad" in items:
            raise ValueError("refused")
        return items

    async def main():
        batcher = Batcher(run, limit=2)
        outcomes = await asyncio.gather(*(batcher.submit(x) for x in ("a", "bad", "c")),
                                        return_exceptions=True)
        assert isinstance(outcomes[0], ValueError) and isinstance(outcomes[1], ValueError)
        assert outcomes[2] == "c"
    asyncio.run(main())


def test_waiters_wake_by_task_id_and_all():
    async def main():
        waiters = Waiters()
        a1, a2, b = waiters.add("a"), waiters.add("a"), waiters.add("b")
        waiters.wake("a")
        assert a1.is_set() and a2.is_set() and not b.is_set()
        waiters.wake_all()
        assert b.is_set()
        waiters.remove("a", a1)
        waiters.remove("a", a2)
        assert waiters.ids() == ["b"] and len(waiters) == 1
    asyncio.run(main())


def test_eager_mode_runs_here_and_returns_a_finished_result():
    app = GreenQ("eager", broker="memory://aio-eager", config_file=False, eager=True)

    @app.task(name="e.add")
    def add(x, y):
        return x + y

    @app.task(name="e.boom")
    def boom():
        raise KeyError("nope")

    async def main():
        r = await add.adelay(2, 3)
        assert isinstance(r, EagerResult) and await r.aget() == 5 and await r.aready()
        assert await (await app.asend_task("e.add", (1, 1))).aget(timeout=0) == 2
        with pytest.raises(KeyError):
            await (await boom.aapply_async()).aget()
        await r.aforget()
        assert r.state == "PENDING"
    asyncio.run(main())


def test_one_client_per_app_and_loop_chosen_by_url():
    app = GreenQ("c", broker="memory://aio-clients", config_file=False)
    seen = []

    async def main():
        client = client_for(app)
        assert client_for(app) is client
        assert isinstance(client.publisher, ThreadedPublisher) and isinstance(client.results, PollingResults)
        seen.append(client)
        await aclose(app)
        assert client_for(app) is not client          # closed: the next use makes another
        await aclose(app)
    asyncio.run(main())
    asyncio.run(main())
    assert seen[0] is not seen[1]                       # another loop, another client
    app.close()


def test_a_bad_option_is_refused_before_anything_is_sent():
    app = GreenQ("v", broker="memory://aio-validate", config_file=False)

    @app.task(name="v.add")
    def add(x, y):
        return x + y

    async def main():
        with pytest.raises(TypeError, match="unknown option"):
            await add.aapply_async((1, 2), colour="red")
        with pytest.raises(TypeError, match="countdown must be a number"):
            await add.aapply_async((1, 2), countdown="soon")
        assert [s.ready for s in app.broker.queue_stats(["default"])] == [0]
        await add.adelay(1, 2)
        assert [s.ready for s in app.broker.queue_stats(["default"])] == [1]
        await aclose(app)
    asyncio.run(main())
    app.close()


def test_timeout_zero_looks_once_for_a_stored_result():
    """aget(timeout=0), as get(timeout=0): a stored result is found even
    though no poll has run yet; a missing one times out at once."""
    from greenq import TimeoutError as GreenqTimeout
    from greenq.result import SUCCESS, make_meta
    app = GreenQ("z", broker="memory://aio-zero", config_file=False)

    async def main():
        app.backend.store("done-1", app.codec.encode_result(make_meta("done-1", SUCCESS, result=7)))
        assert await app.AsyncResult("done-1").aget(timeout=0) == 7
        with pytest.raises(GreenqTimeout):
            await app.AsyncResult("missing-1").aget(timeout=0)
        await aclose(app)
    asyncio.run(main())
    app.close()


def test_the_asyncio_parts_are_the_transports_capabilities():
    from greenq.aio.base import AsyncPublisher, AsyncResults
    from greenq.transports import capability_of, resolve
    for url in ("redis://h/0", "rediss://h/0"):
        assert issubclass(resolve(capability_of(url, "async_publisher")), AsyncPublisher)
    for url in ("redis://h/0", "rpc://", "sqlite:///x.db"):
        assert issubclass(resolve(capability_of(url, "async_results")), AsyncResults)
    # none: the client drives the blocking one from a thread
    assert capability_of("memory://m", "async_publisher") is None
    assert capability_of("redis+cluster://h:7000", "async_publisher") is None
    assert capability_of("amqp://h/", "async_publisher") is None
    assert capability_of("memory://m", "async_results") is None
