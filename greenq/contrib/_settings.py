"""A framework's own settings as greenq settings: ``GREENQ_*`` names, mapped
as the environment's are (greenq/config.py, ``env_name``): ``GREENQ_BROKER_URL``
is ``[greenq] broker_url``, ``GREENQ_WORKER_CONCURRENCY`` is ``[worker]
concurrency``.  They are the app's own settings: the INI file and the
environment are read over them, in the client as in a worker (whose
command-line flags, INI file and environment win over the app's settings
too), so both processes agree."""
from __future__ import annotations

import difflib
import os
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

from .. import config as config_module

PREFIX = "GREENQ_"
#: ``GREENQ_*`` framework settings that are not greenq settings: the INI file's path
NON_SETTINGS = ("GREENQ_CONFIG",)


def setting_names() -> Dict[str, Tuple[str, str]]:
    """Every setting's ``GREENQ_*`` name -> (section, key)."""
    return {config_module.env_name(section, key): (section, key)
            for section, keys in config_module.SETTINGS.items() for key in keys}


def unknown(names: List[str]) -> List[Tuple[str, str]]:
    """The names that are no greenq setting, each with the nearest valid name ('' if none is near)."""
    valid = setting_names()
    found = []
    for name in sorted(names):
        if name not in valid and name not in NON_SETTINGS:
            near = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.5)
            found.append((name, near[0] if near else ""))
    return found


def unknown_message(name: str, near: str, kind: str) -> str:
    return f"{kind} {name} is not a greenq setting and is ignored" + (f"; did you mean {near}?" if near else "")


def load(values: Mapping[str, Any], kind: str, *, config_file: Union[str, bool, None] = None,
         env: Optional[Mapping[str, str]] = None, quiet: bool = False) -> config_module.Config:
    """The configuration: defaults < ``values`` (``GREENQ_*`` framework
    settings, named ``f"{kind} {name}"`` in errors) < the INI file
    (``config_file``, else ``values["GREENQ_CONFIG"]``, else the usual search;
    False: none) < the environment.  An unknown name is a warning (the
    framework's check reports it as an error); a wrong value a ConfigError."""
    env = os.environ if env is None else env
    cfg = config_module.Config()
    # GREENQ_TRANSPORTS first: the sections of the transports it names become settings
    for name in sorted(values, key=lambda n: n != "GREENQ_TRANSPORTS"):
        names = setting_names()
        if name in names:
            section, key = names[name]
            cfg.set(section, key, values[name], origin=f"{kind} {name}")
        elif name not in NON_SETTINGS:
            cfg.warnings.append(unknown_message(name, dict(unknown([name])).get(name, ""), kind))
    if env.get("GREENQ_TRANSPORTS"):
        cfg.set("greenq", "transports", env["GREENQ_TRANSPORTS"], origin="environment GREENQ_TRANSPORTS")
    path = values.get("GREENQ_CONFIG") if config_file is None else config_file
    if path is not False:
        file = config_module.find_config_file(str(path) if path else None, env)
        if file:
            cfg.file = file
            config_module._read_ini(cfg, file)
    config_module._read_env(cfg, env)
    config_module.validate(cfg)
    if not quiet:
        config_module.report(cfg)
    return cfg


def reconfigure(app: Any, cfg: config_module.Config) -> None:
    """Give ``app`` (a GreenQ made before its settings were known, as an
    extension's is) the configuration ``cfg``: its connections and codec are
    remade on next use, from ``cfg``."""
    app.close()
    app.config = cfg
    app._codec = None
