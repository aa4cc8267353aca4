"""Settling finished jobs: the settler greenlet.

It takes finished jobs in batches and, in this order, publishes retries and
what follows each task in a workflow (followups.py: a chain's next step,
callbacks), stores results in one call, counts finished chord members (and
sends a completed chord's callback), then acknowledges in one call (late ack:
a result is never acknowledged unstored, nor a follow-up unsent), returns
what must go back, and dead-letters what cannot run.  Nothing in one job can
stop the others from being settled: a job whose record cannot be built is
stored as a FAILURE saying why, and an error that retrying cannot cure is
narrowed down to the items that cause it.
"""
from __future__ import annotations

import logging
import queue as std_queue
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional

from ..backends.base import Record
from ..backoff import backoff
from ..brokers.base import Delivery, Outgoing
from ..celery.protocol import CeleryMessage
from ..celery.results import worker_record as celery_record
from ..exceptions import MessageError, Reject, Retry, describe
from ..message import peek
from ..result import FAILURE, RETRY, REVOKED, SUCCESS, make_meta
from . import jobs
from .celery_chords import CeleryChords, chord_part_of
from .followups import ChordMember, Followups
from .jobs import Job
from .state import StopState

if TYPE_CHECKING:  # pragma: no cover
    from ..brokers.base import Broker
    from ..drivers.base import Driver
    from ..hooks import Hooks
    from ..message import Codec

log = logging.getLogger("greenq.worker")

SETTLE_BATCH_MAX = 1000   # at most this many finished jobs are settled as one batch
#: errors that retrying the same call cannot cure: bad data, not an outage
PERMANENT_ERRORS = (TypeError, ValueError, KeyError, AttributeError, RecursionError, MessageError)
#: the notes of a job whose result is not stored (read through ``**``, never changed)
_NO_NOTES: Dict[str, Any] = {}


@dataclass
class DeadLettering:
    """The settler's order to move one delivery to the dead-letter store,
    and why (``Broker.dead_letter``); what is then stored there, and listed
    back, is a :class:`greenq.brokers.DeadLetter`."""
    __slots__ = ("delivery", "reason")
    delivery: Delivery
    reason: str


class Plan:
    """What settling one batch takes, gathered before any call is made."""
    __slots__ = ("records", "republish", "chords", "acks", "requeue", "unstarted", "dead", "celery",
                 "celery_chords")

    def __init__(self) -> None:
        self.records: List[Record] = []
        self.republish: List[Outgoing] = []               # retries and workflow follow-ups
        self.chords: List[ChordMember] = []
        self.acks: List[Delivery] = []
        self.requeue: List[Delivery] = []                 # started, then returned (cold stop)
        self.unstarted: List[Delivery] = []               # never began: delivery count not raised
        self.dead: List[DeadLettering] = []
        self.celery: List[Any] = []                       # (task id, record) in Celery's format
        self.celery_chords: List[Any] = []                # members of Celery chords (celery_chords.py)


class Settler:
    """The settler of one worker: settles each finished job (stores its
    result, sends its retries and follow-ups, acknowledges, requeues or
    dead-letters its message), a batch at a time.

    It gets what it uses: the broker, ``backend()`` (the result backend, set
    when the worker runs), the codec, the follow-ups, ``release(batch)`` (the
    worker's: the settled messages are no longer held), the hooks it emits
    (``message_dead_lettered``, ``task_revoked``), the driver, ``stopping()``
    (the worker's stop state: it gives up retrying at cold stop) and the
    worker's name (for dead-letter records)."""

    def __init__(self, broker: "Broker", backend: Callable[[], Any], codec: "Codec", followups: Followups, *,
                 release: Callable[[List[Job]], None], hooks: "Hooks", driver: "Driver",
                 stopping: Callable[[], StopState], worker_name: str) -> None:
        self.broker = broker
        self._backend = backend
        self.codec = codec
        self.followups = followups
        self._release = release
        self.hooks = hooks
        self.driver = driver
        self._stopping = stopping
        self.worker_name = worker_name
        self.done = driver.queue()             # finished jobs; None ends the loop
        #: ``put(job)`` hands a finished job to the settler: the queue's own
        #: put, as every task calls it
        self.put: Callable[[Job], None] = self.done.put
        self.settling_since: Optional[float] = None
        self._celery_warned = False
        self.celery_chords = CeleryChords(followups, broker, backend)

    def close(self) -> None:
        self.done.put(None)

    def loop(self) -> None:
        while True:
            first = self.done.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < SETTLE_BATCH_MAX:
                try:
                    item = self.done.get(block=False)
                except std_queue.Empty:
                    break
                if item is None:
                    self.done.put(None)
                    break
                batch.append(item)
            self.settle(batch)

    def settle(self, batch: List[Job]) -> None:
        self.settling_since = time.monotonic()
        plan = Plan()
        for job in batch:
            try:
                self._plan(job, plan)
            except Exception as exc:
                log.error("task %s: its outcome could not be recorded", job.id, exc_info=True)
                self._plan_failure(job, plan, exc)
        backend = self._backend()
        self._with_retries("publish retries and follow-ups", self.broker.publish_many, plan.republish)
        self._with_retries("store results", backend.store_many, plan.records, on_permanent=self._store_fallback)
        if plan.celery:
            self._with_retries("store Celery results", self._store_celery, plan.celery)
        if plan.celery_chords:
            self._with_retries("count Celery chord members", self.celery_chords.complete, plan.celery_chords)
        self._with_retries("count chord members", self.followups.complete_chords, plan.chords,
                           on_permanent=self._chord_fallback)
        self._with_retries("acknowledge", self.broker.ack, plan.acks)
        self._with_retries("requeue", self.broker.requeue, plan.requeue)
        self._with_retries("requeue", lambda ds: self.broker.requeue(ds, started=False), plan.unstarted)
        self._with_retries("dead-letter", self._dead_letter_each, plan.dead)
        self._release(batch)
        self.settling_since = None

    # -- one job -------------------------------------------------------------
    def _plan(self, job: Job, plan: Plan) -> None:
        """Add what settling ``job`` takes to ``plan``."""
        outcome, msg = job.outcome, job.msg
        if outcome != jobs.SUCCESS:        # (a success, the commonest, skips these)
            if outcome == jobs.DEAD:
                plan.dead.append(DeadLettering(job.delivery, job.reason or ""))
                log.warning("message %s dead-lettered: %s", job.delivery.message_id, job.reason)
                self.hooks.emit("message_dead_lettered", job, job.reason)
                try:
                    record = self._dead_record(job)
                except Exception as exc:   # the message is dead-lettered all the same
                    log.error("message %s: no failure record for its caller: %s", job.delivery.message_id,
                              describe(exc))
                    record = None
                if record is not None:
                    plan.records.append(record)
                return
            assert msg is not None, "past DEAD, every job's message decoded"
            if outcome == jobs.DEFER:           # published again to wait for its eta, then acknowledged
                plan.republish.append(self.codec.outgoing(msg, sent=False))    # moved, not sent
                plan.acks.append(job.delivery)
                return
            if outcome == jobs.REQUEUE:
                (plan.requeue if job.started else plan.unstarted).append(job.delivery)
                return
            if outcome == jobs.REJECT:
                assert isinstance(job.exc, Reject)
                if job.exc.requeue:
                    plan.requeue.append(job.delivery)
                else:
                    plan.dead.append(DeadLettering(job.delivery, f"rejected: {job.reason}"))
                return
        assert msg is not None, "past DEAD, every job's message decoded"
        encode = self.codec.encode_result
        ignore = job.task is not None and job.task.resolved()["ignore_result"] and not msg.chord_size
        notes: Dict[str, Any] = _NO_NOTES
        if not ignore or outcome != jobs.SUCCESS:   # a record is stored: its notes (else none is needed)
            notes = {"parent_id": msg.parent_id, "root_id": msg.root_id} if msg.parent_id or msg.root_id else {}
            if job.hub_blocked:             # the watchdog saw this task block the hub (monitor.py)
                notes["hub_blocked"] = round(job.hub_blocked, 3)
        if outcome == jobs.SUCCESS:
            if not ignore:
                plan.records.append(Record(msg.id, encode(make_meta(
                    msg.id, SUCCESS, result=job.value, task=msg.task, retries=msg.retries, **notes)),
                    True, msg.reply_to))
            if msg.link or msg.chain:
                self.followups.on_success(msg, job.value, plan.republish)
        elif outcome == jobs.FAILURE:
            plan.records.append(Record(msg.id, encode(make_meta(
                msg.id, FAILURE, exc=job.exc, traceback=job.tb, task=msg.task,
                retries=msg.retries, **notes)), True, msg.reply_to))
            if msg.link_error or msg.chain:
                self.followups.on_failure(msg, FAILURE, job.exc, job.tb, None, plan.republish, plan.records)
        elif outcome == jobs.RETRY:
            assert isinstance(job.exc, Retry)
            outgoing = self.codec.outgoing(msg.for_retry(job.exc.when))
            plan.records.append(Record(msg.id, encode(make_meta(
                msg.id, RETRY, exc=job.exc.exc or job.exc, task=msg.task,
                retries=msg.retries + 1, **notes)), False, msg.reply_to))
            plan.republish.append(outgoing)
        elif outcome == jobs.REVOKED:
            self.hooks.emit("task_revoked", job)
            plan.records.append(Record(msg.id, encode(make_meta(
                msg.id, REVOKED, task=msg.task, reason=job.reason, **notes)), True, msg.reply_to))
            if msg.chain:
                self.followups.on_failure(msg, REVOKED, None, None, job.reason, plan.republish, plan.records)
        if msg.chord_size and outcome in (jobs.SUCCESS, jobs.FAILURE, jobs.REVOKED):
            failure = (None if outcome == jobs.SUCCESS else f"failed: {describe(job.exc)}"
                       if outcome == jobs.FAILURE else f"was revoked ({job.reason or 'revoked'})")
            record = None
            if self._backend().counts_with_store:   # stored with its count, in one round trip
                for i in range(len(plan.records) - 1, -1, -1):     # just appended (a chain's steps after it)
                    if plan.records[i].task_id == msg.id and plan.records[i].final:
                        record = plan.records.pop(i)
                        break
            plan.chords.append(ChordMember(msg, failure, record))
        if isinstance(msg, CeleryMessage) and not (ignore or msg.ignore_result):
            row = celery_record(msg, outcome or "", job.value, job.exc, job.tb, job.reason)
            if row is not None:
                plan.celery.append(row)
        if isinstance(msg, CeleryMessage) and msg.chord:
            part = chord_part_of(job)
            if part is not None:
                plan.celery_chords.append(part)
        if not job.acked:
            plan.acks.append(job.delivery)

    def _store_celery(self, records: List[Any]) -> None:
        """Results of Celery messages in Celery's format, where the result
        backend can keep them (Redis and rpc://; elsewhere, a warning once)."""
        backend = self._backend()
        if backend.celery_records:
            backend.store_celery(records)
        elif not self._celery_warned:
            self._celery_warned = True
            log.warning("results of Celery messages are not stored in Celery's format on this result "
                        "backend (Redis and rpc:// only); Celery clients will not see them")

    def _plan_failure(self, job: Job, plan: Plan, exc: BaseException) -> None:
        """The fallback of ``_plan``: store a FAILURE naming the error and
        acknowledge (a message that is not a task at all is dead-lettered)."""
        msg = job.msg
        if msg is None:
            plan.dead.append(DeadLettering(job.delivery, f"worker error while settling it: {describe(exc)}"))
            return
        error = MessageError(f"the worker could not record this task's outcome: {describe(exc)}")
        plan.records.append(Record(msg.id, self.codec.encode_result(make_meta(
            msg.id, FAILURE, exc=error, task=msg.task, retries=msg.retries)), True, msg.reply_to))
        if not job.acked:
            plan.acks.append(job.delivery)

    def _dead_record(self, job: Job) -> Optional[Record]:
        """A FAILURE for a dead-lettered message, so its caller's ``get()``
        raises MessageError with the reason at once instead of waiting out its
        timeout.  Only for an id that can be trusted: a message that decoded
        (its signature, when ``signing_key`` is set, verified), or, without
        ``signing_key`` (whoever writes to the broker is trusted then), the id
        read from a message that did not decode.  Never for a message whose
        signature failed or is missing: a forged message must not be able to
        write results for ids of its choosing."""
        msg = job.msg
        if msg is None:
            try:
                msg = job.delivery.decode(self.codec)   # dead before decoding (max_deliveries)
            except MessageError:
                msg = None
        task_id: Optional[str]
        task: Optional[str]
        if msg is not None:
            task_id, task, reply_to = msg.id, msg.task, msg.reply_to
        elif self.codec.signed:
            return None
        else:
            task_id, task = peek(job.delivery.body)
            reply_to = None
            if not isinstance(task_id, str) or not 0 < len(task_id.encode("utf-8", "replace")) <= \
                    self.broker.max_message_id_bytes:
                return None
        error = MessageError(f"dead-lettered by worker {self.worker_name}: {job.reason}")
        return Record(task_id, self.codec.encode_result(make_meta(
            task_id, FAILURE, exc=error, task=task if isinstance(task, str) else None)), True, reply_to)

    def _store_fallback(self, record: Record, exc: BaseException) -> None:
        """A record the backend refuses for good (too large, say): store a
        small FAILURE in its place, once."""
        error = MessageError(f"the result could not be stored: {describe(exc)}")
        small = Record(record.task_id, self.codec.encode_result(make_meta(record.task_id, FAILURE, exc=error)),
                       record.final, record.reply_to)
        try:
            self._backend().store_many([small])
        except Exception as again:
            log.error("task %s: not even a failure record could be stored: %s", record.task_id, describe(again))

    def _chord_fallback(self, member: ChordMember, exc: BaseException) -> None:
        """A chord member that failed for good (logged by _one_by_one).  When
        its own record, handed to the count (``counts_with_store``), is not
        in the store, the backend refused it: a small FAILURE is stored in
        its place and the member is counted (and its chord completed) once
        more without it.  Stored already (what failed came later, sending
        the callback): left as it was before records went with the count."""
        record = member.record
        if record is None:
            return
        try:
            if self._backend().get(record.task_id) == bytes(record.data):
                return
            self._store_fallback(record, exc)
            self.followups.complete_chords([ChordMember(member.msg, member.failure, None)])
        except Exception as again:
            log.error("task %s: its chord could not count it: %s", member.msg.id, describe(again))

    def _dead_letter_each(self, items: List[DeadLettering]) -> None:
        for dead in items:
            self.broker.dead_letter(dead.delivery, dead.reason)

    # -- retrying --------------------------------------------------------------
    def _with_retries(self, what: str, fn: Callable[[List[Any]], None], items: List[Any],
                      on_permanent: Optional[Callable[[Any, BaseException], None]] = None) -> None:
        """Call ``fn(items)`` until it succeeds: a result is never acknowledged
        unstored.  An error that retrying cannot cure (bad data, not a broker
        outage) is narrowed down by calling ``fn`` with one item at a time;
        the items that fail alone with such an error are logged and handed to
        ``on_permanent``, the rest go on.  Gives up only at cold shutdown,
        leaving the messages unacknowledged (they come back: at-least-once)."""
        failures = 0
        while items:
            try:
                fn(items)
                return
            except PERMANENT_ERRORS as exc:
                items = self._one_by_one(what, fn, items, on_permanent)
                if not items:
                    return
                err: BaseException = exc
            except Exception as exc:
                err = exc
            failures += 1
            pause = backoff(failures, 0.1, 5.0)
            if self._stopping() >= StopState.COLD and pause > 1:
                log.error("%s failed at shutdown, giving up (messages will be redelivered): %s", what, err)
                return
            log.error("%s failed: %s; retrying in %.1f s", what, describe(err), pause)
            self.driver.sleep(pause)

    @staticmethod
    def _one_by_one(what: str, fn: Callable[[List[Any]], None], items: List[Any],
                    on_permanent: Optional[Callable[[Any, BaseException], None]]) -> List[Any]:
        """Retry ``items`` singly after a permanent-looking error; return those
        that failed with a transient one (to be retried as a batch)."""
        transient = []
        for item in items:
            try:
                fn([item])
            except PERMANENT_ERRORS as exc:
                log.error("%s: giving up on %r: %s", what, item, describe(exc))
                if on_permanent is not None:
                    on_permanent(item, exc)
            except Exception:
                transient.append(item)
        return transient
