"""Workflows (CONTRACT section 6): signatures, chains, groups and chords.

A canvas is flattened, on the caller's side, into *signature records*: plain
dicts that travel inside messages and result-backend records::

    {"task": name, "args": [...], "kwargs": {...}, "immutable": bool,
     "options": {call options..., "task_id": id, "link": [records],
                 "link_error": [records], "chain": [records],
                 "group_id": id, "chord_size": n, "chord_result": id}}

Every step gets its task id before anything is sent, so the caller's handle
(``AsyncResult``, ``GroupResult``) exists at once.  What follows a task is
carried by its message (``chain``: the next steps; ``link``/``link_error``:
callbacks) and sent by the worker when it settles the task, before the ack
(greenq/worker/followups.py).  A chord's callback is kept in the result
backend beside the member ids; the backend counts finished members
(``ResultBackend.chord_member_done``) and the worker that completes the count
sends the callback.  Group records go through the app's Codec like results:
with a signing key they are authenticated (bound to the group id) before
they are read, and each chord member's message carries ``chord_result``, the
id where the chord's outcome is stored, so a chord whose record fails its
check can still be failed with ChordError there.
"""
from __future__ import annotations

import copy
import time
from typing import (TYPE_CHECKING, Any, Callable, Dict, Generic, Iterable, Iterator, List, Optional, Sequence, Tuple,
                    TypeVar, Union, overload)

from .building import CALL_OPTIONS
from .config import mask_url
from .exceptions import ConfigError, TimeoutError
from .message import GROUP, TaskMessage, new_id
from .result import AsyncResult, R, assert_will_not_block

if TYPE_CHECKING:  # pragma: no cover
    from typing import Literal

    from typing_extensions import Unpack

    from .app import GreenQ

#: the result type of another signature, chain or chord (``a | b`` is a chain of b's result)
S = TypeVar("S")

#: options a signature's ``set`` and ``apply_async`` take beside the call options
CALLBACK_OPTIONS = ("link", "link_error")
#: options greenq sets itself on signature records; never taken from users
INTERNAL_OPTIONS = ("chain", "group_id", "chord_size", "chord_result")
GROUP_STATE = "GROUP"     # the ``state`` of a group's record in the result backend


def _check_options(options: Dict[str, Any]) -> None:
    allowed = CALL_OPTIONS | set(CALLBACK_OPTIONS)
    unknown = set(options) - allowed
    if unknown:
        raise TypeError(f"unknown option(s) {sorted(unknown)}; expected some of {sorted(allowed)}")


def _records(value: Any) -> List[Dict[str, Any]]:
    """``link=`` / ``link_error=`` as a list of signature records."""
    if value is None:
        return []
    items = value if isinstance(value, (list, tuple)) else [value]
    out = []
    for item in items:
        if isinstance(item, Signature):
            out.append(item.to_dict())
        elif isinstance(item, dict) and isinstance(item.get("task"), str):
            out.append(copy.deepcopy(item))
        else:
            raise TypeError(f"a callback must be a signature (task.s(...)), not {type(item).__name__}")
    return out


class Signature(Generic[R]):
    """A task call not yet sent: ``add.s(2, 3).set(queue="high").delay()``.

    ``add.si(2, 3)`` is immutable: in a chain or as a callback it ignores the
    parent's result.  ``a | b`` makes a chain.  ``Signature[R]``: ``R`` is
    what the task returns (Any for ``app.signature("name")``)."""

    def __init__(self, task: str, args: Sequence[Any] = (), kwargs: Optional[Dict[str, Any]] = None,
                 options: Optional[Dict[str, Any]] = None, app: Optional["GreenQ"] = None,
                 immutable: bool = False) -> None:
        self.task = task
        self.args = tuple(args)
        self.kwargs = dict(kwargs or {})
        self.options = dict(options or {})
        self.app = app
        self.immutable = immutable

    def set(self, **options: Any) -> "Signature[R]":
        _check_options(options)
        self.options.update(options)
        return self

    def clone(self) -> "Signature[R]":
        return Signature(self.task, self.args, self.kwargs, copy.deepcopy(self.options), self.app,
                         self.immutable)

    def link(self, callback: "Signature[S]") -> "Signature[S]":
        """Send ``callback`` with this task's result when it succeeds."""
        self.options["link"] = _records(self.options.get("link")) + _records(callback)
        return callback

    def link_error(self, errback: "Signature[S]") -> "Signature[S]":
        """Send ``errback`` with this task's id when it fails."""
        self.options["link_error"] = _records(self.options.get("link_error")) + _records(errback)
        return errback

    def __or__(self, other: "Union[Signature[S], chain[S]]") -> "chain[S]":
        return chain(self, other)

    def delay(self, *args: Any, **kwargs: Any) -> "AsyncResult[R]":
        return self.apply_async(args, kwargs)

    def apply_async(self, args: Sequence[Any] = (), kwargs: Optional[Dict[str, Any]] = None,
                    **options: Any) -> "AsyncResult[R]":
        _check_options(options)
        app = _app_of(self)
        if self.immutable:
            args, kwargs = (), {}
        return app.send_task(self.task, tuple(self.args) + tuple(args),
                             dict(self.kwargs, **(kwargs or {})), **dict(self.options, **options))

    def to_dict(self) -> Dict[str, Any]:
        """The signature record (module docstring)."""
        options = {k: v for k, v in self.options.items() if k not in CALLBACK_OPTIONS}
        for key in CALLBACK_OPTIONS:
            if self.options.get(key):
                options[key] = _records(self.options[key])
        return {"task": self.task, "args": list(self.args), "kwargs": dict(self.kwargs),
                "options": options, "immutable": self.immutable}

    @classmethod
    def from_dict(cls, record: Dict[str, Any], app: Optional["GreenQ"] = None) -> "Signature[Any]":
        return cls(record["task"], record.get("args") or (), record.get("kwargs") or {},
                   dict(record.get("options") or {}), app, bool(record.get("immutable")))

    def _freeze(self, app: "GreenQ", options: Dict[str, Any]) -> "Tuple[Dict[str, Any], AsyncResult[R]]":
        """This call as a record with its task id fixed (``options`` fill in
        what the signature leaves unset), and its result handle."""
        record = self.to_dict()
        merged = dict(options)
        merged.update(record["options"])
        for key in CALLBACK_OPTIONS:
            if options.get(key) and record["options"].get(key):
                merged[key] = record["options"][key] + _records(options[key])
            elif options.get(key):
                merged[key] = _records(options[key])
        merged.setdefault("task_id", new_id())
        record["options"] = merged
        return record, AsyncResult(merged["task_id"], app, self.task)

    def __repr__(self) -> str:
        parts = [repr(a) for a in self.args] + [f"{k}={v!r}" for k, v in self.kwargs.items()]
        return f"{self.task}({', '.join(parts)}){'!' if self.immutable else ''}"


def _app_of(*items: Any) -> "GreenQ":
    for item in items:
        app = getattr(item, "app", None)
        if app is not None:
            return app
    raise RuntimeError("the signature has no app: make it with task.s() or app.signature()")


class chain(Generic[R]):  # noqa: N801 - Celery's name
    """Run the steps one after the other, each result becoming the next
    step's first argument (unless the step is immutable).  A failure stops
    the chain: the steps left are stored as FAILURE with the same exception,
    so ``get()`` on the chain's result raises it.  A group as the first step
    makes a chord of it and the rest.  ``chain[R]``: ``R`` is the last
    step's result type (Any for ``chain(iterable)``)."""

    @overload
    def __init__(self: "chain[S]", task: "Union[Signature[S], chain[S], chord[S]]", /) -> None: ...

    @overload
    def __init__(self: "chain[S]",
                 *tasks: "Unpack[Tuple[Any, Unpack[Tuple[Any, ...]], Union[Signature[S], chain[S]]]]") -> None: ...

    @overload
    def __init__(self: "chain[Any]", *tasks: Any) -> None: ...   # chain(iterable), a single group

    # (mypy 2.4 cannot see that *Any accepts the variadic tuple of overload 2)
    def __init__(self, *tasks: Any) -> None:  # type: ignore[misc]
        if len(tasks) == 1 and not isinstance(tasks[0], (Signature, chain, group, chord)):
            tasks = tuple(tasks[0])
        steps: List[Any] = []
        for task in tasks:
            steps.extend(task.tasks if isinstance(task, chain) else [task])
        if not steps:
            raise ValueError("chain() needs at least one signature")
        for i, step in enumerate(steps):
            if i and isinstance(step, (group, chord)):
                raise TypeError("a group or chord can only be the first step of a chain")
            if not isinstance(step, (Signature, group, chord)):
                raise TypeError(f"chain step {i} is a {type(step).__name__}, not a signature")
        self.tasks: List[Any] = steps
        self.app = None

    def __or__(self, other: "Union[Signature[S], chain[S]]") -> "chain[S]":
        return chain(self, other)

    def delay(self, *args: Any, **kwargs: Any) -> "AsyncResult[R]":
        return self.apply_async(args, kwargs)

    def _upgraded(self) -> "Optional[chord[Any]]":
        """A chain that starts with a group or chord is a chord."""
        head = self.tasks[0]
        if isinstance(head, group):
            return chord(head, chain(*self.tasks[1:])) if len(self.tasks) > 1 else None
        if isinstance(head, chord):
            rest = self.tasks[1:]
            return chord(head.header, chain(head.body, *rest)) if rest else head
        return None

    def apply_async(self, args: Sequence[Any] = (), kwargs: Optional[Dict[str, Any]] = None,
                    **options: Any) -> "AsyncResult[R]":
        """Send the first step; ``options`` apply to every step that does not
        set them itself (``link`` to the last step, ``link_error`` to each).
        Returns the last step's AsyncResult, its ``parent`` the one before
        (a chain of a single group: the group's GroupResult, which its type
        does not say)."""
        _check_options(options)
        upgraded = self._upgraded()
        if upgraded is not None:
            return upgraded.apply_async(args, kwargs, **options)
        if len(self.tasks) == 1 and isinstance(self.tasks[0], group):
            return self.tasks[0].apply_async(args, kwargs, **options)  # type: ignore[return-value]  # (docstring)
        app = _app_of(*self.tasks)
        record, result = self._freeze(app, options)
        return _send_record(app, record, args, kwargs, result)

    def _freeze(self, app: "GreenQ", options: Dict[str, Any]) -> "Tuple[Dict[str, Any], AsyncResult[R]]":
        last_id = options.get("task_id")
        common = {k: v for k, v in options.items() if k not in ("task_id", "link")}
        records, results = [], []
        parent: Optional[AsyncResult] = None
        for i, step in enumerate(self.tasks):
            step_options = dict(common)
            if i == len(self.tasks) - 1:
                if last_id is not None:
                    step_options["task_id"] = last_id
                if options.get("link"):
                    step_options["link"] = options["link"]
            record, result = step._freeze(app, step_options)
            result.parent = parent
            parent = result
            records.append(record)
            results.append(result)
        if len(records) > 1:
            records[0]["options"]["chain"] = records[1:]
        return records[0], results[-1]

    def __repr__(self) -> str:
        return " | ".join(repr(t) for t in self.tasks)


class group(Generic[R]):  # noqa: N801 - Celery's name
    """Run the signatures in parallel; ``delay()`` returns a GroupResult
    whose ``get()`` lists their results in the group's order.  ``group[R]``:
    ``R`` is the members' result type (their join, or union, when they differ)."""

    @overload
    def __init__(self: "group[S]", tasks: "Iterable[Union[Signature[S], chain[S]]]", /) -> None: ...

    @overload
    def __init__(self: "group[S]", *tasks: "Union[Signature[S], chain[S]]") -> None: ...

    def __init__(self, *tasks: Any) -> None:
        if len(tasks) == 1 and not isinstance(tasks[0], (Signature, chain)):
            tasks = tuple(tasks[0])
        for i, task in enumerate(tasks):
            if not isinstance(task, (Signature, chain)):
                raise TypeError(f"group member {i} is a {type(task).__name__}, not a signature")
        self.tasks: List[Any] = list(tasks)
        self.app = None

    def __or__(self, other: "Union[Signature[S], chain[S]]") -> "chord[S]":
        return chord(self, other)

    def delay(self, *args: Any, **kwargs: Any) -> "GroupResult[R]":
        return self.apply_async(args, kwargs)

    def apply_async(self, args: Sequence[Any] = (), kwargs: Optional[Dict[str, Any]] = None,
                    **options: Any) -> "GroupResult[R]":
        """Send every member (``args`` go first in each member's arguments),
        after saving the group's member ids where the backend stores results
        (so ``app.GroupResult(id)`` finds them)."""
        _check_options(options)
        app = _app_of(*self.tasks)
        group_id = options.pop("task_id", None) or new_id()
        records, results = self._freeze(app, group_id, options)
        if not app.config.eager and app.backend.stores_groups:
            app.backend.save_group(group_id, encode_group(app, group_id, results, None))
        if not app.config.eager and app.config.celery_queues:
            _save_celery_group(app, group_id, records, results)
        return GroupResult(group_id, _send_records(app, records, args, kwargs, results), app)

    def _freeze(self, app: "GreenQ", group_id: str, options: Dict[str, Any],
                **extra: Any) -> "Tuple[List[Dict[str, Any]], List[AsyncResult[R]]]":
        """Each member's record and result; ``group_id`` (and ``extra``: a
        chord's size and result id) go on the step whose result is the member's: the last
        step of a chain."""
        records, results = [], []
        for task in self.tasks:
            record, result = task._freeze(app, dict(options))
            *_, last = iter_records(record)
            last["options"].update(group_id=group_id, **extra)
            records.append(record)
            results.append(result)
        return records, results

    def __len__(self) -> int:
        return len(self.tasks)

    def __repr__(self) -> str:
        return f"group({', '.join(repr(t) for t in self.tasks)})"


class chord(Generic[R]):  # noqa: N801 - Celery's name
    """Run ``header`` (a group) in parallel, then ``body`` once with the list
    of their results.  Needs a result backend that counts (sqlite, redis,
    memory): with ``rpc://`` it raises ConfigError before sending anything.
    A member that fails or is revoked makes the chord FAILURE at once with
    ``ChordError`` naming it, and the body is not sent.  ``chord[R]``: ``R``
    is the body's result type (the header's is not checked against the
    body's parameter)."""

    @overload
    def __init__(self: "chord[S]", header: Any, body: "Union[Signature[S], chain[S]]") -> None: ...

    @overload
    def __init__(self: "chord[Any]", header: Any, body: None = None) -> None: ...

    def __init__(self, header: Any, body: Optional[Any] = None) -> None:
        self.header = header if isinstance(header, group) else group(header)
        self.body = body
        self.app = None

    def __call__(self, body: "Union[Signature[S], chain[S]]") -> "chord[S]":
        return chord(self.header, body)

    def __or__(self, other: "Union[Signature[S], chain[S]]") -> "chain[S]":
        return chain(self, other)

    def delay(self, *args: Any, **kwargs: Any) -> "AsyncResult[R]":
        return self.apply_async(args, kwargs)

    def apply_async(self, args: Sequence[Any] = (), kwargs: Optional[Dict[str, Any]] = None,
                    **options: Any) -> "AsyncResult[R]":
        """Save the member ids and the body in the backend, then send the
        members.  Returns the body's AsyncResult (``parent``: the GroupResult)."""
        if self.body is None:
            raise TypeError("chord() needs a body: chord(header, body) or chord(header)(body)")
        steps = self.body.tasks if isinstance(self.body, chain) else [self.body]
        if not all(isinstance(step, Signature) for step in steps):
            raise TypeError(f"a chord's body must be a signature or a chain of them, not {self.body!r}")
        _check_options(options)
        app = _app_of(*self.header.tasks, self.body)
        if not app.config.eager and not app.backend.stores_groups:
            raise ConfigError(f"a chord needs a result backend that stores results (redis://, sqlite://, "
                              f"memory://), not {app.backend.url.split(':', 1)[0]}://")
        body_record, result = self.body._freeze(app, {k: v for k, v in options.items() if k != "task_id"})
        if options.get("task_id"):
            result = _retarget(body_record, result, options["task_id"])
        group_id = new_id()
        header_options = {k: v for k, v in options.items() if k not in ("task_id", "link", "link_error")}
        records, results = self.header._freeze(app, group_id, header_options,
                                               chord_size=len(self.header.tasks), chord_result=result.id)
        if app.config.celery_queues and not app.config.eager:
            lasts = [list(iter_records(r))[-1] for r in records]     # the steps that count
            celery = [q for q in map(_queue_of(app), lasts) if q in app.codec.celery_queues]
            if celery:      # a Celery message carries no greenq chord: its body would never be sent
                raise ConfigError(f"a chord whose members go to a Celery queue ({celery[0]!r}) is not "
                                  f"supported yet (docs/celery.md): send its members to a greenq queue")
        group_result = GroupResult(group_id, results, app)
        first = result
        while first.parent is not None:          # a chain as body: its first step follows the group
            first = first.parent
        first.parent = group_result
        if app.config.eager:
            values = [_send_record(app, r, args, kwargs, res).get(propagate=True)
                      for r, res in zip(records, results)]
            return _send_record(app, body_record, (values,), {}, result)
        if not records:                       # nothing to wait for: the body runs now
            return _send_record(app, body_record, ([],), {}, result)
        tracer = app.codec.tracer
        if tracer is not None:                # the callback's spans link to the members' (greenq/tracing.py)
            tracer.chord(records, body_record)
        app.backend.save_group(group_id, encode_group(app, group_id, results, body_record))
        _send_records(app, records, args, kwargs, results)
        return result

    def __repr__(self) -> str:
        return f"chord({self.header!r}, {self.body!r})"


def _retarget(record: Dict[str, Any], result: AsyncResult, task_id: str) -> AsyncResult:
    """Give the last step of ``record`` (a chain's or a single call's) ``task_id``."""
    last = record["options"]["chain"][-1] if record["options"].get("chain") else record
    last["options"]["task_id"] = task_id
    fresh = AsyncResult(task_id, result.app, last["task"])
    fresh.parent = getattr(result, "parent", None)
    return fresh


# -- sending ---------------------------------------------------------------------
def build(app: "GreenQ", record: Dict[str, Any], prefix: Sequence[Any] = (),
          kwargs: Optional[Dict[str, Any]] = None, parent: Optional[TaskMessage] = None) -> TaskMessage:
    """The message of signature ``record`` called with ``prefix`` before its
    own arguments (not for an immutable one), built by the app's
    MessageBuilder (``build_record``, greenq/building.py).  With ``parent``
    (a worker sending what follows a task): the child carries the parent's
    id, root id and reply address, and nothing about the worker's own process."""
    return app.builder.build_record(record, prefix, kwargs, parent)


def _send_record(app: "GreenQ", record: Dict[str, Any], args: Sequence[Any],
                 kwargs: Optional[Dict[str, Any]], result: AsyncResult) -> AsyncResult:
    return _send_records(app, [record], args, kwargs, [result])[0]


def _send_records(app: "GreenQ", records: List[Dict[str, Any]], args: Sequence[Any],
                  kwargs: Optional[Dict[str, Any]], results: List[AsyncResult]) -> List[AsyncResult]:
    """Publish ``records`` in one pipelined call (run them here in eager mode)."""
    if app.config.eager:
        return [run_eager(app, r, args, kwargs) for r in records]
    builder = app.builder
    messages = [builder.build_record(r, args, kwargs) for r in records]
    if messages:
        codec = app.codec
        app.broker.publish_many([codec.outgoing(m) for m in messages])
    return results


def run_eager(app: "GreenQ", record: Dict[str, Any], prefix: Sequence[Any] = (),
              kwargs: Optional[Dict[str, Any]] = None) -> AsyncResult:
    """Eager mode: run ``record`` here with its chain and callbacks; the
    result of the chain's last step that ran."""
    options = record.get("options") or {}
    args = list(record.get("args") or [])
    all_kwargs = dict(record.get("kwargs") or {})
    if not record.get("immutable"):
        args = list(prefix) + args
        all_kwargs.update(kwargs or {})
    result = app.apply_eager(record["task"], args, all_kwargs, options.get("task_id"))
    if result.successful():
        for link in options.get("link") or ():
            run_eager(app, link, (result.result,))
        steps = options.get("chain")
        if steps:
            following = copy.deepcopy(steps[0])
            following.setdefault("options", {})["chain"] = steps[1:]
            return run_eager(app, following, (result.result,))
    else:
        for errback in options.get("link_error") or ():
            run_eager(app, errback, (result.id,))
    return result


# -- group records in the result backend ----------------------------------------------
def _save_celery_group(app: "GreenQ", group_id: str, records: List[Dict[str, Any]],
                       results: List[AsyncResult]) -> None:
    """A group with a member sent to a Celery queue also gets Celery's record
    (``celery-taskset-meta-<id>``, as Celery's ``GroupResult.save()``), so
    Celery's ``GroupResult.restore(id)`` finds it (docs/celery.md)."""
    if not app.backend.celery_groups:
        return
    celery = app.codec.celery_queues
    if any(q in celery for q in map(_queue_of(app), records)):
        app.backend.save_celery_group(group_id, [r.id for r in results])


def _queue_of(app: "GreenQ") -> Callable[[Dict[str, Any]], Any]:
    """The queue a signature's record goes to, as the builder picks it: the
    call's option, the task's, ``[routes]``, ``default_queue``."""
    default = app.config.section("greenq")["default_queue"]

    def queue_of(record: Dict[str, Any]) -> Any:
        task = app.tasks.get(record["task"])
        return ((record.get("options") or {}).get("queue") or (task.option("queue") if task else None)
                or (app.builder.route(record["task"]) if app.config.routes else None) or default)
    return queue_of


def encode_group(app: "GreenQ", group_id: str, results: List[AsyncResult],
                 callback: Optional[Dict[str, Any]]) -> bytes:
    """A group's record: its members' result ids and task names, and a
    chord's callback; signed for ``group_id`` when the app has a signing key."""
    return app.codec.encode_result({"id": group_id, "state": GROUP_STATE, "members": [r.id for r in results],
                                    "tasks": [r.task_name for r in results], "callback": callback}, GROUP)


def decode_group(app: "GreenQ", data: bytes, group_id: str) -> Dict[str, Any]:
    """The record of group ``group_id``, checked: MessageError when it fails
    its signature check (logged, naming the group and the backend) or cannot
    be read, ValueError when it is not a group record."""
    meta = app.codec.decode_result(data, group_id, GROUP, where=mask_url(app.backend.url))
    if meta.get("state") != GROUP_STATE or not isinstance(meta.get("members"), list):
        raise ValueError("not a group record")
    return meta


class GroupResult(Generic[R]):
    """The results of a group, in the group's order.  ``app.GroupResult(id)``
    finds a group again by its id (where the backend stores results).
    ``GroupResult[R]``: each member is an ``AsyncResult[R]``."""

    def __init__(self, id: str, results: "Sequence[AsyncResult[R]]", app: Optional["GreenQ"] = None) -> None:
        self.id = id
        self.results: "List[AsyncResult[R]]" = list(results)
        self.app = app
        self.parent: Optional[AsyncResult] = None

    @classmethod
    def restore(cls, app: "GreenQ", group_id: str) -> "Optional[GroupResult[Any]]":
        data = app.backend.load_group(group_id) if app.backend.stores_groups else None
        if data is None:
            return None
        meta = decode_group(app, data, group_id)
        tasks = meta.get("tasks") or [None] * len(meta["members"])
        return cls(group_id, [AsyncResult(i, app, t) for i, t in zip(meta["members"], tasks)], app)

    def __repr__(self) -> str:
        return f"<GroupResult {self.id} {self.completed_count()}/{len(self.results)}>"

    def __len__(self) -> int:
        return len(self.results)

    def __iter__(self) -> "Iterator[AsyncResult[R]]":
        return iter(self.results)

    def __getitem__(self, index: int) -> "AsyncResult[R]":
        return self.results[index]

    def ready(self) -> bool:
        return all(r.ready() for r in self.results)

    def successful(self) -> bool:
        return all(r.successful() for r in self.results)

    def failed(self) -> bool:
        return any(r.failed() for r in self.results)

    def waiting(self) -> bool:
        return not self.ready()

    def completed_count(self) -> int:
        """How many members succeeded (as Celery counts)."""
        return sum(1 for r in self.results if r.successful())

    @overload
    def get(self, timeout: Optional[float] = None, propagate: "Literal[True]" = True,
            disable_sync_subtasks: bool = True) -> List[R]: ...

    @overload
    def get(self, timeout: Optional[float] = None, *, propagate: bool,
            disable_sync_subtasks: bool = True) -> List[Union[R, BaseException]]: ...

    @overload
    def get(self, timeout: Optional[float], propagate: bool,
            disable_sync_subtasks: bool = True) -> List[Union[R, BaseException]]: ...

    def get(self, timeout: Optional[float] = None, propagate: bool = True,
            disable_sync_subtasks: bool = True) -> List[Any]:
        """Every member's value in order; the first failure is raised (or,
        with ``propagate=False``, its exception is put in the list).
        ``timeout`` bounds the whole wait.  Refused inside a running task
        unless ``disable_sync_subtasks=False`` (see AsyncResult.get)."""
        if disable_sync_subtasks:
            assert_will_not_block()
        deadline = None if timeout is None else time.monotonic() + timeout
        values = []
        for r in self.results:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                values.append(r.get(timeout=left, propagate=propagate, disable_sync_subtasks=False))
            except TimeoutError:
                raise TimeoutError(f"group {self.id}: member {r.id} not ready after {timeout} s") from None
        return values

    join = get

    def forget(self) -> None:
        for r in self.results:
            r.forget()
        if self.app is not None and self.app.backend.stores_groups:
            self.app.backend.forget_group(self.id)

    def revoke(self, terminate: bool = False) -> None:
        for r in self.results:
            r.revoke(terminate=terminate)

    # -- asyncio (docs/asyncio.md) ---------------------------------------------
    @overload
    async def aget(self, timeout: Optional[float] = None, propagate: "Literal[True]" = True,
                   disable_sync_subtasks: bool = True) -> List[R]: ...

    @overload
    async def aget(self, timeout: Optional[float] = None, *, propagate: bool,
                   disable_sync_subtasks: bool = True) -> List[Union[R, BaseException]]: ...

    @overload
    async def aget(self, timeout: Optional[float], propagate: bool,
                   disable_sync_subtasks: bool = True) -> List[Union[R, BaseException]]: ...

    async def aget(self, timeout: Optional[float] = None, propagate: bool = True,
                   disable_sync_subtasks: bool = True) -> List[Any]:
        """``get`` for asyncio callers: every member waited for at once (on
        the app's shared notifications); values in order, the first failure
        in order raised (the other waits cancelled), or with
        ``propagate=False`` put in the list.  ``timeout`` bounds the whole wait."""
        import asyncio
        if disable_sync_subtasks:
            assert_will_not_block()
        waits = [asyncio.ensure_future(r.aget(timeout=timeout, propagate=propagate, disable_sync_subtasks=False))
                 for r in self.results]
        values = []
        try:
            for r, wait in zip(self.results, waits):
                try:
                    values.append(await wait)
                except TimeoutError:
                    raise TimeoutError(f"group {self.id}: member {r.id} not ready after {timeout} s") from None
        finally:
            for wait in waits:
                if wait.done() and not wait.cancelled():
                    wait.exception()        # seen: a member that failed after the first failure
                else:
                    wait.cancel()
        return values


def signature(app: "GreenQ", name: "Union[str, Dict[str, Any], Signature[Any]]", args: Sequence[Any] = (),
              kwargs: Optional[Dict[str, Any]] = None, immutable: bool = False, **options: Any) -> "Signature[Any]":
    """``app.signature("shop.tasks.add", args=(1, 2))``: a signature by name
    (the task's code need not be importable here), or from a record."""
    if isinstance(name, Signature):
        sig = name.clone()
        sig.app = sig.app or app
        return sig
    if isinstance(name, dict):
        return Signature.from_dict(name, app)
    _check_options(options)
    return Signature(name, args, kwargs, options, app, immutable)


def iter_records(record: Dict[str, Any]) -> Iterable[Dict[str, Any]]:
    """``record`` and the chain steps it carries, in order."""
    yield record
    yield from (record.get("options") or {}).get("chain") or ()
