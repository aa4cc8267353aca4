"""What follows a settled task in a workflow (greenq/canvas.py): the chain's
next step, ``link`` and ``link_error`` callbacks, and a chord's callback.

The settler (settle.py) asks for them while it plans a batch and sends them
before it acknowledges, as it does retries: a worker that dies in between
leaves the task unacknowledged, it runs again and the follow-ups are sent
again (at least once).  A chain's steps have fixed ids, so a step sent twice
is one result.

Chords are counted in the result backend after the members' results are
stored (on Redis, in the same round trip: ``chord_members_done``):
``chord_member_done`` counts a member once however often it runs,
and answers True for one member only, whose worker then reads every member's
result and sends the callback (or stores ``ChordError``), then marks the
chord sent.  The completer's worker dying before that mark leaves its
message unacknowledged: it runs again, is told again that it completed the
chord, and sends the callback.  Only a death between the send and the mark
(one round trip) sends the callback twice.  A member that fails stores the
chord's ChordError at once (fail fast); the completer keeps it.

A chord's record (member ids and callback) is read only once it passes its
check (greenq/canvas.py decode_group: with a signing key, an HMAC bound to
the group id).  One that fails it is never used: the chord is failed with
ChordError under ``chord_result`` (carried, signed, by each member's
message) and its callback is never sent.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional

from ..backends.base import ChordCount, Record
from ..canvas import build, decode_group, iter_records
from ..config import mask_url
from ..exceptions import ChordError, MessageError, describe
from ..result import FAILURE, REVOKED, SUCCESS, make_meta

if TYPE_CHECKING:  # pragma: no cover
    from ..message import TaskMessage
    from ..app import GreenQ
    from ..brokers.base import Broker
    from ..message import Codec

log = logging.getLogger("greenq.worker")


@dataclass
class ChordMember:
    """A finished chord member to count: ``failure`` says how it did not
    succeed (None: it did); ``record``: its own result, to be stored with the
    count (a backend with ``counts_with_store``; None: stored beforehand)."""
    __slots__ = ("msg", "failure", "record")
    msg: "TaskMessage"
    failure: Optional[str]
    record: Optional[Record]


class Followups:
    """Builds the follow-ups of one worker's settled tasks."""

    def __init__(self, app: "GreenQ", codec: "Codec", broker: "Broker", backend: Callable[[], Any]) -> None:
        """``app``: to build a follow-up message from its signature;
        ``backend()``: the result backend (set when the worker runs)."""
        self.app = app
        self.codec = codec
        self.broker = broker
        self._backend = backend

    # -- chains and callbacks (planned with the batch) ---------------------------
    def on_success(self, msg: "TaskMessage", value: Any, outgoing: List[Any]) -> None:
        """The chain's next step and the ``link`` callbacks, with ``value``."""
        for record in msg.link or ():
            outgoing.append(self._outgoing(record, (value,), msg))
        if msg.chain:
            step = dict(msg.chain[0])
            step["options"] = dict(step.get("options") or {}, chain=msg.chain[1:])
            outgoing.append(self._outgoing(step, (value,), msg))

    def on_failure(self, msg: "TaskMessage", state: str, exc: Optional[BaseException], tb: Optional[str],
                   reason: Optional[str], outgoing: List[Any], records: List[Record]) -> None:
        """``link_error`` callbacks (called with the task's id); the chain's
        remaining steps stored with this task's outcome (FAILURE or REVOKED),
        so the chain's result says why it stopped."""
        if state == FAILURE:
            for record in msg.link_error or ():
                outgoing.append(self._outgoing(record, (msg.id,), msg))
        encode = self.codec.encode_result
        root = msg.root_id or msg.id
        for step in msg.chain or ():
            options = step.get("options") or {}
            step_id = options.get("task_id")
            if step_id:
                records.append(Record(step_id, encode(make_meta(
                    step_id, state, exc=exc, traceback=tb, task=step.get("task"), reason=reason,
                    parent_id=msg.id, root_id=root)), True, None if options.get("ignore_result") else msg.reply_to))

    def _outgoing(self, record: Dict[str, Any], prefix: tuple, parent: "TaskMessage") -> Any:
        return self.codec.outgoing(build(self.app, record, prefix, parent=parent))

    # -- chords (after the results are stored) -------------------------------------
    def complete_chords(self, members: List[ChordMember]) -> None:
        """Count each finished member; for the one that completes its chord,
        send the callback (or store the chord's failure), then mark it sent.
        A member that failed (``failure`` says how) and did not complete its
        chord makes the chord FAILURE at once, so its caller need not wait
        for the other members; the callback's ``link_error`` callbacks are
        sent by the completer only."""
        backend = self._backend()
        counts = []
        for m in members:
            assert m.msg.group_id is not None and m.msg.chord_size, "a chord member has its group and size"
            counts.append(ChordCount(m.msg.group_id, m.msg.id, m.msg.chord_size, m.record))
        answers = backend.chord_members_done(counts)
        for member, completes in zip(members, answers):
            msg = member.msg
            if completes:
                self._fire(msg)
                backend.chord_sent(msg.group_id)
            elif member.failure is not None:
                self._fail_early(msg, member.failure)

    def _load_group(self, msg: "TaskMessage", data: bytes) -> Optional[Dict[str, Any]]:
        """The chord's record ``data``, checked; None when it fails its check,
        and then the chord is failed with ChordError under ``chord_result``
        (once) and nothing in the record is used."""
        assert msg.group_id is not None, "a chord member has its group"
        try:
            return decode_group(self.app, data, msg.group_id)
        except (MessageError, ValueError) as exc:
            error = ChordError(f"chord {msg.group_id}: its record in the result backend was refused "
                               f"({describe(exc)}); its callback is not sent")
            log.error("%s", error)
            target = msg.chord_result
            if target and not self._failed_already(target):
                self._backend().store_many([Record(target, self.codec.encode_result(make_meta(
                    target, FAILURE, exc=error, root_id=msg.root_id or msg.id)), True, None)])
            return None

    def _fail_early(self, msg: "TaskMessage", failure: str) -> None:
        data = self._backend().load_group(msg.group_id)
        group = None if data is None else self._load_group(msg, data)
        if group is None:
            return
        callback = group.get("callback")
        if isinstance(callback, dict):
            index = group["members"].index(msg.id) if msg.id in group["members"] else "?"
            error = ChordError(f"chord member {index} {msg.task}[{msg.id}] {failure}")
            log.warning("chord %s failed: %s", msg.group_id, error)
            self._backend().store_many(self._failure_records(msg, callback, error))

    def _fire(self, msg: "TaskMessage") -> None:
        backend = self._backend()
        group_id = msg.group_id
        assert group_id is not None, "a chord member has its group"
        data = backend.load_group(group_id)
        if data is None:
            log.error("chord %s: its record is gone from the result backend (expired?); its callback "
                      "cannot be sent", group_id)
            return
        group = self._load_group(msg, data)
        if group is None:
            return
        callback = group.get("callback")
        if not isinstance(callback, dict):
            log.error("chord %s: its record has no callback", group_id)
            return
        values, error = self._gather(group_id, group)
        if error is None:
            try:
                outgoing = self._outgoing(callback, (values,), msg)
            except (MessageError, TypeError, ValueError) as exc:
                error = ChordError(f"chord {group_id}: its callback could not be sent: {describe(exc)}")
            else:
                self.broker.publish_many([outgoing])
                return
        self._fail(msg, callback, error)

    def _gather(self, group_id: str, group: Dict[str, Any]) -> "tuple[List[Any], Optional[ChordError]]":
        """The members' values in order, or the ChordError naming the first
        member (in the group's order) that did not succeed."""
        members = group["members"]
        tasks = group.get("tasks") or [None] * len(members)
        values = []
        for index, (member_id, data) in enumerate(zip(members, self._backend().get_many(members))):
            reason = None
            try:
                meta = self._decode(data, member_id) if data is not None else None
            except MessageError as exc:
                meta, reason = None, f"has a result that cannot be read ({exc})"
            state = meta.get("state") if meta else None
            if state == SUCCESS and meta:
                values.append(meta.get("result"))
                continue
            if reason is None:
                if meta is None:
                    reason = "has no result (expired?)"
                elif state == FAILURE:
                    exc_info = meta.get("exc") or {}
                    reason = f"failed: {exc_info.get('type', '?').rsplit('.', 1)[-1]}: {exc_info.get('message', '')}"
                elif state == REVOKED:
                    reason = f"was revoked ({meta.get('reason') or 'revoked'})"
                else:
                    reason = f"ended in state {state}"
            return values, ChordError(f"chord member {index} {tasks[index]}[{member_id}] {reason}")
        return values, None

    def _fail(self, msg: "TaskMessage", callback: Dict[str, Any], error: ChordError) -> None:
        """Store ``error`` as the result of the callback (each step of it, when
        it is a chain), unless a member's early failure is stored there
        already, and send the callback's ``link_error`` callbacks."""
        backend = self._backend()
        callback_id = (callback.get("options") or {}).get("task_id")
        if not self._failed_already(callback_id):
            log.warning("chord %s failed: %s", msg.group_id, error)
            backend.store_many(self._failure_records(msg, callback, error))
        errbacks = [self._outgoing(r, (callback_id,), msg) for r in (callback.get("options") or {}).get("link_error") or ()]
        if errbacks:
            self.broker.publish_many(errbacks)

    def _failed_already(self, task_id: Optional[str]) -> bool:
        data = self._backend().get(task_id) if task_id else None
        try:
            return data is not None and task_id is not None and \
                self._decode(data, task_id).get("state") == FAILURE
        except MessageError:
            return False

    def _decode(self, data: bytes, task_id: str) -> Dict[str, Any]:
        """The result record of ``task_id``, checked (MessageError if refused)."""
        return self.codec.decode_result(data, task_id, where=mask_url(self._backend().url))

    def _failure_records(self, msg: "TaskMessage", callback: Dict[str, Any], error: ChordError) -> List[Record]:
        encode = self.codec.encode_result
        root = msg.root_id or msg.id
        records = []
        for step in iter_records(callback):
            step_id = (step.get("options") or {}).get("task_id")
            if step_id:
                records.append(Record(step_id, encode(make_meta(step_id, FAILURE, exc=error, task=step.get("task"),
                                                                root_id=root)), True, None))
        return records
