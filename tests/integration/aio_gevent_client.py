"""Run by test_aio_suite.py as ``python aio_gevent_client.py BROKER_URL KEY_PREFIX QUEUE``:
the asyncio client in a process monkey-patched by gevent, beside a gevent
worker running in a greenlet of the same process.

Checks what docs/asyncio.md says of a gevent-patched process: asyncio's loop
runs on gevent's selector, so while it waits the hub runs the other
greenlets (the worker, a ticker); adelay/aget round trips work; a second
``asyncio.run`` in another greenlet of the same thread is refused by asyncio.
Prints one JSON line of what it saw.
"""
import sys

from gevent import monkey

monkey.patch_all()

import asyncio  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import gevent  # noqa: E402

from greenq import GreenQ  # noqa: E402
from greenq.aio import aclose, client_for  # noqa: E402
from greenq.drivers import get_driver  # noqa: E402
from greenq.worker.consumer import Worker  # noqa: E402

URL, PREFIX, QUEUE = sys.argv[1:4]


def make_app() -> GreenQ:
    app = GreenQ("aio-gevent", broker=URL, config_file=False, key_prefix=PREFIX, default_queue=QUEUE)

    @app.task(name="aio.add")
    def add(x, y):
        return x + y
    return app


client, worker_app = make_app(), make_app()
worker = Worker(worker_app, get_driver("gevent"), queues=[QUEUE], concurrency=10, burst=False, fetch_timeout=0.2)
worker_greenlet = gevent.spawn(worker.run)
ticks = [0]


def green_ticker():
    while True:
        gevent.sleep(0.005)
        ticks[0] += 1


ticker = gevent.spawn(green_ticker)


def nested_run():
    async def nothing():
        return "ran"
    coro = nothing()
    try:
        return asyncio.run(coro)
    except RuntimeError as exc:
        coro.close()
        return f"RuntimeError: {exc}"


async def main():
    add = client.tasks["aio.add"]
    loop = asyncio.get_running_loop()
    seen = {"selector": type(loop._selector).__name__}
    assert await (await add.adelay(1, 1)).aget(timeout=30) == 2
    seen["driver"] = client.driver.name if client.driver else None
    before = ticks[0]
    started = time.monotonic()
    results = await asyncio.gather(*(add.adelay(i, i) for i in range(50)))
    values = await asyncio.gather(*(r.aget(timeout=30) for r in results))
    seen["values_ok"] = values == [2 * i for i in range(50)]
    seen["round_trip_s"] = round(time.monotonic() - started, 3)
    seen["green_ticks_while_awaiting"] = ticks[0] - before
    seen["subscriptions"] = client_for(client).results.subscriptions
    nested = gevent.spawn(nested_run)
    await asyncio.sleep(0.1)              # the hub runs it while this loop waits
    seen["nested_asyncio_run"] = nested.value
    await aclose(client)
    return seen


seen = asyncio.run(main())
worker.request_stop()
worker_greenlet.join(20)
ticker.kill()
seen["worker_stopped"] = worker_greenlet.dead
client.close()
worker_app.close()
print(json.dumps(seen))
