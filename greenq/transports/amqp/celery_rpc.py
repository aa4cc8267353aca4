"""``rpc://`` results of tasks taken from Celery queues, in Celery's form:
what Celery's ``RPCBackend.store_result`` publishes, so an unmodified Celery
client (``result_backend = 'rpc://'``) gets them from ``AsyncResult.get()``.

Celery's client names its reply queue in the message's ``reply_to`` and the
task id in ``correlation_id``; its worker publishes the result record
(``greenq.celery.results``: ``status``, ``result``, ``traceback``,
``children``, ``date_done``, ``task_id``) as JSON to that queue through the
default exchange, with that ``correlation_id`` and ``delivery_mode`` 1 (not
persistent, Celery's ``result_persistent`` default).  greenq does the same.

The worker learns each message's ``reply_to`` and ``correlation_id`` when
the Celery broker decodes it (``remember``, a bounded per-process table) and
the record goes out when the task settles (``store_celery``), on the consumer
channel before the ack when it can (as greenq's own ``rpc://`` replies).
"""
from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import Any, Optional, Sequence, Tuple

from ...celery.results import READY
from ...exceptions import BrokerError
from .publish import Publisher
from .rpc import RPCBackend
from .wire import encode_properties

#: messages whose reply_to is kept at most (the oldest is forgotten first: a
#: task of ignore_result, or one no worker settled, leaves its entry behind)
REMEMBER_MAX = 20000
_REPLIES: "OrderedDict[str, Tuple[str, str]]" = OrderedDict()
_LOCK = threading.Lock()


def remember(task_id: str, reply_to: str, correlation_id: str) -> None:
    """Where the result of Celery task ``task_id`` goes (its message's properties)."""
    with _LOCK:
        _REPLIES[task_id] = (reply_to, correlation_id)
        _REPLIES.move_to_end(task_id)
        while len(_REPLIES) > REMEMBER_MAX:
            _REPLIES.popitem(last=False)


def destination(task_id: str, final: bool) -> Optional[Tuple[str, str]]:
    """(reply_to, correlation_id) of ``task_id``, forgotten once ``final``."""
    with _LOCK:
        return _REPLIES.pop(task_id, None) if final else _REPLIES.get(task_id)


def _final(data: bytes) -> bool:
    """The record is of a ready state (SUCCESS, FAILURE, REVOKED): the last one."""
    try:
        return json.loads(data).get("status") in READY
    except Exception:
        return True


def reply_properties(correlation_id: str) -> bytes:
    return encode_properties({"content_type": "application/json", "content_encoding": "utf-8",
                              "correlation_id": correlation_id, "delivery_mode": 1})


class CeleryRPCBackend(RPCBackend):
    """``RPCBackend`` that also answers Celery's clients (``store_celery``)."""

    def store_celery(self, records: Sequence[Tuple[str, bytes]]) -> None:
        """Publish ``(task id, encoded Celery record)`` pairs to the reply
        queue of each task's message; a task whose message named none (a
        client with another result backend) has nowhere to go."""
        out = []
        for task_id, data in records:
            where = destination(task_id, _final(data))
            if where is not None:
                out.append((data, reply_properties(where[1]), "", where[0]))
        if not out:
            return
        broker: Any = self._broker
        if broker is not None and broker.publish_unconfirmed(out):
            return

        def send(pub: Publisher) -> None:
            for item in out:
                pub.publish_raw(*item)
            if pub.confirm:
                nacked, _ = pub.wait_confirms()    # a returned one: the client's reply queue is gone
                if nacked:
                    raise BrokerError(f"RabbitMQ refused {len(nacked)} Celery result(s)")
        self.pool.run(send)
