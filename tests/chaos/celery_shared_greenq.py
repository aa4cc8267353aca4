"""The greenq side of the shared Celery queue run (celery_shared.py):
``shared.record`` under the name the Celery client sends, imported by real
greenq workers (``-A celery_shared_greenq``).

Each execution counts itself in Redis (the run's private server): ``HINCRBY
<key>:starts n`` as it starts, ``<key>:runs n`` when it is done, and
``<key>:by greenq`` -- so the run counts what ran, what ran twice and who ran
it, across both kinds of worker; ``<key>:first n`` is the process group that
began it first and ``<key>:active:<group>`` what that group is running (the
RabbitMQ run reads them: the broker does not say who holds a message).
"""
import os
import time

import redis

from greenq import GreenQ

app = GreenQ.from_config(name="celery-shared")
KEY = os.environ["SHARED_KEY"]
store = redis.Redis.from_url(os.environ["SHARED_REDIS_URL"])


@app.task(name="shared.record", ignore_result=True)
def record(n: int, pause: float) -> None:
    group = os.getpgrp()
    pipe = store.pipeline(transaction=False)
    pipe.hincrby(f"{KEY}:starts", str(n), 1)
    pipe.hsetnx(f"{KEY}:first", str(n), group)
    pipe.hset(f"{KEY}:active:{group}", str(n), 1)
    pipe.execute()
    time.sleep(pause)
    pipe = store.pipeline(transaction=False)
    pipe.hincrby(f"{KEY}:runs", str(n), 1)
    pipe.hincrby(f"{KEY}:by", "greenq", 1)
    pipe.hdel(f"{KEY}:active:{group}", str(n))
    pipe.execute()
