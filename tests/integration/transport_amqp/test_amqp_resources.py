"""Resource permits on a real RabbitMQ: the consumer's ``basic_qos`` is
raised for the tasks waiting for a permit (RabbitMQ counts their messages
as unacknowledged like any other), so a worker whose prefetch is all
waiting on a saturated resource is still handed, and runs, the tasks that
need none (docs/resources.md, "Head of line")."""
from __future__ import annotations

import threading
import uuid

import pytest

from greenq import GreenQ
from greenq.drivers import get_driver
from greenq.worker.consumer import Worker
from tests.conftest import AMQP_PREFIX, delete_queues

pytestmark = pytest.mark.amqp


def test_a_worker_whose_prefetch_waits_on_a_saturated_resource_still_runs_free_tasks(amqp_url):
    """-c 2, prefetch 2, pg limit 1: the holder keeps the permit until the ten
    free tasks finished (or 20 s), and six pg tasks are queued before the free
    ones.  With basic_qos at the prefetch alone, the waiting messages would
    take every unacknowledged place and RabbitMQ would hand over nothing more."""
    queue = f"gqa-{uuid.uuid4().hex[:8]}-res"
    app = GreenQ("amqpres", broker=amqp_url, default_queue=queue, key_prefix=AMQP_PREFIX, config_file=False)
    app.config.set("resource:pg", "limit", "1", origin="test")
    for key in ("concurrency", "prefetch"):        # the broker's own basic_qos before the worker raises it: 2
        app.config.set("worker", key, "2", origin="test")
    free_done, all_done = threading.Event(), threading.Event()
    lock = threading.Lock()
    done, order = [], []
    total = 1 + 6 + 10

    def finished(what):
        with lock:
            done.append(what)
            if len(done) == total:
                all_done.set()

    @app.task(name="amqpres.holder", resources={"pg": 1})
    def holder():
        held_through = free_done.wait(20)
        order.append(("holder", held_through))
        finished("holder")

    @app.task(name="amqpres.waiter", resources={"pg": 1})
    def waiter(n):
        order.append(("waiter", n))
        finished("waiter")

    @app.task(name="amqpres.free")
    def free(n):
        with lock:
            frees = sum(1 for what in done if what == "free") + 1
        if frees == 10:
            free_done.set()
        finished("free")

    worker = None
    try:
        holder.delay()
        for n in range(6):
            waiter.delay(n)
        for n in range(10):
            free.delay(n)
        worker = Worker(app, get_driver("threads"), queues=[queue], concurrency=2, prefetch=2,
                        fetch_timeout=0.1)
        box = {}
        thread = threading.Thread(target=lambda: box.setdefault("code", worker.run()), daemon=True)
        thread.start()
        assert all_done.wait(60), f"not every task ran: {done}"
        worker.request_stop()
        thread.join(30)
        assert not thread.is_alive() and box["code"] == 0
        assert order[0] == ("holder", True), "the free tasks did not run while the permit was held"
        assert sorted(n for what, n in order if what == "waiter") == list(range(6))
        assert worker.resources.pool("pg").in_use() == 0
    finally:
        if worker is not None and not worker.stopped.is_set():
            worker.request_stop(cold=True)
        app.close()
        delete_queues(amqp_url, [queue])
