"""Tasks: the ``@app.task`` decorator's product, signatures, request context, retries."""
from __future__ import annotations

import threading
import time
import traceback as tb_module
from datetime import datetime
from typing import TYPE_CHECKING, Any, Callable, Dict, Generic, List, Optional, Sequence, Union, overload

from . import validation
from .backoff import backoff as exponential_backoff
from .building import CALL_OPTIONS  # noqa: F401 - apply_async's options, named here too
from .canvas import Signature
from .config import CODE_ONLY_TASK_OPTIONS, TASK_SETTINGS
from .exceptions import MaxRetriesExceededError, Reject, Retry
from .result import FAILURE, READY_STATES, SUCCESS, EagerResult, P, R, make_meta

if TYPE_CHECKING:  # pragma: no cover
    from typing_extensions import Concatenate, ParamSpec

    from .app import GreenQ
    from .result import AsyncResult

    Rest = ParamSpec("Rest")   # a task's parameters after the first (s() without the parent's result)

#: decorator options and their defaults: greenq.config's table of task options
TASK_DEFAULTS: Dict[str, Any] = {**{key: setting.default for key, setting in TASK_SETTINGS.items()},
                                 **CODE_ONLY_TASK_OPTIONS}

#: the request of each greenlet or thread running a task, keyed by ``_current()``: its greenlet
#: (greenlet.getcurrent: a thread's main greenlet outside any pool), or its thread's ident when
#: greenlet is not installed.  An entry lives only while its task runs (``set_request(None)``
#: removes it): an idle runner holds none (a greenlet-local kept a dict in each, 0.6 KB a runner)
_requests: Dict[Any, "Request"] = {}
_current: Any = None  # chosen on first use


class Request:
    """What a running task knows about its own call (``self.request`` with bind=True)."""

    def __init__(self, id: str, task: str, args: Sequence[Any], kwargs: Dict[str, Any],
                 retries: int = 0, queue: Optional[str] = None, eta: Optional[float] = None,
                 expires: Optional[float] = None, root_id: Optional[str] = None,
                 delivery_info: Optional[Dict[str, Any]] = None, is_eager: bool = False,
                 reply_to: Optional[str] = None, priority: int = 0,
                 parent_id: Optional[str] = None, group_id: Optional[str] = None) -> None:
        self.id = id
        self.task = task
        self.args = args
        self.kwargs = kwargs
        self.retries = retries
        self.queue = queue
        self.eta = eta
        self.expires = expires
        self.root_id = root_id or id
        self.delivery_info = delivery_info or {}
        self.is_eager = is_eager
        self.reply_to = reply_to
        self.priority = priority
        self.parent_id = parent_id
        self.group_id = group_id

    def __repr__(self) -> str:
        return f"<Request {self.task}[{self.id}] retries={self.retries}>"


def _who() -> Callable[[], Any]:
    global _current
    try:
        from greenlet import getcurrent
        _current = getcurrent
    except ImportError:          # no greenlet: threads (and solo) only
        _current = threading.get_ident
    return _current


def current_request() -> Optional[Request]:
    if not _requests:
        return None
    return _requests.get((_current or _who())())


def set_request(request: Optional[Request]) -> None:
    key = (_current or _who())()
    if request is None:
        _requests.pop(key, None)
    else:
        _requests[key] = request


class Task(Generic[P, R]):
    """A registered task.  Calling it runs the function here; ``delay`` sends it.

    ``Task[P, R]`` keeps the function's parameters ``P`` (without ``self``
    for bind=True) and its return type ``R``: a checker checks ``add(...)``,
    ``add.delay(...)``, ``add.si(...)`` and ``add.s(...)`` against them, and
    ``add.delay(...).get()`` is an ``R`` (docs/workflows.md, "Typed tasks")."""

    def __init__(self, app: "GreenQ", fn: Callable[..., Any], name: str, bind: bool,
                 options: Dict[str, Any]) -> None:
        unknown = set(options) - set(TASK_DEFAULTS)
        if unknown:
            raise TypeError(f"@app.task: unknown option(s) {sorted(unknown)}")
        validation.task_options(name, options)
        self.app = app
        self.fn = fn
        self.name = name
        self.bind = bind
        self._options = options
        #: (config, its task_generation, the merged options): see ``resolved``
        self._resolved: Any = (None, -1, None)
        self.__doc__ = fn.__doc__
        self.__name__ = getattr(fn, "__name__", name)
        self.__module__ = getattr(fn, "__module__", None)  # type: ignore[assignment]  # None as functools.wraps leaves it
        self.__wrapped__ = fn

    def __repr__(self) -> str:
        return f"<Task {self.name}>"

    def option(self, key: str) -> Any:
        """The effective option: ``[task:NAME]`` in the INI file, else the decorator, else the default."""
        overrides = self.app.config.task_options(self.name)
        if key in overrides:
            return overrides[key]
        return self._options.get(key, TASK_DEFAULTS[key])

    def resolved(self) -> Dict[str, Any]:
        """Every option's effective value (as ``option`` gives it), merged once
        and kept until the configuration changes: another ``app.config``, or
        a ``[task:NAME]`` key set on it (``Config.set``, as ``greenq control
        rate-limit`` does, bumps its ``task_generation``).  The worker reads
        a task's options here on every task, and the client at every send.
        Read-only: the dict is shared.  The decorator's options are those
        given to ``@app.task``."""
        config = self.app.config
        cached_config, generation, merged = self._resolved
        if cached_config is config and generation == config.task_generation:
            return merged
        generation = config.task_generation
        merged = {**TASK_DEFAULTS, **self._options, **config.task_options(self.name)}
        self._resolved = (config, generation, merged)
        return merged

    def options_for(self, keys: Sequence[str]) -> List[Any]:
        """``[self.option(key) for key in keys]`` in one pass (the message
        builder asks for the options a message depends on at every send)."""
        return list(map(self.resolved().__getitem__, keys))

    @property
    def request(self) -> Request:
        req = current_request()
        if req is None or req.task != self.name:
            return Request(id="", task=self.name, args=(), kwargs={}, is_eager=True)
        return req

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        if self.bind:
            return self.fn(self, *args, **kwargs)
        return self.fn(*args, **kwargs)

    # -- sending -------------------------------------------------------------
    # s() takes all the arguments, or all but the first: in a chain, as a
    # callback (link=) or as a chord's body the parent's result comes first.
    @overload
    def s(self, *args: P.args, **kwargs: P.kwargs) -> Signature[R]: ...

    @overload
    def s(self: "Task[Concatenate[Any, Rest], R]", *args: Rest.args, **kwargs: Rest.kwargs) -> Signature[R]: ...

    def s(self, *args: Any, **kwargs: Any) -> Signature[R]:
        return Signature(self.name, args, kwargs, app=self.app)

    signature = s

    def si(self, *args: P.args, **kwargs: P.kwargs) -> Signature[R]:
        """An immutable signature: in a chain or as a callback it ignores the parent's result."""
        return Signature(self.name, args, kwargs, app=self.app, immutable=True)

    def update_state(self, task_id: Optional[str] = None, state: Optional[str] = None,
                     meta: Any = None) -> None:
        """Store a state of the running task (``state="PROGRESS", meta={...}``),
        read by the caller as ``AsyncResult.state`` and ``.info``.  Not final:
        ``get()`` goes on waiting for the outcome.  Eager runs store nothing."""
        req = self.request
        task_id = task_id or req.id
        if not task_id or req.is_eager and task_id == req.id:
            return
        state = state or "PROGRESS"
        validation.name("state", state)
        data = self.app.codec.encode_result(make_meta(task_id, state, result=meta, task=self.name,
                                                      retries=req.retries))
        self.app.backend.store(task_id, data, final=state in READY_STATES, reply_to=req.reply_to)

    def delay(self, *args: P.args, **kwargs: P.kwargs) -> "AsyncResult[R]":
        return self.apply_async(args, kwargs)

    # args and kwargs are not checked against P: a tuple and a dict cannot be
    # matched with a ParamSpec (delay and si can)
    def apply_async(self, args: Sequence[Any] = (), kwargs: Optional[Dict[str, Any]] = None,
                    **options: Any) -> "AsyncResult[R]":
        return self.app.send_task(self.name, args, kwargs, **options)

    # -- retries -------------------------------------------------------------
    def retry(self, exc: Optional[BaseException] = None, countdown: Optional[float] = None,
              eta: Union[None, float, datetime] = None, max_retries: Optional[int] = None) -> Retry:
        """Ask for this task to run again later; always raises.

        Raises ``Retry`` (the worker republishes the message with a delay) or,
        once ``max_retries`` is reached, ``exc`` (or ``MaxRetriesExceededError``)."""
        req = self.request
        limit = self.option("max_retries") if max_retries is None else max_retries
        if limit is not None and req.retries >= limit:
            if exc is not None:
                raise exc
            raise MaxRetriesExceededError(f"{self.name}[{req.id}] reached max_retries={limit}")
        if eta is not None:
            when = validation.epoch("eta", eta)
        else:
            delay = self.option("default_retry_delay") if countdown is None else countdown
            when = time.time() + validation.seconds("countdown", delay)
        raise Retry(f"retry in {max(0.0, when - time.time()):.2f} s", exc=exc, when=when)

    def backoff(self, retries: int) -> float:
        """The delay before automatic retry number ``retries + 1``."""
        base = self.option("retry_backoff")
        if base is True:
            base = 1.0
        if not base:
            return float(self.option("default_retry_delay"))
        jitter = 1.0 if self.option("retry_jitter") else 0.0   # anything from 0 to the whole wait
        return exponential_backoff(retries + 1, float(base), float(self.option("retry_backoff_max")), jitter)

    def run_with_retries(self, args: Sequence[Any], kwargs: Dict[str, Any]) -> Any:
        """Call the function; an exception listed in ``autoretry_for`` becomes
        ``self.retry(exc=..., countdown=backoff)``.  The function is called
        as ``__call__`` does, but not through it: a call through a class's
        ``__call__`` is one more level of C stack, which the greenlet of every
        task in flight keeps saved while it waits (about 900 bytes a task)."""
        fn, bind = self.fn, self.bind
        autoretry = self.resolved()["autoretry_for"]
        if not autoretry:
            # up to three arguments, positional, a plain call: Python 3.11 runs a plain call of a
            # Python function in the caller's C frame, where ``fn(*args)`` recurses into the eval
            # loop (about 0.3 KB more C stack saved by the greenlet of every task waiting) and
            # copies the arguments into a tuple and a dict (0.1 KB) for as long as it runs
            count = len(args) if not kwargs and (type(args) is list or type(args) is tuple) else -1
            if bind:
                if count == 0:
                    return fn(self)
                if count == 1:
                    return fn(self, args[0])
                if count == 2:
                    return fn(self, args[0], args[1])
            elif count == 0:
                return fn()
            elif count == 1:
                return fn(args[0])
            elif count == 2:
                return fn(args[0], args[1])
            elif count == 3:
                return fn(args[0], args[1], args[2])
            return fn(self, *args, **kwargs) if bind else fn(*args, **kwargs)
        try:
            return fn(self, *args, **kwargs) if bind else fn(*args, **kwargs)
        except tuple(autoretry) as exc:
            raise self.retry(exc=exc, countdown=self.backoff(self.request.retries))

    # -- eager ---------------------------------------------------------------
    def apply(self, args: Sequence[Any] = (), kwargs: Optional[Dict[str, Any]] = None,
              task_id: Optional[str] = None, **_: Any) -> EagerResult[R]:
        """Run here and now (eager mode), retries included, and return a finished result."""
        from .message import new_id
        task_id = task_id or new_id()
        kwargs = kwargs or {}
        retries = 0
        previous = current_request()
        try:
            while True:
                set_request(Request(task_id, self.name, args, kwargs, retries=retries, is_eager=True))
                try:
                    value = self.run_with_retries(args, kwargs)
                except Retry:
                    retries += 1
                    continue
                except Reject as exc:
                    return EagerResult(task_id, self.app, make_meta(task_id, FAILURE, exc=exc,
                                       task=self.name, retries=retries), self.name)
                except Exception as exc:
                    return EagerResult(task_id, self.app, make_meta(
                        task_id, FAILURE, exc=exc, traceback=tb_module.format_exc(),
                        task=self.name, retries=retries), self.name)
                return EagerResult(task_id, self.app, make_meta(
                    task_id, SUCCESS, result=value, task=self.name, retries=retries), self.name)
        finally:
            set_request(previous)

    # -- asyncio (docs/asyncio.md) --------------------------------------------
    async def adelay(self, *args: P.args, **kwargs: P.kwargs) -> "AsyncResult[R]":
        """``delay`` for asyncio callers: the same message, published without
        blocking the event loop."""
        return await self.aapply_async(args, kwargs)

    async def aapply_async(self, args: Sequence[Any] = (), kwargs: Optional[Dict[str, Any]] = None,
                           **options: Any) -> "AsyncResult[R]":
        """``apply_async`` for asyncio callers (every option, checked the same way)."""
        return await self.app.asend_task(self.name, args, kwargs, **options)


def make_task(app: "GreenQ", fn: Callable[..., Any], name: Optional[str], bind: bool,
              options: Dict[str, Any]) -> Task:
    task_name = name or f"{fn.__module__}.{fn.__qualname__}"
    return Task(app, fn, task_name, bind, options)
