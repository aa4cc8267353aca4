"""Run by test_green_drivers.py as ``python green_roundtrip.py gevent|eventlet DIR``:
the embedded brokers and backends in a process patched for a green driver.

Checks that the hub keeps running while a fetch or a wait blocks, that a
publish or a store from another greenlet wakes them, that SQLite work runs in
the driver's real threads, and that many greenlets fetching at once never get
the same message twice.  Prints OK and exits 0 on success.
"""
import sys

DRIVER = sys.argv[1]
if DRIVER == "gevent":
    from gevent import monkey
    monkey.patch_all()
else:
    import eventlet
    eventlet.monkey_patch()

import os  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

from greenq.backends import make_backend  # noqa: E402
from greenq.brokers import Outgoing, make_broker  # noqa: E402
from greenq.transports.sqlite.client import Database  # noqa: E402
from greenq.drivers import get_driver  # noqa: E402
from tests.conftest import make_config  # noqa: E402

driver = get_driver(DRIVER)
assert driver.is_patched(), f"{DRIVER} did not patch"
MAIN_THREAD = threading.get_native_id()   # gevent and eventlet leave the OS thread id alone
db_threads = set()
_run = Database.run


def traced_run(self, fn, *args):
    db_threads.add(threading.get_native_id())
    return _run(self, fn, *args)


Database.run = traced_run


class Ticker:
    """A greenlet that ticks every 10 ms: proof that the hub is not blocked."""

    def __init__(self):
        self.ticks = 0
        self.running = True
        self.handle = driver.spawn(self._loop)

    def _loop(self):
        while self.running:
            driver.sleep(0.01)
            self.ticks += 1

    def stop(self):
        self.running = False
        self.handle.join(1)


def later(seconds, fn, *args):
    def run():
        driver.sleep(seconds)
        fn(*args)
    return driver.spawn(run)


def check(kind, url):
    config = make_config(broker_url=url, lease_seconds=1)
    consumer = make_broker(url, config, driver)
    client = make_broker(url, config, driver)
    q = f"{kind}-green"
    consumer.declare([q])

    # an empty fetch blocks this greenlet only
    ticker = Ticker()
    start = time.monotonic()
    assert consumer.fetch([q], 10, 0.5) == []
    assert time.monotonic() - start >= 0.45
    ticker.stop()
    assert ticker.ticks >= 20, f"{kind}: the hub was blocked during fetch ({ticker.ticks} ticks)"

    # a publish from another greenlet wakes a blocked fetch; fetch/ack round trip
    later(0.2, client.publish, Outgoing(q, b"hello", "m1"))
    start = time.monotonic()
    [d] = consumer.fetch([q], 10, 10.0)
    assert time.monotonic() - start < 5.0   # woke on the publish, not at its 10 s timeout
    assert (d.body, d.message_id, d.deliveries) == (b"hello", "m1", 1)
    consumer.ack([d])
    assert consumer.fetch([q], 10, 0.05) == []

    # many greenlets publish and fetch at once: nothing lost, nothing twice
    total, publishers = 400, 20
    handles = [driver.spawn(client.publish_many,
                            [Outgoing(q, b"x", f"p{p}-{i}") for i in range(total // publishers)])
               for p in range(publishers)]
    seen = []
    consumers = [make_broker(url, config, driver) for _ in range(3)] + [consumer, consumer]

    def consume(broker):
        deadline = time.monotonic() + 10
        while len(seen) < total and time.monotonic() < deadline:
            batch = broker.fetch([q], 7, 0.2)
            if batch:
                broker.ack(batch)
                seen.extend(x.message_id for x in batch)
    handles += [driver.spawn(consume, b) for b in consumers]
    for h in handles:
        assert h.join(20)
    assert len(seen) == total and len(set(seen)) == total, (len(seen), len(set(seen)))

    # a result wait blocks this greenlet only and wakes on a store from another one
    client_backend = make_backend(url, config, driver)
    worker_backend = make_backend(url, config, driver)
    ticker = Ticker()
    later(0.3, worker_backend.store, "task-1", b"result")
    start = time.monotonic()
    assert client_backend.wait("task-1", 10.0) == b"result"
    assert 0.25 <= time.monotonic() - start < 5.0   # woke on the store, not at its 10 s timeout
    assert client_backend.wait("task-2", 0.3) is None
    ticker.stop()
    assert ticker.ticks >= 30, f"{kind}: the hub was blocked during wait ({ticker.ticks} ticks)"

    for obj in consumers[:3] + [client, consumer, client_backend, worker_backend]:
        obj.close()


check("memory", "memory://green")
assert not db_threads
check("sqlite", f"sqlite:///{os.path.join(sys.argv[2], 'green.sqlite3')}")
assert db_threads and MAIN_THREAD not in db_threads, "sqlite ran in the hub's thread"
print("OK", DRIVER, "sqlite threads:", len(db_threads))
