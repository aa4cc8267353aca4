"""Hooks: named events with subscribers, registered on the app (no global
signal objects).  ../shared/CONTRACT.md section 8 names the public ones:

=====================  =======================================  ======================
hook                   arguments                                runs in
=====================  =======================================  ======================
worker_process_init    (worker)                                 each worker process, after
                                                                patching, before consuming
worker_shutdown        (worker)                                 the worker's main greenlet
task_prerun            (task, request)                          the task's greenlet
task_postrun           (task, request, state, retval)           the task's greenlet
task_success           (task, request, retval)                  the task's greenlet
task_failure           (task, request, exc, traceback)          the task's greenlet
task_retry             (task, request, reason)                  the task's greenlet
=====================  =======================================  ======================

An exception in a hook is logged with the task id (the task's request is set
while task hooks run) and changes nothing else, except in
``worker_process_init``, where it stops that worker with exit code 1 before it
takes any message.

The worker's own features subscribe to the same hooks on the worker's
:class:`Hooks`, which also carries a few worker-only events
(``INTERNAL_HOOKS``): the counters always, the optional ones (rate limits,
STARTED records, per-task metrics, the task events of the fleet view) only
when they are on.  A hook nobody subscribed to costs the worker nothing, as
its hot paths test :meth:`Hooks.live` before emitting.  Subscribers run in registration order: the worker's own first,
then the app's.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, TypeVar, Union, overload

log = logging.getLogger("greenq.hooks")

PUBLIC_HOOKS = ("worker_process_init", "worker_shutdown", "task_prerun", "task_postrun",
                "task_success", "task_failure", "task_retry")
#: worker-only events: (count) messages fetched; (job) accepted to run; (job) revoked or expired;
#: (job, reason) dead-lettered
INTERNAL_HOOKS = ("messages_received", "task_received", "task_revoked", "message_dead_lettered")

Subscriber = Callable[..., Any]
#: a subscriber, given back as it is by ``@on(name)`` (its own type kept)
S = TypeVar("S", bound=Subscriber)


class Hooks:
    """Subscribers by hook name.  ``emit`` is cheap when a hook has none."""

    def __init__(self, names: Iterable[str] = PUBLIC_HOOKS) -> None:
        self._subscribers: Dict[str, List[Subscriber]] = {name: [] for name in names}

    @overload
    def on(self, name: str, fn: S) -> S: ...

    @overload
    def on(self, name: str, fn: None = None) -> Callable[[S], S]: ...

    def on(self, name: str, fn: Optional[S] = None) -> Union[S, Callable[[S], S]]:
        """Subscribe ``fn`` to ``name``; as ``@hooks.on(name)``, a decorator."""
        if name not in self._subscribers:
            import difflib
            near = difflib.get_close_matches(name, list(self._subscribers), n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise ValueError(f"unknown hook {name!r}{hint} (hooks: {', '.join(self._subscribers)})")
        if fn is None:
            return lambda func: self.on(name, func)
        if not callable(fn):
            raise TypeError(f"hook {name}: {fn!r} is not callable")
        self._subscribers[name].append(fn)
        return fn

    def has(self, name: str) -> bool:
        return bool(self._subscribers[name])

    def live(self, name: str) -> Sequence[Subscriber]:
        """The subscribers of ``name``, kept up to date (the list is never
        replaced): a hot path holds it and emits only when it is not empty."""
        return self._subscribers[name]

    def subscribers(self, name: str) -> List[Subscriber]:
        return list(self._subscribers[name])

    def extend(self, other: "Hooks") -> None:
        """Append every subscriber of ``other`` (the app's) after ours."""
        for name, subs in other._subscribers.items():
            self._subscribers.setdefault(name, []).extend(subs)

    def emit(self, name: str, *args: Any) -> None:
        """Call every subscriber; a failing one is logged and the rest run."""
        subs = self._subscribers[name]
        if not subs:
            return
        for fn in subs:
            try:
                fn(*args)
            except Exception:
                log.exception("hook %s (%s) failed; the task goes on unchanged", name, _name(fn))

    def emit_strict(self, name: str, *args: Any) -> None:
        """Call every subscriber; the first failure propagates (worker_process_init)."""
        for fn in self._subscribers[name]:
            fn(*args)


def _name(fn: Subscriber) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"
