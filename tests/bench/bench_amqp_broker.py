"""Micro-benchmark of the RabbitMQ broker alone (no worker):

    python tests/bench/bench_amqp_broker.py amqp://guest:guest@127.0.0.1:5672/VHOST

publish_many of 10,000 and single publishes, with publisher confirms on and
off, then fetch+ack of 20,000 messages with prefetch 100 and 1,000.  Uses
queues of its own (``bench-<uuid>``) and deletes them afterwards.
"""
import sys
import time
import uuid

from greenq.brokers import Outgoing, make_broker
from tests.conftest import make_config


def rate(n, seconds):
    return f"{n / seconds:10,.0f} msg/s  ({n} in {seconds:.2f} s)"


def main(url):
    queue = f"bench-{uuid.uuid4().hex[:8]}"
    body = b'{"v":1,"task":"bench.noop","id":"x","args":[1,2],"kwargs":{}}'
    for confirm in (True, False):
        broker = make_broker(url, make_config(broker_url=url, amqp__confirm_publish=confirm))
        broker.publish(Outgoing(queue, body, "warm"))
        msgs = [Outgoing(queue, body, uuid.uuid4().hex) for _ in range(10000)]
        start = time.perf_counter()
        broker.publish_many(msgs)
        print(f"confirms {'on ' if confirm else 'off'}  publish_many 10,000: {rate(10000, time.perf_counter() - start)}")
        start = time.perf_counter()
        for m in msgs[:3000]:
            broker.publish(m)
        print(f"confirms {'on ' if confirm else 'off'}  publish x 3,000:     {rate(3000, time.perf_counter() - start)}")
        broker.purge(queue)
        broker.close()
    for prefetch in (100, 1000):
        client = make_broker(url, make_config(broker_url=url, amqp__confirm_publish=False))
        client.publish_many([Outgoing(queue, body, uuid.uuid4().hex) for _ in range(20000)])
        consumer = make_broker(url, make_config(broker_url=url, worker__prefetch=prefetch))
        got = 0
        start = time.perf_counter()
        while got < 20000:
            batch = consumer.fetch([queue], 500, 1.0)
            consumer.ack(batch)
            got += len(batch)
        print(f"fetch+ack 20,000, prefetch {prefetch:5}: {rate(got, time.perf_counter() - start)}")
        consumer.close()
        client.close()
    cleanup = make_broker(url, make_config(broker_url=url))
    with cleanup.pool.publisher() as pub:
        pub.channel.queue_delete(queue)
    cleanup.close()


if __name__ == "__main__":
    main(sys.argv[1])
