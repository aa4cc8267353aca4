"""Results of tasks taken from Celery queues, stored where Celery's Redis
result backend keeps them (``celery-task-meta-<id>``, SETEX and PUBLISH on
that name: greenq.celery.results), beside greenq's own record, so an
unmodified Celery client's ``AsyncResult.get()`` returns them."""
from __future__ import annotations

from typing import Sequence, Tuple

from ...celery.results import key
from .results import RedisBackend


class CeleryRedisBackend(RedisBackend):
    """``RedisBackend`` that can also write Celery's records."""

    def store_celery(self, records: Sequence[Tuple[str, bytes]]) -> None:
        """Write ``(task id, encoded record)`` pairs as Celery's backend does,
        in one round trip."""
        if not records:
            return

        def write() -> None:
            pipe = self.client.pipeline(transaction=False)
            for task_id, data in records:
                name = key(task_id)
                if self.expires:
                    pipe.setex(name, self.expires, data)
                else:
                    pipe.set(name, data)
                pipe.publish(name, data)
            pipe.execute()
        self._call(write, self._timeout, "store Celery results")
