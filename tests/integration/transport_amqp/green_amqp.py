"""Run by test_amqp.py as ``python green_amqp.py gevent|eventlet AMQP_URL``: the
RabbitMQ broker and rpc:// in a process patched for a green driver.

Checks that the hub keeps running while a fetch and an rpc wait block, that
acks from other greenlets go out while the consumer loop reads, that 300
greenlets publishing at once share the bounded channel pool (nothing per call,
as in a gevent web server) and, once the queue is declared, the confirm waits
of one connection, and that many greenlets waiting for results are
all served.  Prints OK and exits 0 on success.
"""
import sys

DRIVER, URL = sys.argv[1], sys.argv[2]
if DRIVER == "gevent":
    from gevent import monkey
    monkey.patch_all()
else:
    import eventlet
    eventlet.monkey_patch()

import time  # noqa: E402
import uuid  # noqa: E402

from greenq.backends import make_backend  # noqa: E402
from greenq.backends.base import Record  # noqa: E402
from greenq.brokers import Outgoing, make_broker  # noqa: E402
from greenq.drivers import get_driver  # noqa: E402
from greenq.transports.amqp.publish import SharedPublisher  # noqa: E402
from tests.conftest import delete_queues, make_config  # noqa: E402

driver = get_driver(DRIVER)
assert driver.is_patched()
config = make_config(broker_url=URL)
q = f"gqg-{uuid.uuid4().hex[:8]}"


class Ticker:
    def __init__(self):
        self.ticks, self.running = 0, True
        driver.spawn(self._loop)

    def _loop(self):
        while self.running:
            self.ticks += 1
            driver.sleep(0.01)


# a blocked fetch and a blocked rpc wait leave the hub running
worker_side = make_broker(URL, config, driver)
ticker = Ticker()
start = time.monotonic()
assert worker_side.fetch([q], 10, 0.5) == []
assert ticker.ticks >= 25, f"hub blocked during fetch: {ticker.ticks} ticks"
client_results = make_backend("rpc://", config)          # a plain client: no driver
ticker.ticks = 0
assert client_results.wait("nothing", 0.5) is None
assert ticker.ticks >= 25, f"hub blocked during rpc wait: {ticker.ticks} ticks"

# 300 greenlets publish at once through the client's pool
client = make_broker(URL, config)
handles = [driver.spawn(client.publish, Outgoing(q, b"x", f"m{i}")) for i in range(300)]
for h in handles:
    h.join(30)
assert client.pool._count <= client.pool.size, (client.pool._count, client.pool.size)

# 300 more, the queue declared: they share the confirm waits of one connection
most_users = [0]
shared_send = SharedPublisher.send


def counting_send(pub, *args):
    confirm = shared_send(pub, *args)
    most_users[0] = max(most_users[0], pub.users)
    return confirm


SharedPublisher.send = counting_send
handles = [driver.spawn(client.publish, Outgoing(q, b"x", f"n{i}")) for i in range(300)]
for h in handles:
    h.join(30)
SharedPublisher.send = shared_send
assert most_users[0] > 1, most_users

# the worker's consumer: fetch here, ack from other greenlets while its loop reads
got, acks = [], []
deadline = time.monotonic() + 20
while len(got) < 600 and time.monotonic() < deadline:
    batch = worker_side.fetch([q], 50, 0.5)
    got.extend(batch)
    acks.append(driver.spawn(worker_side.ack, batch))
for h in acks:
    h.join(10)
assert sorted(d.message_id for d in got) == sorted([f"m{i}" for i in range(300)] + [f"n{i}" for i in range(300)]), \
    len(got)
assert worker_side.fetch([q], 10, 0.3) == []
worker_side.close()
fresh = make_broker(URL, config, driver)
assert fresh.fetch([q], 10, 0.5) == [], "acks from other greenlets were lost"
fresh.close()

# 100 greenlets wait for their own results
reply_to = client_results.reply_to()
results = {}


def wait_for(task_id):
    results[task_id] = client_results.wait(task_id, 10)


waiters = [driver.spawn(wait_for, f"t{i}") for i in range(100)]
driver.sleep(0.2)
worker_results = make_backend("rpc://", config, driver)
worker_results.store_many([Record(f"t{i}", str(i).encode(), True, reply_to) for i in range(100)])
for h in waiters:
    h.join(15)
assert results == {f"t{i}": str(i).encode() for i in range(100)}, len(results)

ticker.running = False
for thing in (client, client_results, worker_results):
    thing.close()
delete_queues(URL, [q], config.key_prefix)
print("OK", round(time.monotonic() - start, 2))
