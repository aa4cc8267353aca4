"""GreenQ: the application object -- settings, task registry, sending."""
from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from typing import (TYPE_CHECKING, Any, Callable, ContextManager, Dict, Iterable, List, Optional, Sequence,
                    Tuple, Union, overload)

from . import config as config_module
from .brokers import make_broker
from .drivers import detect_patched
from .exceptions import ConfigError
from .hooks import Hooks, S
from .backends import backend_url_for, make_backend
from .building import MessageBuilder, Target
from .message import Codec, TaskMessage, check_trust
from .result import ALWAYS_REBUILT, AsyncResult, EagerResult
from .result import AsyncResult as _AsyncResult   # for annotations in GreenQ, where AsyncResult is a method
from .canvas import GroupResult, Signature, run_eager, signature
from .task import Task, current_request, make_task

if TYPE_CHECKING:  # pragma: no cover
    from typing import Literal

    from typing_extensions import Concatenate, ParamSpec, TypeVar

    from .backends.base import ResultBackend
    from .brokers.base import Broker
    from .drivers.base import Driver
    from .resources.connections import ResourcePool
    from .resources.registry import Resources

    _P = ParamSpec("_P")       # a task function's parameters (app.task)
    _R = TypeVar("_R")         # and its return type

log = logging.getLogger("greenq")


#: raised in a forked child (``os.register_at_fork``): connections made under
#: another value are the parent's and are never used (cheaper than comparing
#: ``os.getpid()`` on every send)
_FORKS = [0]


def _forked() -> None:
    _FORKS[0] += 1


os.register_at_fork(after_in_child=_forked)


@dataclass
class _Connections:
    """One process's broker and (made on first use) result backend."""
    forks: int                 # the fork generation they were made in: never used across a fork
    broker: "Broker"
    backend: Optional["ResultBackend"] = None


class _AppTarget(Target):
    """The app's broker and result backend, as a message builder sees them:
    the broker's name limits, the backend's reply address.  Both are made on
    first use; neither connects to build a message (``rpc://`` opens this
    process's reply queue on the first call that wants a result, as before)."""

    def __init__(self, app: "GreenQ") -> None:
        self.app = app

    def limits(self) -> Tuple[int, int]:
        broker = self.app.broker
        return broker.max_queue_name_bytes, broker.max_message_id_bytes

    def reply_to(self) -> Optional[str]:
        return self.app.backend.reply_to()


class GreenQ:
    """A greenq application.

    ``GreenQ("shop", broker="redis://...")`` or ``GreenQ.from_config("greenq.ini")``.
    Both read the layers a worker reads (docs/configuration.md): the INI file
    (``config_file``, else $GREENQ_CONFIG, else ./greenq.ini, else
    /etc/greenq/greenq.ini), then the environment; keyword arguments are
    ``[greenq]`` settings and win over both.  ``config_file=False`` reads no
    file (defaults, environment and arguments only).  Connections are made
    lazily, one set per process.
    """

    def __init__(self, name: str = "greenq", broker: Optional[str] = None,
                 backend: Optional[str] = None, *, config: Optional[config_module.Config] = None,
                 config_file: Union[str, bool, None] = None, eager: Optional[bool] = None,
                 **settings: Any) -> None:
        self.name = name
        overrides = {("greenq", k): v for k, v in settings.items()}
        overrides[("greenq", "broker_url")] = broker
        overrides[("greenq", "result_backend")] = backend
        overrides[("greenq", "eager")] = eager
        if config_file is True:
            raise TypeError("config_file: a path, None (search the usual places) or False (no file)")
        if config is None:
            config = config_module.load(config_file or None, overrides=overrides,
                                        search=config_file is not False)
        else:
            config = config.copy()
            for (section, key), value in overrides.items():
                if value is not None:
                    config.set(section, key, value, origin=f"GreenQ({key}=...)")
        pickle_origin = config.origin("greenq", "accept_content" if "pickle" in config.accept_content
                                      else "serializer")
        check_trust(config.serializer, config.accept_content, config.signing_key, pickle_origin)
        self.config = config
        self.tasks: Dict[str, Task] = {}
        self.periodic: Dict[str, Any] = {}     # name -> greenq.beat.Entry (add_periodic)
        self.hooks = Hooks()
        self.driver: Optional[Driver] = None  # set by the worker; None = plain blocking client
        self._lock = threading.Lock()
        self._conn: Optional[_Connections] = None
        self._codec: Optional[Codec] = None
        self._builder: Optional[MessageBuilder] = None
        self._resources: Optional["Resources"] = None
        self._resource_pools: Dict[str, "ResourcePool[Any]"] = {}

    @classmethod
    def from_config(cls, path: Optional[str] = None, name: Optional[str] = None, **settings: Any) -> "GreenQ":
        """Build from the INI file (``path``, else $GREENQ_CONFIG, ./greenq.ini,
        /etc/greenq/greenq.ini), the environment and ``settings``."""
        overrides = {("greenq", k): v for k, v in settings.items()}
        cfg = config_module.load(path, overrides=overrides)
        return cls(name or "greenq", config=cfg)

    def __repr__(self) -> str:
        return f"<GreenQ {self.name} broker={config_module.mask_url(self.config.broker_url)}>"

    # -- tasks ---------------------------------------------------------------
    @overload
    def on(self, name: str, fn: "S") -> "S": ...

    @overload
    def on(self, name: str, fn: None = None) -> "Callable[[S], S]": ...

    def on(self, name: str, fn: "Optional[S]" = None) -> "Union[S, Callable[[S], S]]":
        """Subscribe to a hook (``@app.on("task_failure")``); greenq/hooks.py
        lists the hooks, their arguments and where they run."""
        return self.hooks.on(name, fn)

    # The task keeps the function's parameters and return type (Task[P, R]);
    # with bind=True the first parameter (the task itself) is not one of P.
    @overload
    def task(self, fn: Callable[_P, _R], *, name: Optional[str] = None, bind: Literal[False] = False,
             **options: Any) -> Task[_P, _R]: ...

    @overload
    def task(self, fn: Callable[Concatenate[Any, _P], _R], *, name: Optional[str] = None,
             bind: Literal[True], **options: Any) -> Task[_P, _R]: ...

    @overload
    def task(self, fn: None = None, *, name: Optional[str] = None, bind: Literal[False] = False,
             **options: Any) -> Callable[[Callable[_P, _R]], Task[_P, _R]]: ...

    @overload
    def task(self, fn: None = None, *, name: Optional[str] = None, bind: Literal[True],
             **options: Any) -> Callable[[Callable[Concatenate[Any, _P], _R]], Task[_P, _R]]: ...

    @overload
    def task(self, fn: Callable[..., Any], *, name: Optional[str] = None, bind: bool,
             **options: Any) -> Task: ...

    @overload
    def task(self, fn: None = None, *, name: Optional[str] = None, bind: bool,
             **options: Any) -> Callable[[Callable[..., Any]], Task]: ...

    def task(self, fn: Optional[Callable[..., Any]] = None, *, name: Optional[str] = None,
             bind: bool = False, **options: Any) -> Union[Task, Callable[[Callable[..., Any]], Task]]:
        """Register a task: ``@app.task`` or ``@app.task(name=..., queue=..., ...)``."""
        def register(func: Callable[..., Any]) -> Task:
            task = make_task(self, func, name, bind, options)
            self.tasks[task.name] = task
            return task
        if fn is not None:
            return register(fn)
        return register

    def add_periodic(self, name: str, task: Any, every: Optional[float] = None, cron: Optional[str] = None,
                     timezone: str = "UTC", args: Sequence[Any] = (), kwargs: Optional[Dict[str, Any]] = None,
                     **options: Any) -> None:
        """A periodic task (CONTRACT section 7): ``task`` (a name or a task)
        every ``every`` seconds or at the five-field ``cron`` times in
        ``timezone``; ``options`` are apply_async options (queue, priority,
        expires, time limits).  Run by ``greenq beat`` or ``greenq-worker --beat``."""
        from .beat import Entry
        task_name = task if isinstance(task, str) else task.name
        self.periodic[name] = Entry(name, task_name, every, cron, timezone, tuple(args), dict(kwargs or {}),
                                    options)

    # -- resource permits (greenq/resources/, docs/resources.md) -------------
    def resource(self, name: str, count: int = 1, timeout: Optional[float] = None) -> ContextManager[None]:
        """``with app.resource("pg"):`` holds ``count`` permits of ``[resource:pg]``
        for the block, waiting cooperatively until they are free (TimeoutError
        after ``timeout`` seconds, if given).  In a worker the permits come from
        the worker's pools, shared with the tasks' ``resources``; elsewhere from
        pools made from this app's configuration."""
        return self.permits().hold(name, count, timeout)

    def permits(self) -> "Resources":
        """This process's permit pools (the worker sets its own with ``set_permits``)."""
        if self._resources is None:
            with self._lock:
                if self._resources is None:
                    from .resources.registry import Resources
                    resources = Resources(self.config, app_key=self.config.key_prefix, driver=self.driver)
                    for pool in self._resource_pools.values():
                        pool.bind(resources)
                    self._resources = resources
        return self._resources

    def set_permits(self, resources: Optional["Resources"]) -> None:
        """Used by the worker: ``app.resource`` takes its permits from ``resources``."""
        for pool in self._resource_pools.values():
            if resources is None:
                pool.unbind()
            else:
                pool.bind(resources)
        self._resources = resources

    def resource_pool(self, name: str, open: Callable[[], Any], close: Optional[Callable[[Any], None]] = None,
                      *, idle_seconds: Optional[float] = None,
                      max_age: Optional[float] = None) -> "ResourcePool[Any]":
        """Connections to resource ``name`` that keep their permit while open
        (greenq/resources/connections.py; docs/resources.md, recipe "A
        database pool sized from its permit"): ``with pool.connection() as
        conn:`` in a task holding a permit of ``name``; connections open in
        the fleet never exceed the resource's limit."""
        from .resources import connections
        if name in self._resource_pools:
            raise ValueError(f"resource_pool {name!r} exists already: share the one app.resource_pool returned")
        pool: "ResourcePool[Any]" = connections.ResourcePool(
            name, open, close,
            idle_seconds=connections.IDLE_SECONDS if idle_seconds is None else idle_seconds,
            max_age=connections.MAX_AGE if max_age is None else max_age)
        settings = self.config.resource_settings()
        if name not in settings:               # a resource with no section: ConfigError now
            from .resources.registry import unknown
            raise unknown(name, settings)
        self._resource_pools[name] = pool
        if self._resources is not None:
            pool.bind(self._resources)
        return pool

    # -- connections (one set per process) -----------------------------------
    def set_driver(self, driver: Any) -> None:
        """Used by the worker: route blocking calls through ``driver``."""
        self.close()
        self.driver = driver

    def _connections(self) -> "_Connections":
        conn = self._conn
        if conn is None or conn.forks != _FORKS[0]:
            with self._lock:
                conn = self._conn
                forks = _FORKS[0]
                if conn is None or conn.forks != forks:  # new, or inherited across a fork: never reuse
                    if self.driver is None:
                        self.driver = detect_patched()
                    broker = make_broker(self.config.broker_url, self.config, self.driver)
                    if self.config.tracing and not self.config.eager:   # greenq/tracing.py:
                        from .tracing import watch      # producer spans end once the broker has the message
                        watch(broker)
                    conn = self._conn = _Connections(forks, broker)
        return conn

    @property
    def broker(self) -> Broker:
        return self._connections().broker

    @property
    def backend(self) -> ResultBackend:
        conn = self._connections()
        if conn.backend is None:
            with self._lock:
                if conn.backend is None:
                    backend = make_backend(backend_url_for(self.config), self.config, self.driver)
                    backend.attach_broker(conn.broker)   # rpc://: a worker replies on its consumer channel
                    conn.backend = backend
        return conn.backend

    @property
    def codec(self) -> Codec:
        if self._codec is None:
            c = self.config
            codec = Codec(c.serializer, c.accept_content, c.signing_key, c.max_message_size, c.celery_queues)
            if c.task_send_sent_event and not c.eager:
                from .control.sent import SentPublisher
                codec.sent_sink = SentPublisher(self)
            if c.tracing and not c.eager:        # greenq/tracing.py; ConfigError without OpenTelemetry
                from .tracing import Producer
                codec.tracer = Producer()
            self._codec = codec
        return self._codec

    def close(self) -> None:
        """Close this process's connections (they are remade on next use)."""
        with self._lock:
            conn, self._conn = self._conn, None
        if conn and conn.forks == _FORKS[0]:
            for part in (conn.broker, conn.backend):
                if part is not None:
                    part.close()

    # -- sending -------------------------------------------------------------
    def AsyncResult(self, task_id: str, task_name: Optional[str] = None) -> AsyncResult:  # noqa: N802
        return AsyncResult(task_id, self, task_name)

    def GroupResult(self, group_id: str) -> GroupResult:  # noqa: N802
        """A group's results found again by its id; LookupError when the
        backend has no record of it (expired, or ``rpc://``, which keeps none)."""
        found = GroupResult.restore(self, group_id)
        if found is None:
            raise LookupError(f"no group {group_id} in the result backend")
        return found

    def signature(self, name: Any, args: Sequence[Any] = (), kwargs: Optional[Dict[str, Any]] = None,
                  immutable: bool = False, **options: Any) -> Signature:
        """A signature by task name (the task's code need not be importable here)."""
        return signature(self, name, args, kwargs, immutable, **options)

    def route(self, name: str) -> Optional[str]:
        """The queue ``[routes]`` gives task ``name``: the first glob that
        matches, in the order written; None when none does."""
        return self.builder.route(name)

    @property
    def builder(self) -> MessageBuilder:
        """This app's MessageBuilder (greenq/building.py): its settings, its
        tasks, the running task as context, and its broker's name limits and
        result backend's reply address as target (read when a message needs
        them; building never connects).  Made again when ``config`` or
        ``tasks`` is replaced."""
        builder = self._builder
        if builder is None or builder.config is not self.config or builder.tasks is not self.tasks:
            builder = self._builder = MessageBuilder(self.config, self.tasks, _AppTarget(self), current_request)
        return builder

    def build_message(self, name: str, args: Sequence[Any] = (), kwargs: Optional[Dict[str, Any]] = None,
                      **options: Any) -> TaskMessage:
        """The message ``send_task`` would publish for this call, without
        sending it (every option checked the same way; ``link`` and
        ``link_error`` included).  Not for eager mode, which sends nothing."""
        return self._message(name, args, kwargs, options)

    def _message(self, name: str, args: Sequence[Any], kwargs: Optional[Dict[str, Any]],
                 options: Dict[str, Any]) -> TaskMessage:
        if "link" in options or "link_error" in options:
            return self.builder.build_record(self._linked(name, args, kwargs, options))
        return self.builder.build(name, args, kwargs, options)

    def _linked(self, name: str, args: Sequence[Any], kwargs: Optional[Dict[str, Any]],
                options: Dict[str, Any]) -> Dict[str, Any]:
        """A call with ``link``/``link_error`` as a signature record (greenq.canvas), its id fixed."""
        record = Signature(name, args, kwargs, app=self).to_dict()
        return Signature.from_dict(record, self)._freeze(self, options)[0]

    def send_task(self, name: str, args: Sequence[Any] = (), kwargs: Optional[Dict[str, Any]] = None,
                  **options: Any) -> _AsyncResult:
        """Send a task by name (its code need not be importable here); takes
        every ``apply_async`` option.  One broker round trip."""
        if self.config.section("greenq")["eager"]:     # config.eager, without its __getattr__
            if "link" in options or "link_error" in options:
                return run_eager(self, self._linked(name, args, kwargs, options))
            return self.apply_eager(name, args, kwargs, options.get("task_id"))
        msg = self._message(name, args, kwargs, options)
        self.broker.publish(self.codec.outgoing(msg))
        return AsyncResult(msg.id, self, name)

    def enqueue_many(self, signatures: Iterable[Signature]) -> List[_AsyncResult]:
        """Publish many calls at once, pipelined; one AsyncResult each, in order."""
        sigs = list(signatures)
        if self.config.eager:
            return [self.apply_eager(s.task, s.args, s.kwargs, s.options.get("task_id")) for s in sigs]
        # one batch for the builder (greenq/building.py, build_many): a call with
        # link/link_error goes as its signature record, as send_task sends it
        messages = self.builder.build_many([
            s.to_dict() if (o := s.options) and (o.get("link") or o.get("link_error"))
            else (s.task, s.args, s.kwargs, o) for s in sigs])
        if messages:
            self.broker.publish_many(self.codec.outgoing_many(messages))
        return [AsyncResult(m.id, self, m.task) for m in messages]

    def apply_eager(self, name: str, args: Sequence[Any] = (), kwargs: Optional[Dict[str, Any]] = None,
                    task_id: Optional[str] = None) -> EagerResult:
        """Run registered task ``name`` here and now, retries included, as
        eager mode does instead of sending (KeyError when it is not registered
        in this process)."""
        task = self.tasks.get(name)
        if task is None:
            raise KeyError(f"eager mode: task {name!r} is not registered in this process")
        return task.apply(args, kwargs, task_id=task_id)

    def control_revoke(self, task_id: Union[str, Sequence[str]], terminate: bool = False) -> None:
        """Revoke ``task_id`` (or each of a list of ids): recorded in the
        result backend (kept for ``result_expires``; a worker started later
        loads it), then broadcast to the running workers over the control
        plane, ``validation.MAX_REVOKE_IDS`` ids per command.  A failed
        broadcast is logged, not raised: the workers re-read the backend
        (within 30 s, or 1 s while their control plane is away)."""
        ids = [task_id] if isinstance(task_id, str) else list(task_id)
        for one in ids:
            self.backend.revoke(one, terminate)
        from .control.client import Control
        try:
            control = Control(self)
        except ConfigError:                 # a broker without a control plane: the workers poll
            return
        try:
            control.revoke(ids, bool(terminate))
        except Exception as exc:
            log.warning("revoke %s: recorded, but not broadcast to the workers (%s); they read it from "
                        "the result backend within 30 s", ", ".join(ids[:3]) + (" ..." if len(ids) > 3 else ""),
                        exc)
        finally:
            control.close()

    # -- asyncio (greenq/aio/, docs/asyncio.md) --------------------------------
    async def asend_task(self, name: str, args: Sequence[Any] = (), kwargs: Optional[Dict[str, Any]] = None,
                         **options: Any) -> _AsyncResult:
        """``send_task`` for asyncio callers: the same message (built and
        encoded as ``send_task`` does), published without blocking the event
        loop, through the running loop's client of this app
        (``greenq.aio.client_for``).  Eager mode runs the task here, as
        ``send_task`` does."""
        if self.config.eager:
            return self.send_task(name, args, kwargs, **options)
        from .aio import client_for
        return await client_for(self).send(name, args, kwargs, options)

    # -- configuration -------------------------------------------------------
    def exception_modules(self) -> "set[str]":
        """Modules whose exceptions a result may be rebuilt as: builtins,
        greenq's own, the modules of registered tasks and ``[greenq]
        exception_modules``."""
        modules = set(ALWAYS_REBUILT) | set(self.config.exception_modules)
        modules.update(t.__module__ for t in list(self.tasks.values()) if t.__module__)
        return modules

    def import_modules(self) -> None:
        """Import the ``[greenq] app`` modules so their tasks register."""
        import importlib
        for module in self.config.app:
            importlib.import_module(module)
