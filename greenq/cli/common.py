"""Helpers shared by the worker and admin commands: loading the config and the app."""
from __future__ import annotations

import importlib
import os
import sys
from typing import Any, Dict, Optional, Tuple

from .. import config as config_module
from ..app import GreenQ
from ..exceptions import ConfigError

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def load_app(spec: Optional[str], cfg: config_module.Config) -> GreenQ:
    """``-A module[:attribute]`` (current directory on sys.path): its ``app``,
    or its only GreenQ instance.  Without -A, ``[greenq] app`` modules are
    imported and a plain GreenQ built from the config is used.  Settings the
    command line, environment or INI file set explicitly win over the app's own."""
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    app: Optional[GreenQ] = None
    if spec:
        module_name, _, attr = spec.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ConfigError(f"-A {spec}: cannot import {module_name}: {exc}") from None
        if attr:
            app = getattr(module, attr, None)
            if not isinstance(app, GreenQ):
                raise ConfigError(f"-A {spec}: {module_name}.{attr} is not a GreenQ app")
        else:
            app = getattr(module, "app", None)
            if not isinstance(app, GreenQ):
                found = [v for v in vars(module).values() if isinstance(v, GreenQ)]
                if len(found) != 1:
                    raise ConfigError(f"-A {spec}: {module_name} has no 'app' and "
                                      f"{len(found)} GreenQ instances; use -A {module_name}:NAME")
                app = found[0]
        for (section, key), origin in cfg._origin.items():
            if not section.startswith("task:"):
                app.config.set(section, key, cfg.section(section)[key], origin)
        for task, opts in cfg._tasks.items():
            for key, value in opts.items():
                app.config.set(f"task:{task}", key, value, cfg.origin(f"task:{task}", key))
        app.config.routes.update(cfg.routes)            # [routes] and [schedule:NAME]
        app.config.schedules.update(cfg.schedules)
        if cfg.file:
            app.config.file = cfg.file
    else:
        app = GreenQ("greenq", config=cfg)
    for module_name in app.config.app:
        try:
            importlib.import_module(module_name)
        except ImportError as exc:
            raise ConfigError(f"{app.config.origin('greenq', 'app')}: [greenq] app: "
                              f"cannot import {module_name}: {exc}") from None
    return app


def overrides_from(pairs: Dict[Tuple[str, str], Any]) -> Dict[Tuple[str, str], Any]:
    return {k: v for k, v in pairs.items() if v is not None}
