"""Celery 5 side of resources_pg.py: the same body as greenq's `resbench.pg`,
with a blocking pool of $RESBENCH_POOL connections per worker process (the
usual hand-tuned setup).  Late acks; no result backend; Redis connection pools
sized from the concurrency, as in bench_celery_tasks.py."""
import os

from celery import Celery

import res_bodies as bodies

app = Celery("resbench", broker=os.environ["RESBENCH_REDIS_URL"])
size = int(os.environ.get("RESBENCH_CONCURRENCY") or 500) + 20
app.conf.update(task_acks_late=True, broker_connection_retry_on_startup=True,
                redis_max_connections=size, broker_transport_options={"max_connections": size},
                task_default_queue=os.environ.get("RESBENCH_PREFIX", "resbench"),
                worker_hijack_root_logger=False)

pg = app.task(name="resbench.pg", ignore_result=True)(bodies.pg_query)
