"""The Celery side of the shared Celery queue run (celery_shared.py): a
Celery 5 app whose ``shared.record`` counts itself as celery_shared_greenq.py
does (``<key>:by celery``), run by real ``celery worker`` processes.

What a Celery user sharing a queue with a greenq worker runs (docs/celery.md,
"Sharing a queue under failure"):

- ``task_acks_late``: the message is acknowledged after the task ran, so a
  worker killed mid-task loses nothing (Celery's default acknowledges on
  receipt: what a killed worker had received, running or prefetched, is gone);
- ``task_reject_on_worker_lost``: with the prefork pool, a child killed
  mid-task gives its message back rather than failing it;
- ``worker_prefetch_multiplier = 1``: a Celery worker holds no more than its
  concurrency, so nothing waits in its memory long enough to reach the
  visibility timeout (kombu does not extend it for a message held);
- ``broker_transport_options["visibility_timeout"]``: ``$SHARED_VT`` seconds,
  the same as greenq's ``celery_visibility_timeout`` (Redis; RabbitMQ has none:
  a dead consumer's unacknowledged messages come back when its connection
  closes).

The broker is ``$SHARED_BROKER_URL`` (Redis or RabbitMQ), else the ledger's
Redis, ``$SHARED_REDIS_URL``.
"""
import os
import time

import redis
from celery import Celery

KEY = os.environ["SHARED_KEY"]
VT = float(os.environ["SHARED_VT"])
size = int(os.environ.get("SHARED_CONCURRENCY") or 20) + 20
app = Celery("celery-shared", broker=os.environ.get("SHARED_BROKER_URL") or os.environ["SHARED_REDIS_URL"])
app.conf.update(
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    task_ignore_result=True,
    worker_enable_remote_control=False,
    broker_connection_retry_on_startup=True,
    redis_max_connections=size,
    broker_transport_options={"visibility_timeout": VT, "max_connections": size},
)
store = redis.Redis.from_url(os.environ["SHARED_REDIS_URL"])


@app.task(name="shared.record")
def record(n, pause):
    group = os.getpgrp()             # the worker's (a prefork child's parent's): it is what gets killed
    pipe = store.pipeline(transaction=False)
    pipe.hincrby(f"{KEY}:starts", str(n), 1)
    pipe.hsetnx(f"{KEY}:first", str(n), group)
    pipe.hset(f"{KEY}:active:{group}", str(n), 1)
    pipe.execute()
    time.sleep(pause)
    pipe = store.pipeline(transaction=False)
    pipe.hincrby(f"{KEY}:runs", str(n), 1)
    pipe.hincrby(f"{KEY}:by", "celery", 1)
    pipe.hdel(f"{KEY}:active:{group}", str(n))
    pipe.execute()
