"""Helpers shared by the worker and admin commands: loading the config and the app."""
from __future__ import annotations

import contextlib
import difflib
import importlib
import os
import sys
import traceback
from typing import Any, Dict, Iterator, List, Optional, Tuple

from .. import config as config_module
from ..app import GreenQ
from ..exceptions import ConfigError

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def load_app(spec: Optional[str], cfg: config_module.Config) -> GreenQ:
    """The app named by ``-A module[:attribute]``, else by the first entry of
    ``[greenq] app`` (resolved the same way), else a plain GreenQ built from
    the config.  The module is imported with the current directory on
    sys.path; its ``attribute``, else its ``app``, else its only GreenQ
    instance is used.  Settings the command line, environment or INI file set
    explicitly win over the app's own.  The other ``[greenq] app`` modules are
    imported so their tasks register."""
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    where = f"-A {spec}"
    if not spec and cfg.app:
        spec = cfg.app[0]
        where = f"{cfg.origin('greenq', 'app')}: [greenq] app = {','.join(cfg.app)}"
    if spec:
        with _config_file_for_import(cfg.file):
            app = _resolve(spec, where)
        for (section, key), origin in cfg._origin.items():
            if not section.startswith("task:"):
                app.config.set(section, key, cfg.section(section)[key], origin)
        for task, opts in cfg._tasks.items():
            for key, value in opts.items():
                app.config.set(f"task:{task}", key, value, cfg.origin(f"task:{task}", key))
        app.config.routes.update(cfg.routes)            # [routes] and [schedule:NAME]
        app.config.schedules.update(cfg.schedules)
        for (section, key), origin in cfg._resource_origin.items():   # [resource:NAME]
            app.config.set(section, key, cfg.resources[section[len("resource:"):]][key], origin)
        if cfg.file:
            app.config.file = cfg.file
        app._codec = None  # built from the settings just overlaid
        app.close()        # connections made at import time used the app's own settings
    else:
        app = GreenQ("greenq", config=cfg)
    for entry in app.config.app:
        module_name = entry.partition(":")[0]
        try:
            importlib.import_module(module_name)
        except Exception as exc:
            raise ConfigError(f"{app.config.origin('greenq', 'app')}: [greenq] app: "
                              f"cannot import {module_name}: {import_failure(exc)}") from None
    return app


def import_failure(exc: BaseException) -> str:
    """What went wrong importing an app, with the file and line that failed:
    the error of a module the app imports (a missing dependency, a
    SyntaxError in a helper) must not read as if the app itself were missing."""
    if isinstance(exc, SyntaxError) and exc.filename:
        return f"{type(exc).__name__}: {exc.msg} ({exc.filename}, line {exc.lineno})"
    what = f"{type(exc).__name__}: {exc}"
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith("<frozen")]
    if frames and frames[-1].filename != __file__:
        return f"{what} (in {frames[-1].filename}, line {frames[-1].lineno})"
    return what


@contextlib.contextmanager
def _config_file_for_import(path: Optional[str]) -> Iterator[None]:
    """While the app's module is imported, $GREENQ_CONFIG names the file this
    command loaded (``--config``): a ``GreenQ(...)`` built at import reads the
    same file as the command, not a ./greenq.ini beside it."""
    if not path:
        yield
        return
    before = os.environ.get("GREENQ_CONFIG")
    os.environ["GREENQ_CONFIG"] = path
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("GREENQ_CONFIG", None)
        else:
            os.environ["GREENQ_CONFIG"] = before


def _resolve(spec: str, where: str) -> GreenQ:
    """Import ``module[:attribute]`` and return its GreenQ app; ConfigError naming ``where``."""
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:   # any error while importing it: exit 2 naming the file and line
        raise ConfigError(f"{where}: cannot import {module_name}: {import_failure(exc)}") from None
    if attr:
        app = getattr(module, attr, None)
        if not isinstance(app, GreenQ):
            raise ConfigError(f"{where}: {module_name}.{attr} is not a GreenQ app")
        return app
    app = getattr(module, "app", None)
    if isinstance(app, GreenQ):
        return app
    found = [v for v in vars(module).values() if isinstance(v, GreenQ)]
    if len(found) != 1:
        raise ConfigError(f"{where}: {module_name} has no 'app' and {len(found)} GreenQ "
                          f"instances; name one as {module_name}:NAME")
    return found[0]


def check_app(app: GreenQ) -> List[str]:
    """Start-up checks that need the registered tasks: a soft time limit above
    the hard one is a ConfigError; a ``[task:NAME]`` section naming no
    registered task is returned as a warning, with the nearest task name."""
    for task in app.tasks.values():
        config_module.check_limits(f"task {task.name}:", task.option("soft_time_limit"),
                                   task.option("time_limit"))
    from ..resources.registry import check_tasks
    check_tasks(app.tasks.values(), app.config.resource_settings())
    warnings = []
    for name in app.config._tasks:
        if name not in app.tasks:
            origin = app.config.origin(f"task:{name}", next(iter(app.config.task_options(name))))
            close = difflib.get_close_matches(name, list(app.tasks), n=1, cutoff=0.5)
            hint = f"; did you mean [task:{close[0]}]?" if close else \
                f"; registered tasks: {', '.join(sorted(app.tasks)) or 'none'}"
            warnings.append(f"{origin}: [task:{name}] names no task registered in this worker, "
                            f"so its settings apply to nothing here{hint}")
    from ..beat import unknown_tasks
    return warnings + unknown_tasks(app)


def overrides_from(pairs: Dict[Tuple[str, str], Any]) -> Dict[Tuple[str, str], Any]:
    return {k: v for k, v in pairs.items() if v is not None}
