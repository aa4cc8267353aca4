"""``rpc://`` results of tasks taken from Celery queues, in Celery's form:
what Celery's ``RPCBackend.store_result`` publishes, so an unmodified Celery
client (``result_backend = 'rpc://'``) gets them from ``AsyncResult.get()``.

Celery's client names its reply queue in the message's ``reply_to`` and the
task id in ``correlation_id``; its worker publishes the result record
(``greenq.celery.results``: ``status``, ``result``, ``traceback``,
``children``, ``date_done``, ``task_id``) as JSON to that queue through the
default exchange, with that ``correlation_id`` and ``delivery_mode`` 1 (not
persistent, Celery's ``result_persistent`` default).  greenq does the same.

A greenq client with ``rpc://`` names its reply queue both in Celery's
``reply_to`` and in the ``greenq_reply_to`` header of the Celery messages it
sends (greenq.celery.protocol): a Celery worker answers the former, in
Celery's form, and the client's reply reader (``read_reply``) turns such a
reply (no ``type`` property, which greenq's replies always have, and a
``content_type``, which Celery's always have; in an app with
``celery_queues`` only) into
greenq's result meta, as greenq reads Celery's records on Redis
(``greenq.celery.results.record_to_greenq_meta``); ``wait_either`` and
``get_celery`` hand it to greenq's ``AsyncResult``.  A greenq worker finding
both names equal sends greenq's record only.

The worker learns each message's ``reply_to`` and ``correlation_id`` when
the Celery broker decodes it (``remember``, a bounded per-process table) and
the record goes out when the task settles (``store_celery``), on the consumer
channel before the ack when it can (as greenq's own ``rpc://`` replies).
"""
from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import Any, Dict, Optional, Sequence, Tuple

from ...celery.protocol import CONTENT_TYPES, accepted, loads_body
from ...celery.results import READY, record_to_greenq_meta
from ...exceptions import BrokerError, MessageError
from .publish import Publisher
from .rpc import RPCBackend
from .wire import encode_properties

#: messages whose reply_to is kept at most (the oldest is forgotten first: a
#: task of ignore_result, or one no worker settled, leaves its entry behind)
REMEMBER_MAX = 20000
_REPLIES: "OrderedDict[str, Tuple[str, str]]" = OrderedDict()
_LOCK = threading.Lock()


#: the Settings (one per app config) of this process's rpc:// backends: a
#: worker with these cannot count Celery chords (Celery's rpc backend has no
#: chords either), so it dead-letters a chord member (celery_broker.py)
#: rather than run it and never send the body
CHORDLESS: "set[Any]" = set()
NO_CHORDS = ("Celery chord member refused: greenq counts Celery chords on a Redis result backend only, and "
             "this worker's result_backend is rpc:// (Celery's rpc backend does not support chords either): "
             "give greenq the redis:// of the Celery client's result_backend")


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


def read_reply(props: Dict[str, Any], body: bytes, task_id: str,
               accept: frozenset) -> Optional[Tuple[Dict[str, Any], bool]]:
    """(greenq's result meta, final) of a Celery worker's reply to task
    ``task_id`` (Celery's ``RPCBackend.store_result``: the record in the
    result serializer's content type), or None for a message that is no
    Celery record (dropped).  A record that does not decode (a serializer
    this client does not accept) is a final FAILURE saying why, so ``get``
    does not wait for ever."""
    content_type = props.get("content_type") or ""
    try:
        record = loads_body(body, content_type, props.get("content_encoding") or "binary", accept)
    except MessageError as exc:
        reason = f"Celery result of {task_id} unreadable: {exc}"
        return ({"id": task_id, "state": "FAILURE", "result": None, "celery": True,
                 "exc": {"type": "greenq.exceptions.MessageError", "args": [reason], "message": reason}}, True)
    meta = record_to_greenq_meta(record, task_id)
    if meta is None:
        return None
    return meta, meta["state"] in READY


class CeleryRPCBackend(RPCBackend):
    """``RPCBackend`` that also answers Celery's clients (``store_celery``)
    and reads Celery workers' replies (``wait_either``, ``get_celery``)."""

    celery_records = True

    def __init__(self, url: str, config: Any, driver: Any = None) -> None:
        super().__init__(url, config, driver)
        CHORDLESS.add(self.settings)
        if self.settings.celery_queues:     # only then may a Celery worker run this app's calls
            accept = accepted(self.settings.accept) | {CONTENT_TYPES["json"], CONTENT_TYPES["msgpack"]}
            self.foreign_reply = lambda props, body, task_id: read_reply(props, body, task_id, accept)

    def close(self) -> None:
        CHORDLESS.discard(self.settings)
        super().close()

    # -- a greenq client reading Celery workers' replies (greenq.result.AsyncResult) --
    def get_celery(self, task_id: str) -> Optional[Dict[str, Any]]:
        """The Celery reply that arrived for ``task_id`` as greenq's meta
        (the last one: STARTED, RETRY, or a ready state), or None."""
        replies = self._mine()
        return replies.get(task_id, foreign=True) if replies is not None else None

    def wait_either(self, task_id: str, timeout: Optional[float]) -> Optional[Tuple[str, Any]]:
        """The final reply for ``task_id``: greenq's (``("greenq", bytes)``)
        or a Celery worker's (``("celery", meta)``); None after ``timeout``.
        Intermediate states (STARTED, RETRY) are waited past, as greenq's
        updates are."""
        self.reply_to()
        assert self._replies is not None, "made by reply_to()"
        found = self._replies.wait(task_id, timeout, foreign=True)
        if found is None:
            return None
        return ("celery", found[0]) if found[1] else ("greenq", found[0])

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
