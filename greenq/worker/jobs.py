"""One task run: the Job record and the code that runs it inside a greenlet or thread."""
from __future__ import annotations

import logging
import time
import traceback
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional

from ..exceptions import Reject, Retry, TimeLimitExceeded
from ..task import Request

if TYPE_CHECKING:  # pragma: no cover
    from ..brokers.base import Delivery
    from ..message import TaskMessage
    from ..task import Task
    from .admission import AdmissionStep

log = logging.getLogger("greenq.worker")

# outcome kinds
SUCCESS, FAILURE, RETRY, REJECT, REQUEUE, REVOKED, DEAD, DEFER = (
    "success", "failure", "retry", "reject", "requeue", "revoked", "dead", "defer")


class HardKill(BaseException):
    """Thrown into a task at its hard time limit.  A BaseException so that
    ``except Exception`` in a task cannot swallow it."""


class Abandon(BaseException):
    """Thrown into a task at cold shutdown: its message goes back to the queue."""


class Terminate(BaseException):
    """Thrown into a task revoked with ``terminate=True``."""


class Job:
    """A held message on its way through the worker."""

    __slots__ = ("delivery", "msg", "task", "handle", "started", "started_at", "outcome", "value",
                 "exc", "tb", "reason", "acked", "killed_by", "kill_sent", "settling", "hub_blocked",
                 "admitted")

    def __init__(self, delivery: "Delivery", msg: Optional["TaskMessage"] = None,
                 task: Optional["Task"] = None) -> None:
        self.delivery = delivery
        self.msg = msg
        self.task = task
        self.handle: Any = None
        self.started = False
        self.started_at = 0.0       # epoch seconds the task began (inspect active)
        self.outcome: Optional[str] = None
        self.value: Any = None
        self.exc: Optional[BaseException] = None
        self.tb: Optional[str] = None
        self.reason: Optional[str] = None
        self.acked = False          # acknowledged early (acks_late=False)
        self.killed_by: Optional[type] = None
        #: a kill (any: time limits, terminate, abandon) was thrown at it while it ran
        #: (set by the reaper under the worker's lock): its runner lets the hub run once
        #: after it, so that one arriving late lands there (runners.py)
        self.kill_sent = False
        self.settling = False       # handed to the settler
        #: seconds this task kept the hub blocked, as the watchdog saw it (monitor.py);
        #: stored in its result's meta as ``hub_blocked``
        self.hub_blocked = 0.0
        #: the admission steps that let it run (admission.py), released when it ends
        self.admitted: Optional[List[AdmissionStep]] = None

    @property
    def id(self) -> str:
        return self.msg.id if self.msg else self.delivery.message_id


class WorkerRequest(Request):
    """``self.request`` of a task the worker runs: the same fields as
    :class:`greenq.task.Request`, read from the message and the delivery at
    their first read (then kept on the request), not copied into it before
    the task starts.  Most tasks read none of them: a request made this way
    costs two references (about 0.1 KB a task in flight, against 0.4 KB for
    the 15 fields and the ``delivery_info`` dict) and none of the work of
    filling them.  A task
    may set attributes on it as on any request."""

    __slots__ = ("_msg", "_delivery")
    is_eager = False

    def __init__(self, msg: "TaskMessage", delivery: "Delivery") -> None:   # not Request.__init__: lazy
        self._msg = msg
        self._delivery = delivery

    def __getattr__(self, name: str) -> Any:
        # only for a field not read yet (an attribute found normally never comes here)
        read = _REQUEST_FIELDS.get(name)
        if read is None:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        try:
            msg, delivery = self._msg, self._delivery
        except AttributeError:              # not made by __init__ (a copy being built)
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}") from None
        value = read(msg, delivery)
        object.__setattr__(self, name, value)   # kept: later reads are plain ones, and see the same object
        return value


#: how each field of a WorkerRequest is read from (message, delivery)
_REQUEST_FIELDS: Dict[str, Callable[[Any, Any], Any]] = {
    **{name: (lambda name: lambda msg, delivery: getattr(msg, name))(name)
       for name in ("id", "task", "args", "kwargs", "retries", "queue", "eta", "expires", "reply_to",
                    "priority", "parent_id", "group_id")},
    "root_id": lambda msg, delivery: msg.root_id or msg.id,
    "delivery_info": lambda msg, delivery: {"queue": delivery.queue, "deliveries": delivery.deliveries},
}


def run(job: Job) -> None:
    """Run the task of ``job`` (its request already set) and record its
    outcome on the job.  Never raises for the task's own errors; a kill by
    the worker is recorded by its cause."""
    msg, task = job.msg, job.task
    assert msg is not None and task is not None, "a job runs only once its message decoded"
    job.started = True
    job.started_at = time.time()
    try:
        job.value = task.run_with_retries(msg.args, msg.kwargs)
        job.outcome = SUCCESS
    except Retry as exc:
        job.outcome, job.exc = RETRY, exc
    except Reject as exc:
        job.outcome, job.exc, job.reason = REJECT, exc, exc.reason
    except HardKill:
        job.outcome, job.exc = FAILURE, TimeLimitExceeded(
            f"{msg.task}[{msg.id}] killed by its hard time limit")
        job.tb = traceback.format_exc()
    except Abandon:
        job.outcome = REQUEUE
    except Terminate:
        job.outcome, job.reason = REVOKED, "terminated by revoke"
    except (Exception, SystemExit, KeyboardInterrupt) as exc:  # sys.exit() in a task: it failed
        job.outcome, job.exc, job.tb = FAILURE, exc, traceback.format_exc()
    except BaseException as exc:  # GreenletExit and friends: the worker is going down
        job.outcome, job.exc = REQUEUE, exc
    if job.killed_by is HardKill and job.outcome != FAILURE:
        # the task swallowed its kill and returned anyway: it still ran out of time
        job.outcome, job.exc = FAILURE, TimeLimitExceeded(f"{msg.task}[{msg.id}] exceeded its hard time limit")


def limits(msg: "TaskMessage", options: Dict[str, Any]) -> "tuple[Optional[float], Optional[float]]":
    """(soft, hard) time limits in seconds: the message's own, else the task's
    (``options``: its ``Task.resolved()``); None for none."""
    soft, hard = msg.soft_time_limit, msg.time_limit
    if soft is None:
        soft = options["soft_time_limit"]
    if hard is None:
        hard = options["time_limit"]
    return soft or None, hard or None
