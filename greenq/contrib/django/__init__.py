"""greenq with Django (docs/frameworks.md).

``create_app()`` builds a GreenQ from the Django settings named ``GREENQ_*``
(mapped as the environment's names are: ``GREENQ_BROKER_URL``,
``GREENQ_WORKER_CONCURRENCY``; greenq/contrib/_settings.py), closes stale
database connections around every task a worker runs (``close_old_connections``
on ``task_prerun`` and ``task_postrun``, as Django does around a request) and
registers greenq's system checks, which a worker of the app also runs before
taking a message.  ``delay_on_commit`` / ``apply_async_on_commit`` send a
task once the current transaction commits (never on a rollback; at once
outside a transaction).  ``INSTALLED_APPS += ["greenq.contrib.django"]``
makes ``manage.py check`` run the checks without importing the app.

System checks (tag ``greenq``):

* ``greenq.E001``: a ``GREENQ_*`` Django setting greenq does not know (a
  misspelling would be ignored), with the nearest valid name;
* ``greenq.E002``: a setting greenq refuses (its value, the INI file's);
* ``greenq.W001``: no broker URL set anywhere (Django setting, INI file,
  environment): the web process and a worker started in another directory
  would each use their own ``./greenq.sqlite3``.  A worker refuses to start
  on any of the three that ``SILENCED_SYSTEM_CHECKS`` does not list.
"""
from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Union

from ...app import GreenQ
from ...exceptions import ConfigError
from ...result import PENDING, AsyncResult, EagerResult
from .. import _settings

if TYPE_CHECKING:  # pragma: no cover
    from typing_extensions import ParamSpec, TypeVar

    from ...config import Config
    from ...task import Task

    _P = ParamSpec("_P")
    _R = TypeVar("_R")

CHECK_TAG = "greenq"
KIND = "Django setting"
#: apps made by create_app in this process: the checks look at their configuration
_APPS: List[GreenQ] = []


def setup(settings_module: Optional[str] = None) -> None:
    """``DJANGO_SETTINGS_MODULE`` (if not set already) and ``django.setup()``,
    unless Django is set up, or setting up (a module imported by an app's
    ``ready()``)."""
    if settings_module:
        os.environ.setdefault("DJANGO_SETTINGS_MODULE", settings_module)
    from django.apps import apps
    if not apps.ready and not apps.loading:
        import django
        django.setup()


def greenq_settings(settings: Any = None) -> Dict[str, Any]:
    """The Django settings named ``GREENQ_*``, by name."""
    if settings is None:
        from django.conf import settings as django_settings
        settings = django_settings
    return {name: getattr(settings, name) for name in dir(settings) if name.startswith(_settings.PREFIX)}


def load_config(settings: Any = None, *, config_file: Union[str, bool, None] = None,
                quiet: bool = False) -> "Config":
    """The configuration: defaults < ``GREENQ_*`` Django settings < the INI file
    (``config_file``, else the setting ``GREENQ_CONFIG``, else
    $GREENQ_CONFIG, ./greenq.ini, /etc/greenq/greenq.ini; False: none) < the
    environment, as a worker of the app layers them."""
    return _settings.load(greenq_settings(settings), KIND, config_file=config_file, quiet=quiet)


def create_app(name: str = "greenq", *, settings_module: Optional[str] = None,
               config_file: Union[str, bool, None] = None, hygiene: bool = True, **settings: Any) -> GreenQ:
    """A GreenQ configured by the Django settings (``load_config``);
    ``settings`` are ``[greenq]`` settings that win over every layer, as
    ``GreenQ(**settings)``'s do.  Sets Django up first when it is not
    (``settings_module``: the ``DJANGO_SETTINGS_MODULE`` to use if none is
    set).  ``hygiene``: close stale database connections before and after
    each task.  A worker of the app runs the greenq system checks first."""
    setup(settings_module)
    app = GreenQ(name, config=load_config(config_file=config_file), **settings)
    if hygiene:
        app.on("task_prerun", close_old_connections)
        app.on("task_postrun", close_old_connections)
    app.on("worker_process_init", functools.partial(_refuse_unconfigured, app))
    _APPS.append(app)
    register_checks()
    return app


def close_old_connections(*args: Any) -> None:
    """Close the database connections of this thread (greenlet) that are past
    ``CONN_MAX_AGE`` or broken; a hook of ``task_prerun`` and ``task_postrun``."""
    from django.db import close_old_connections as close
    close()


# -- sending after the transaction commits ------------------------------------
def delay_on_commit(task: "Task[_P, _R]", *args: "_P.args", **kwargs: "_P.kwargs") -> "AsyncResult[_R]":
    """``task.delay(*args, **kwargs)`` once the current transaction of the
    default database commits (at once outside a transaction; never on a
    rollback).  The result's id is fixed now, so it can be stored in the same
    transaction; a task rolled back is never sent, and its result never comes."""
    return apply_async_on_commit(task, args, kwargs)


def apply_async_on_commit(task: "Task[_P, _R]", args: Sequence[Any] = (),
                          kwargs: Optional[Dict[str, Any]] = None, *, using: Optional[str] = None,
                          **options: Any) -> "AsyncResult[_R]":
    """``task.apply_async(args, kwargs, **options)`` once the current
    transaction of database ``using`` (default: the default one) commits;
    as ``delay_on_commit``.  An error sending it is raised where the
    transaction commits, as Django does for every ``on_commit`` callback.
    In eager mode the task runs at the commit, and the result returned
    holds its outcome from then on (PENDING before)."""
    from django.db import transaction
    from ...message import new_id
    task_id = options["task_id"] = options.get("task_id") or new_id()
    if not task.app.config.eager:
        transaction.on_commit(functools.partial(task.apply_async, args, kwargs, **options), using=using)
        return AsyncResult(task_id, task.app, task.name)
    # eager mode (users' tests) stores no result: the outcome is handed over at the commit
    pending: EagerResult[_R] = EagerResult(task_id, task.app, {"state": PENDING}, task.name)

    def run() -> None:
        pending._meta = task.apply_async(args, kwargs, **options)._meta
    transaction.on_commit(run, using=using)
    return pending


# -- system checks --------------------------------------------------------------
def register_checks() -> None:
    """Register ``check`` with Django's system checks (tag ``greenq``); once."""
    from django.core import checks
    if not checks.registry.registry.tag_exists(CHECK_TAG):
        checks.register(check, CHECK_TAG)


def check(app_configs: Any = None, **kwargs: Any) -> List[Any]:
    """Django's system check: the ``GREENQ_*`` settings, and the configuration
    of each app made by create_app (of the settings alone when none was)."""
    configs: List[Optional["Config"]] = [app.config for app in _APPS] or [None]
    return messages(configs)


def messages(configs: Sequence[Optional["Config"]]) -> List[Any]:
    """The check's messages for these configurations (None: the one the
    Django settings give)."""
    from django.core.checks import Error, Warning
    found: List[Any] = []
    for name, near in _settings.unknown(list(greenq_settings())):
        found.append(Error(f"{KIND} {name} is not a greenq setting and would be ignored",
                           hint=f"did you mean {near}?" if near else "docs/configuration.md lists the settings",
                           id="greenq.E001"))
    for cfg in configs:
        if cfg is None:
            try:
                cfg = load_config(quiet=True)
            except ConfigError as exc:
                found.append(Error(str(exc), id="greenq.E002"))
                continue
        if cfg.origin("greenq", "broker_url") == "default":
            found.append(Warning(
                f"no greenq broker URL is set: the default, {cfg.broker_url}, is a file in the current "
                f"directory, which a worker started elsewhere does not share",
                hint="set GREENQ_BROKER_URL in the Django settings, the environment or greenq.ini "
                     "(sqlite:///greenq.sqlite3 written out keeps the default on purpose)",
                id="greenq.W001"))
    return found


def _refuse_unconfigured(app: GreenQ, worker: Any) -> None:
    """``worker_process_init``: the worker stops before taking a message on
    any greenq check message not in ``SILENCED_SYSTEM_CHECKS`` (docs/frameworks.md)."""
    from django.conf import settings
    silenced = set(getattr(settings, "SILENCED_SYSTEM_CHECKS", ()))
    found = [m for m in messages([app.config]) if m.id not in silenced]
    if found:
        raise ConfigError("; ".join(f"{m.id}: {m.msg}" + (f" ({m.hint})" if m.hint else "") for m in found))
