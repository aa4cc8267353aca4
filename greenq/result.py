"""AsyncResult: the caller's handle on a task's outcome."""
from __future__ import annotations

import importlib
import logging
import time
from typing import TYPE_CHECKING, Any, Dict, Generic, Iterable, List, Optional, Union, overload

from .config import mask_url
from .exceptions import TaskError, TaskRevokedError, TimeoutError

if TYPE_CHECKING:  # pragma: no cover
    from typing import Literal

    from typing_extensions import ParamSpec, TypeVar

    from .app import GreenQ

    # The type variables of the public generics (Task[P, R], AsyncResult[R],
    # Signature[R], GroupResult[R], chain/group/chord[R]).  The defaults make a
    # bare ``Task`` or ``AsyncResult`` in an annotation mean ``Task[..., Any]``
    # and ``AsyncResult[Any]``, as before they were generic (no "missing type
    # parameters" under --strict).  A checker reads typing_extensions from its
    # own copy of typeshed: nothing to install.
    P = ParamSpec("P", default=...)
    R = TypeVar("R", covariant=True, default=Any)
else:
    # At run time the same variables without defaults (typing's own before
    # Python 3.13): greenq installs nothing beside itself.  They only make
    # ``AsyncResult[int]`` or ``Task[[int, int], int]`` valid expressions.
    from typing import ParamSpec, TypeVar
    P = ParamSpec("P")
    R = TypeVar("R", covariant=True)

log = logging.getLogger("greenq")

PENDING, RECEIVED, STARTED, RETRY = "PENDING", "RECEIVED", "STARTED", "RETRY"
SUCCESS, FAILURE, REVOKED = "SUCCESS", "FAILURE", "REVOKED"
READY_STATES = frozenset({SUCCESS, FAILURE, REVOKED})
ALL_STATES = (PENDING, RECEIVED, STARTED, RETRY, SUCCESS, FAILURE, REVOKED)

#: why ``get()`` refuses to wait inside a running task (Celery's rule and words)
SYNC_SUBTASK_RULE = ("Never call result.get() within a task! A task that waits for another holds its "
                     "worker slot while the other waits for one: with every slot waiting, nothing runs "
                     "and every wait times out. Use a chain, a chord or link= instead "
                     "(docs/workflows.md), or pass disable_sync_subtasks=False if you know better.")


def assert_will_not_block() -> None:
    """RuntimeError (SYNC_SUBTASK_RULE) when called inside a task a worker is
    running; eager tasks (run inline, in the caller) may wait."""
    from .task import current_request     # here: greenq.task imports this module
    request = current_request()
    if request is not None and not request.is_eager:
        raise RuntimeError(SYNC_SUBTASK_RULE)


def _safe_str(value: Any) -> str:
    try:
        return str(value)
    except Exception:
        try:
            return repr(value)
        except Exception:
            return f"<{type(value).__name__} that cannot be shown>"


def exception_to_dict(exc: BaseException) -> Dict[str, Any]:
    """A task's exception as plain data.  Never raises, even for an exception
    whose ``str()`` or args' ``repr()`` do."""
    cls = type(exc)
    args: List[Any] = []
    try:
        raw_args = tuple(getattr(exc, "args", ()))
    except Exception:
        raw_args = ()
    for arg in raw_args:
        args.append(arg if isinstance(arg, (str, int, float, bool, type(None))) else _safe_str(arg))
    return {"type": f"{cls.__module__}.{cls.__qualname__}", "args": args, "message": _safe_str(exc)}


#: modules whose exceptions are always rebuilt as their own type
ALWAYS_REBUILT = frozenset({"builtins", "greenq.exceptions"})


def rebuild_exception(info: Dict[str, Any], remote_traceback: Optional[str],
                      allowed: Iterable[str] = ALWAYS_REBUILT) -> BaseException:
    """The task's exception as its own type when its module is ``allowed``
    (builtins, greenq's own, the modules of registered tasks and
    ``[greenq] exception_modules`` with their submodules), it is an
    ``Exception`` and it can be rebuilt from its args; else TaskError carrying
    the type name, message and remote traceback.  No module outside
    ``allowed`` is ever imported, and never is a BaseException that is not an
    Exception rebuilt (a record naming SystemExit or KeyboardInterrupt would
    otherwise pass through the caller's ``except Exception``)."""
    type_name = str(info.get("type", "Exception"))
    module_name, _, qualname = type_name.rpartition(".")
    module_name = module_name or "builtins"
    allowed = set(allowed)
    trusted = any(module_name == m or module_name.startswith(m + ".") for m in allowed)
    if trusted:
        try:
            obj: Any = importlib.import_module(module_name)
            for part in qualname.split("."):
                obj = getattr(obj, part)
            if isinstance(obj, type) and issubclass(obj, Exception):
                exc = obj(*info.get("args", []))
                exc.remote_traceback = remote_traceback  # type: ignore[attr-defined]
                return exc
        except Exception:
            pass
    return TaskError(type_name, _safe_str(info.get("message", "")), remote_traceback)


class AsyncResult(Generic[R]):
    """A task's result, looked up in the result backend by id.

    ``get()`` blocks on the backend (no busy polling) until a final state.
    ``AsyncResult[R]``: ``R`` is what the task returns (``add.delay(2, 3)``
    is an ``AsyncResult[int]`` for ``def add(x: int, y: int) -> int``)."""

    def __init__(self, task_id: str, app: "GreenQ", task_name: Optional[str] = None) -> None:
        self.id = task_id
        self.app = app
        self.task_name = task_name
        self._meta: Optional[Dict[str, Any]] = None
        #: the previous step's result (set by the caller for a chain, a
        #: GroupResult for a chord's body); see ``parent_id`` for the stored link
        self.parent: Any = None

    def __repr__(self) -> str:
        return f"<AsyncResult {self.id} {self.state}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AsyncResult) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    # -- state ---------------------------------------------------------------
    def _lookup(self) -> Optional[Dict[str, Any]]:
        if self._meta is not None and self._meta.get("state") in READY_STATES:
            return self._meta
        data = self.app.backend.get(self.id)
        if data is not None:
            self._meta = self._decode(data)
        else:
            celery = self._celery_reader()
            found = celery.get_celery(self.id) if celery is not None else None
            if found is not None:
                self._meta = found
        return self._meta

    def _celery_reader(self) -> Any:
        """The result backend when it also reads Celery's records and this app
        sends to Celery queues (a Celery worker may run the task and write
        only ``celery-task-meta-<id>``: docs/celery.md); else None."""
        if not getattr(self.app.config, "celery_queues", None):
            return None
        backend = self.app.backend
        return backend if backend.celery_records else None

    def _decode(self, data: bytes) -> Dict[str, Any]:
        """The record read for this task, checked (MessageError when it is
        forged, unsigned with a signing key set, or unreadable)."""
        return self.app.codec.decode_result(data, self.id, where=mask_url(self.app.backend.url))

    @property
    def state(self) -> str:
        meta = self._lookup()
        return meta["state"] if meta else PENDING

    status = state

    def ready(self) -> bool:
        return self.state in READY_STATES

    def successful(self) -> bool:
        return self.state == SUCCESS

    def failed(self) -> bool:
        return self.state == FAILURE

    @property
    def traceback(self) -> Optional[str]:
        meta = self._lookup()
        return meta.get("traceback") if meta else None

    @property
    def result(self) -> Any:
        """The value, or the exception instance for a failure; None while not ready."""
        meta = self._lookup()
        if not meta:
            return None
        return self._outcome(meta, propagate=False)

    @property
    def info(self) -> Any:
        """``result``, and for a state set by ``update_state`` its ``meta``."""
        return self.result

    @property
    def parent_id(self) -> Optional[str]:
        """The id of the task that sent this one (a chain's previous step, a
        callback's task), from the stored record; None before it is stored."""
        meta = self._lookup()
        return meta.get("parent_id") if meta else None

    @property
    def root_id(self) -> Optional[str]:
        """The id of the first task of the workflow this one belongs to."""
        meta = self._lookup()
        return (meta.get("root_id") or self.id) if meta else None

    @property
    def retries(self) -> int:
        meta = self._lookup()
        return meta.get("retries", 0) if meta else 0

    @property
    def hub_blocked(self) -> Optional[float]:
        """Seconds the task kept a green worker's hub blocked (a C call or
        CPU loop that never yields), as the worker's watchdog saw it; None
        when it never blocked past ``blocking_threshold``.  Its time limits
        could not fire meanwhile, so it may have run past them."""
        meta = self._lookup()
        return meta.get("hub_blocked") if meta else None

    # -- waiting -------------------------------------------------------------
    @overload
    def get(self, timeout: Optional[float] = None, propagate: Literal[True] = True,
            disable_sync_subtasks: bool = True) -> R: ...

    @overload
    def get(self, timeout: Optional[float] = None, *, propagate: bool,
            disable_sync_subtasks: bool = True) -> Union[R, BaseException]: ...

    @overload
    def get(self, timeout: Optional[float], propagate: bool,
            disable_sync_subtasks: bool = True) -> Union[R, BaseException]: ...

    def get(self, timeout: Optional[float] = None, propagate: bool = True,
            disable_sync_subtasks: bool = True) -> Any:
        """Wait for the outcome.  Returns the value; for a failure re-raises the
        task's exception (or returns it with ``propagate=False``).  Raises
        ``greenq.TimeoutError`` after ``timeout`` seconds.  Inside a task run
        by a worker it raises RuntimeError (SYNC_SUBTASK_RULE) unless
        ``disable_sync_subtasks=False``, as Celery does."""
        if disable_sync_subtasks:
            assert_will_not_block()
        meta = self._meta if self._meta and self._meta.get("state") in READY_STATES else None
        if meta is None:
            celery = self._celery_reader()
            if celery is not None:          # greenq's record or Celery's, whichever comes
                found = celery.wait_either(self.id, timeout)
                if found is None:
                    raise TimeoutError(self._timeout_message(timeout))
                meta = self._meta = self._decode(found[1]) if found[0] == "greenq" else found[1]
                return self._outcome(meta, propagate)
            data = self.app.backend.wait(self.id, timeout)
            if data is None:
                raise TimeoutError(self._timeout_message(timeout))
            meta = self._meta = self._decode(data)
        return self._outcome(meta, propagate)

    wait = get

    def _timeout_message(self, timeout: Optional[float]) -> str:
        """Why ``get`` gave up, with greenq.prefixes' hint (also logged) when
        the app's workers use another key_prefix than this client."""
        from .prefixes import mismatch_hint    # only on a timeout: one read of the registry
        message = f"task {self.id} not ready after {timeout} s"
        hint = mismatch_hint(self.app)
        if hint is None:
            return message
        log.warning("%s", hint)
        return f"{message}: {hint}"

    def _outcome(self, meta: Dict[str, Any], propagate: bool) -> Any:
        state = meta.get("state")
        if state == SUCCESS:
            return meta.get("result")
        if state in (FAILURE, RETRY) and meta.get("exc"):
            exc = rebuild_exception(meta["exc"], meta.get("traceback"), self.app.exception_modules())
        elif state == REVOKED:
            exc = TaskRevokedError(meta.get("reason") or f"task {self.id} was revoked")
        else:                               # PROGRESS and other states of update_state: the meta
            return meta.get("result")
        if propagate and state != RETRY:
            raise exc
        return exc

    # -- control -------------------------------------------------------------
    def forget(self) -> None:
        self._meta = None
        self.app.backend.forget(self.id)

    def revoke(self, terminate: bool = False) -> None:
        """Stop the task: not run if not started; with ``terminate``, killed if running."""
        self.app.control_revoke(self.id, terminate=terminate)

    # -- asyncio (docs/asyncio.md): the running loop's client of the app -------
    @overload
    async def aget(self, timeout: Optional[float] = None, propagate: Literal[True] = True,
                   disable_sync_subtasks: bool = True) -> R: ...

    @overload
    async def aget(self, timeout: Optional[float] = None, *, propagate: bool,
                   disable_sync_subtasks: bool = True) -> Union[R, BaseException]: ...

    @overload
    async def aget(self, timeout: Optional[float], propagate: bool,
                   disable_sync_subtasks: bool = True) -> Union[R, BaseException]: ...

    async def aget(self, timeout: Optional[float] = None, propagate: bool = True,
                   disable_sync_subtasks: bool = True) -> Any:
        """``get`` for asyncio callers: waits without blocking the event loop,
        on the notifications the app's client shares among all its waiters."""
        if disable_sync_subtasks:
            assert_will_not_block()
        meta = self._meta if self._meta and self._meta.get("state") in READY_STATES else None
        if meta is None:
            from .aio import client_for
            data = await client_for(self.app).wait(self.id, timeout)
            if data is None:
                import asyncio
                raise TimeoutError(await asyncio.to_thread(self._timeout_message, timeout))
            meta = self._meta = self._decode(data)
        return self._outcome(meta, propagate)

    async def aready(self) -> bool:
        """``ready`` for asyncio callers."""
        if self._meta is None or self._meta.get("state") not in READY_STATES:
            from .aio import client_for
            data = await client_for(self.app).get(self.id)
            if data is not None:
                self._meta = self._decode(data)
        return self._meta is not None and self._meta.get("state") in READY_STATES

    async def aforget(self) -> None:
        """``forget`` for asyncio callers."""
        from .aio import client_for
        self._meta = None
        await client_for(self.app).forget(self.id)


class EagerResult(AsyncResult[R]):
    """The finished result of a task run inline (eager mode)."""

    def __init__(self, task_id: str, app: "GreenQ", meta: Dict[str, Any],
                 task_name: Optional[str] = None) -> None:
        super().__init__(task_id, app, task_name)
        self._meta = meta

    def _lookup(self) -> Optional[Dict[str, Any]]:
        return self._meta

    @overload
    def get(self, timeout: Optional[float] = None, propagate: Literal[True] = True,
            disable_sync_subtasks: bool = True) -> R: ...

    @overload
    def get(self, timeout: Optional[float] = None, *, propagate: bool,
            disable_sync_subtasks: bool = True) -> Union[R, BaseException]: ...

    @overload
    def get(self, timeout: Optional[float], propagate: bool,
            disable_sync_subtasks: bool = True) -> Union[R, BaseException]: ...

    def get(self, timeout: Optional[float] = None, propagate: bool = True,
            disable_sync_subtasks: bool = True) -> Any:
        """The outcome, already known: never waits, so allowed inside a task."""
        return super().get(timeout, propagate, disable_sync_subtasks=False)

    wait = get

    def forget(self) -> None:
        self._meta = {"state": PENDING}

    def revoke(self, terminate: bool = False) -> None:
        pass

    async def aforget(self) -> None:
        self.forget()


def make_meta(task_id: str, state: str, *, result: Any = None, exc: Optional[BaseException] = None,
              traceback: Optional[str] = None, task: Optional[str] = None, retries: int = 0,
              reason: Optional[str] = None, parent_id: Optional[str] = None,
              root_id: Optional[str] = None, hub_blocked: Optional[float] = None) -> Dict[str, Any]:
    meta: Dict[str, Any] = {"id": task_id, "state": state, "result": result,
                            "date_done": time.time(), "retries": retries}
    if task:
        meta["task"] = task
    if exc is not None:
        meta["exc"] = exception_to_dict(exc)
    if traceback:
        meta["traceback"] = traceback
    if reason:
        meta["reason"] = reason
    if parent_id:
        meta["parent_id"] = parent_id
    if root_id and root_id != task_id:
        meta["root_id"] = root_id
    if hub_blocked:
        meta["hub_blocked"] = hub_blocked
    return meta
