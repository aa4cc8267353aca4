"""Chords sent by Celery clients, whose header members run on greenq workers
(docs/celery.md, "Chords, groups, STARTED").

A Celery client sends each header member with the chord's body in its embed
(``chord``), the header group's id (``group``) and the member's place
(``group_index``), and sets the chord's size in the result backend
(``celery-taskset-meta-<group id>.s``) before sending.  When a member
finishes (SUCCESS, FAILURE or REVOKED, not RETRY), the settler, after
storing its Celery record, counts it as Celery's Redis backend does
(greenq/transports/redis/celery_results.py): its ``[1, id, state, result]``
goes into the chord's sorted set, once however often it runs.  The member
that completes the set and takes the chord's claim sends the body with the
members' values in ``group_index`` order, or, when one failed or was
revoked, stores Celery's ``ChordError`` as the body's result and sends the
body's ``link_error`` callbacks; then it marks the chord done.  Members run
on Celery workers count in the same keys, so a chord may be split between
both kinds of worker and its body is sent once.

At least once, as greenq's own chords: the counting comes before the
member's message is acknowledged, so a worker dying before it sends the
body leaves the member to run again, and the run again takes the claim once
it lapses (``CLAIM_SECONDS``); only a death between sending the body and
marking the chord done sends the body twice (same task id: one result).
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

from ..celery.protocol import CeleryMessage
from ..celery.results import chord_error, chord_part, chord_results
from ..exceptions import MessageError, TaskRevokedError, describe
from . import jobs

if TYPE_CHECKING:  # pragma: no cover
    from ..brokers.base import Broker
    from .followups import Followups
    from .jobs import Job

log = logging.getLogger("greenq.worker")

#: a finished member to count: its message and (group id, id, group_index, entry)
Part = Tuple[CeleryMessage, Tuple[str, str, Any, bytes]]
_STATES = {jobs.SUCCESS: "SUCCESS", jobs.FAILURE: "FAILURE", jobs.REVOKED: "REVOKED"}


def chord_part_of(job: "Job") -> Optional[Part]:
    """The part to count for ``job`` when it is a finished member of a
    Celery chord, else None."""
    msg = job.msg
    state = _STATES.get(job.outcome or "")
    if state is None or not isinstance(msg, CeleryMessage) or not msg.chord or not msg.group_id:
        return None
    if state == "SUCCESS":
        entry = chord_part(msg.id, state, value=job.value)
    elif state == "FAILURE":
        entry = chord_part(msg.id, state, exc=job.exc or RuntimeError("failed"))
    else:
        entry = chord_part(msg.id, state, exc=TaskRevokedError(job.reason or "revoked"))
    index = msg.headers.get("group_index")
    if not isinstance(index, int) or isinstance(index, bool):
        index = None
    return msg, (msg.group_id, msg.id, index, entry)


def _as_lists(signature: Dict[str, Any]) -> Dict[str, Any]:
    """``signature`` with its ``link`` and ``link_error`` options as lists
    (a Celery signature given one callback keeps it bare)."""
    options = dict(signature.get("options") or {})
    for name in ("link", "link_error"):
        if isinstance(options.get(name), dict):
            options[name] = [options[name]]
    return dict(signature, options=options)


class CeleryChords:
    """Counts the Celery chord members a worker settles, and sends the body
    of each chord one of them completes."""

    def __init__(self, followups: "Followups", broker: "Broker", backend: Callable[[], Any]) -> None:
        self.followups = followups
        self.broker = broker
        self._backend = backend
        self._warned = False

    def complete(self, parts: List[Part]) -> None:
        backend = self._backend()
        if not backend.celery_groups:
            if not self._warned:
                self._warned = True
                log.warning("Celery chords are counted on a Redis result backend only: the bodies of "
                            "Celery chords whose members run here are never sent")
            return
        tokens = backend.celery_chord_parts([part for _, part in parts])
        for (msg, _), token in zip(parts, tokens):
            if token is not None:
                self._fire(backend, msg, token)

    def _fire(self, backend: Any, msg: CeleryMessage, token: str) -> None:
        """Send the chord's body with its members' values (or fail it), then
        mark the chord done."""
        assert msg.group_id is not None and msg.chord is not None, "a Celery chord member has both"
        body = _as_lists(msg.chord)
        options = body["options"]
        body_id = options.get("task_id")
        values, error = chord_results(backend.celery_chord_entries(msg.group_id))
        if error is None:
            try:
                outgoing = self.followups._outgoing(body, (values,), msg)
            except (MessageError, TypeError, ValueError) as exc:
                error = f"Callback error: {describe(exc)}"
            else:
                self.broker.publish_many([outgoing])
        if error is not None:
            log.warning("Celery chord %s failed: %s", msg.group_id, error)
            if isinstance(body_id, str) and body_id:
                backend.store_celery([(body_id, chord_error(body_id, error, parent_id=msg.id,
                                                            group_id=options.get("group_id")))])
            errbacks = [self.followups._outgoing(r, (body_id,), msg) for r in options.get("link_error") or ()]
            if errbacks:
                self.broker.publish_many(errbacks)
        if not backend.celery_chord_done(msg.group_id, token):
            log.warning("Celery chord %s: its claim lapsed before it was marked done (its keys expire)",
                        msg.group_id)
