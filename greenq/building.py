"""Building messages: a task call in, a ``TaskMessage`` out, and no I/O.

``MessageBuilder`` turns a call (task name, arguments, ``apply_async``
options) or a canvas signature record into the message a broker would carry.
Everything a message depends on is an input the builder is given:

* the app's settings (``Config``: ``[task:NAME]`` options, ``[routes]``,
  ``default_queue``) and its registered tasks (the decorator's options);
* a ``Target``: what the builder must know of where messages go, which is
  the broker's name limits (AMQP's queue names are shorter than 255 bytes
  under a key prefix) and the result backend's reply address (``rpc://``);
* a context: the running task, whose id and root id a message sent from
  inside it carries (the app gives ``greenq.task.current_request``).

So a message can be built and inspected with no broker reachable, and every
check on a call happens here, before anything is sent: a bad option raises
ValueError or TypeError naming it (``greenq.validation`` holds the rules; the
worker's decoder applies the same rules to what it receives).  Encoding is
``greenq.message.Codec``'s (serializer, signing, ``max_message_size``) and
the write is the broker's.  The app (``GreenQ.builder``), ``greenq.canvas``
and the worker's follow-ups (chains, callbacks, chords) all build through
here.

Sending is a hot path, so the builder does as little per call as the rules
allow: names it has validated once (task names, queues) are remembered, flat
arguments skip the nesting walk, a task's options are resolved in one pass.
What it remembers depends on the value alone, never on settings that could
change, so nothing it caches can go stale.  ``build_many`` (``enqueue_many``)
also works out once per batch what one batch shares: the clock read, each
task name's options, queue and their checks, the reply address.
"""
from __future__ import annotations

import fnmatch
import time
from datetime import datetime
from typing import (TYPE_CHECKING, Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple,
                    Union, cast)

from . import validation
from .message import TaskMessage, new_id

if TYPE_CHECKING:  # pragma: no cover
    from .config import Config
    from .task import Request, Task

#: apply_async options
CALL_OPTIONS = frozenset({"countdown", "eta", "expires", "queue", "priority", "task_id",
                          "time_limit", "soft_time_limit", "ignore_result"})
_SORTED_CALL_OPTIONS = sorted(CALL_OPTIONS)

#: the task options a message depends on, in the order ``Task.options_for`` returns them
BUILD_KEYS = ("expires", "priority", "soft_time_limit", "time_limit", "queue", "ignore_result")

#: argument types that cannot nest: a call whose arguments are all of these
#: needs no walk for its depth (anything else, subclasses too, is walked)
_SCALARS = frozenset({str, int, float, bool, type(None), bytes})

#: the most names each cache remembers (send_task takes any name; past this
#: many, new ones are checked every time)
NAME_CACHE_MAX = 4096

#: one call as ``MessageBuilder.build_many`` takes it: (task name, args, kwargs, apply_async options)
Call = Tuple[str, Sequence[Any], Optional[Dict[str, Any]], Optional[Dict[str, Any]]]

#: the options of a call given none (never written to)
_NO_OPTIONS: Dict[str, Any] = {}


def _flat(args: Any, kwargs: Any) -> bool:
    """True when ``validation.arguments`` cannot refuse these: a list or tuple
    and a dict with str keys, all of scalars."""
    kind = type(args)
    if (kind is not tuple and kind is not list) or type(kwargs) is not dict:
        return False
    scalars = _SCALARS
    for value in args:
        if type(value) not in scalars:
            return False
    for key, value in kwargs.items():
        if type(key) is not str or type(value) not in scalars:
            return False
    return True


class Target:
    """Where messages go, as far as building them needs to know: the longest
    queue name and task id (UTF-8 bytes) the broker carries, and the address
    the result backend wants results sent to.

    This one is fixed (by default: what every broker carries, and no reply
    address, as for results stored by task id).  The app's own reads them
    from its broker and result backend; building never calls anything else
    of theirs."""

    def __init__(self, max_queue_name_bytes: int = validation.MAX_NAME_BYTES,
                 max_message_id_bytes: int = validation.MAX_NAME_BYTES,
                 reply_to: Optional[str] = None) -> None:
        self._limits = (max_queue_name_bytes, max_message_id_bytes)
        self._reply_to = reply_to

    def limits(self) -> Tuple[int, int]:
        """(longest queue name, longest task id), in UTF-8 bytes."""
        return self._limits

    def reply_to(self) -> Optional[str]:
        """Put in each message that wants its result (``rpc://``'s reply queue); None: none needed."""
        return self._reply_to


def _no_caller() -> Optional["Request"]:
    return None


def _expires_at(expires: Any, now: float) -> float:
    """The epoch at which a message given ``expires`` (a datetime, or
    seconds from ``now``) expires, checked."""
    if isinstance(expires, datetime):
        return validation.epoch("expires", expires)
    return now + validation.offset("expires", expires)


class MessageBuilder:
    """Builds the messages of task calls from the app's settings and tasks
    (module docstring).  ``config`` and ``tasks`` are read as they are at
    each call (``[task:NAME]`` options, routes and registrations made later
    count); ``target`` defaults to any broker's limits and no reply address;
    ``context`` returns the running task's Request (or None)."""

    def __init__(self, config: "Config", tasks: Optional[Mapping[str, "Task"]] = None,
                 target: Optional[Target] = None,
                 context: Optional[Callable[[], Optional["Request"]]] = None) -> None:
        self.config = config
        self.tasks: Mapping[str, "Task"] = {} if tasks is None else tasks
        self.target = Target() if target is None else target
        self.context = _no_caller if context is None else context
        self._task_names: Set[str] = set()          # task names validated once
        self._queue_sizes: Dict[str, int] = {}      # queue names validated once -> their UTF-8 size

    # -- routing -------------------------------------------------------------------
    def route(self, name: str) -> Optional[str]:
        """The queue ``[routes]`` gives task ``name``: the first glob that
        matches, in the order written; None when none does."""
        for pattern, queue in self.config.routes.items():
            if fnmatch.fnmatchcase(name, pattern):
                return queue
        return None

    # -- one call ------------------------------------------------------------------
    def build(self, name: str, args: Sequence[Any] = (), kwargs: Optional[Dict[str, Any]] = None,
              options: Optional[Dict[str, Any]] = None, *, now: Optional[float] = None) -> TaskMessage:
        """The message of one call: ``options`` are apply_async's.  Every
        option is checked here (types and ranges, name lengths): a bad one
        raises ValueError or TypeError naming it.  ``now`` (epoch seconds,
        default the clock) is what countdown and relative expires count from."""
        if options is None:
            options = _NO_OPTIONS
        elif options and not CALL_OPTIONS.issuperset(options):
            unknown = set(options) - CALL_OPTIONS
            raise TypeError(f"unknown option(s) {sorted(unknown)}; expected some of {_SORTED_CALL_OPTIONS}")
        if type(name) is not str or name not in self._task_names:
            validation.name("task name", name)
            if len(self._task_names) < NAME_CACHE_MAX:
                self._task_names.add(name)
        if kwargs is None:
            kwargs = {}
        if not _flat(args, kwargs):
            validation.arguments(args, kwargs)
        d_expires, d_priority, d_soft, d_hard, d_queue, d_ignore = self._task_defaults(name)
        if now is None:
            now = time.time()
        # each rule is called for a value given; a value left out (None) passes every rule
        get = options.get if options else None      # None: no option given (delay()), nothing to read
        eta = expires = priority = time_limit = soft_limit = task_id = queue = None
        if get is not None:
            eta = get("eta")
            if eta is not None:
                eta = validation.epoch("eta", eta)
            countdown = get("countdown")
            if countdown is not None:
                if eta is not None:
                    raise ValueError("pass countdown or eta, not both")
                eta = now + validation.offset("countdown", countdown)
            expires, priority = get("expires"), get("priority")
        if expires is None:
            expires = d_expires
        if expires is not None:
            expires = _expires_at(expires, now)
        if priority is None:
            priority = d_priority or 0
        if type(priority) is not int or not 0 <= priority <= 9:
            validation.priority("priority", priority)
        if get is not None:
            time_limit = get("time_limit")
            if time_limit is not None:
                time_limit = validation.seconds("time_limit", time_limit)
            soft_limit = get("soft_time_limit")
            if soft_limit is not None:
                soft_limit = validation.seconds("soft_time_limit", soft_limit)
        soft = soft_limit if soft_limit is not None else d_soft
        hard = time_limit if time_limit is not None else d_hard
        if soft and hard:
            validation.limits(soft, hard)
        queue_bytes, id_bytes = self.target.limits()
        if get is not None:
            task_id, queue = get("task_id"), get("queue")
        task_id = new_id() if task_id is None else validation.name("task_id", task_id, limit=id_bytes)
        if queue is None:           # call option > task option > [routes] > default queue
            queue = d_queue or (self.route(name) if self.config.routes else None) \
                or self.config.section("greenq")["default_queue"]
        size = self._queue_sizes.get(queue) if type(queue) is str else None
        if size is None or size > queue_bytes:
            queue = self._queue(queue, queue_bytes)
        ignore = d_ignore if get is None else get("ignore_result", d_ignore)
        caller = self.context()
        root_id: Optional[str] = None
        parent_id: Optional[str] = None
        if caller is not None and not caller.is_eager:
            root_id, parent_id = caller.root_id, caller.id
        return TaskMessage(             # in TaskMessage's field order
            name, list(args), dict(kwargs), task_id, queue, priority,
            eta if eta and eta > now else None, expires, 0, now, root_id, time_limit, soft_limit,
            None if ignore else self.target.reply_to(), parent_id)

    # -- many calls at once (app.enqueue_many) ---------------------------------------
    def build_many(self, calls: Iterable[Union[Call, Dict[str, Any]]], *,
                   now: Optional[float] = None) -> List[TaskMessage]:
        """The messages of many calls, in order: each a call ``(name, args,
        kwargs, options)`` as ``build`` takes it, or a signature record as
        ``build_record`` takes it.  Every message is the one ``build`` (or
        ``build_record``) gives for it with the same ``now``: one clock read
        for the batch (default the clock).  What depends on the task name
        alone is worked out once per name in the batch: the name's check,
        its options (``[task:NAME]`` > decorator > default), its queue
        (task option > ``[routes]`` > default queue) and that queue's check,
        its default expiry and time limits checked; so is the broker's name
        limits, the reply address (asked once, when a message first wants
        it) and the running task (``context``).  A call given options is
        built by ``build`` itself (each option is checked per call); every
        call's arguments are checked.  Raises on the first bad call, as
        ``build`` does, so nothing of a bad batch is sent."""
        if now is None:
            now = time.time()
        out: List[TaskMessage] = []
        add = out.append
        named: Dict[str, Tuple[str, int, Optional[float], bool]] = {}     # per task name, see _defaults
        reply: List[Optional[str]] = []         # the reply address, asked once (rpc:// may open a queue)
        caller = self.context()
        root_id: Optional[str] = None
        parent_id: Optional[str] = None
        if caller is not None and not caller.is_eager:
            root_id, parent_id = caller.root_id, caller.id
        task_names = self._task_names
        for call in calls:
            if type(call) is dict:              # a signature record (link, link_error)
                add(self.build_record(call, now=now))
                continue
            name, args, kwargs, options = cast(Call, call)
            if options:                         # each option checked, as for one call
                add(self.build(name, args, kwargs, options, now=now))
                continue
            if type(name) is not str or name not in task_names:
                validation.name("task name", name)
                if len(task_names) < NAME_CACHE_MAX:
                    task_names.add(name)
            if kwargs is None:
                kwargs = {}
            if not _flat(args, kwargs):
                validation.arguments(args, kwargs)
            defaults = named.get(name)
            if defaults is None:
                defaults = named[name] = self._defaults(name, now)
            queue, priority, expires, ignore = defaults
            if ignore:
                reply_to = None
            elif reply:
                reply_to = reply[0]
            else:
                reply_to = self.target.reply_to()
                reply.append(reply_to)
            add(TaskMessage(            # in TaskMessage's field order, as build makes it
                name, list(args), dict(kwargs), new_id(), queue, priority, None, expires, 0, now,
                root_id, None, None, reply_to, parent_id))
        return out

    def _task_defaults(self, name: str) -> Sequence[Any]:
        """The options of ``BUILD_KEYS`` a call of ``name`` gets when it gives
        none: ``[task:NAME]`` > decorator > default; for a task not
        registered here, its ``[task:NAME]`` options only."""
        task = self.tasks.get(name)
        if task is not None:
            return task.options_for(BUILD_KEYS)
        configured = self.config.task_options(name).get
        return [configured(key) for key in BUILD_KEYS]

    def _defaults(self, name: str, now: float) -> Tuple[str, int, Optional[float], bool]:
        """What ``build`` gives a call of ``name`` with no options, checked as
        it checks them: (queue, priority, expires at, ignore_result)."""
        d_expires, d_priority, d_soft, d_hard, d_queue, d_ignore = self._task_defaults(name)
        expires = d_expires
        if expires is not None:
            expires = _expires_at(expires, now)
        priority = d_priority or 0
        if type(priority) is not int or not 0 <= priority <= 9:
            validation.priority("priority", priority)
        if d_soft and d_hard:
            validation.limits(d_soft, d_hard)
        queue_bytes = self.target.limits()[0]
        queue = d_queue or (self.route(name) if self.config.routes else None) \
            or self.config.section("greenq")["default_queue"]
        queue = self._queue(queue, queue_bytes)
        return queue, priority, expires, bool(d_ignore)

    def _queue(self, queue: Any, limit: int) -> str:
        """``validation.name("queue", queue, limit=limit)``, remembered per name."""
        size = self._queue_sizes.get(queue) if type(queue) is str else None
        if size is not None and size <= limit:
            return cast(str, queue)     # a str: its size was found under its name
        validation.name("queue", queue, limit=limit)
        if len(self._queue_sizes) < NAME_CACHE_MAX:
            self._queue_sizes[queue] = len(queue.encode("utf-8"))
        return cast(str, queue)         # validation.name passed it

    # -- a signature record (greenq.canvas) ----------------------------------------------
    def build_record(self, record: Dict[str, Any], prefix: Sequence[Any] = (),
                     kwargs: Optional[Dict[str, Any]] = None, parent: Optional[TaskMessage] = None,
                     *, now: Optional[float] = None) -> TaskMessage:
        """The message of signature ``record`` (greenq.canvas) called with
        ``prefix`` before its own arguments and ``kwargs`` over its own (not
        for an immutable one), carrying its workflow fields.  With ``parent``
        (a worker sending what follows a task): the child carries the parent's
        id, root id and reply address, and nothing about the worker's own
        process."""
        options = record.get("options") or {}
        call = {k: v for k, v in options.items() if k in CALL_OPTIONS}
        args = list(record.get("args") or [])
        all_kwargs = dict(record.get("kwargs") or {})
        if not record.get("immutable"):
            args = list(prefix) + args
            all_kwargs.update(kwargs or {})
        if parent is not None:
            call["ignore_result"] = True          # no reply address of the worker's own
        msg = self.build(record["task"], args, all_kwargs, call, now=now)
        msg.link = options.get("link") or None
        msg.link_error = options.get("link_error") or None
        msg.chain = options.get("chain") or None
        msg.group_id = options.get("group_id")
        msg.chord_size = options.get("chord_size")
        msg.chord_result = options.get("chord_result")
        msg.trace = options.get("trace")          # a chord callback's links (greenq/tracing.py)
        if parent is not None:
            if parent.trace:                      # sent under the parent's span (greenq/tracing.py)
                msg.trace = dict(parent.trace, **msg.trace) if msg.trace else parent.trace
            msg.parent_id = parent.id
            msg.root_id = parent.root_id or parent.id
            if not options.get("ignore_result"):
                msg.reply_to = parent.reply_to
        return msg
