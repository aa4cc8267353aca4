"""Settings: one defaults table, layered as defaults < INI file < environment < CLI.

Every key lives in ``SETTINGS`` with its type, default and one line of help.
``load()`` builds a :class:`Config`; any unknown section or key, or a value of
the wrong type, raises :class:`ConfigError` naming the file, section, key and
value, with the nearest valid key suggested.  Nothing is read at import time.

Environment: ``GREENQ_<KEY>`` for ``[greenq]``, ``GREENQ_<SECTION>_<KEY>`` for
the other sections (``GREENQ_WORKER_CONCURRENCY``, ``GREENQ_REDIS_MAX_CONNECTIONS``).
"""
from __future__ import annotations

import configparser
import difflib
import logging
import math
import os
import re
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple
from urllib.parse import urlsplit, urlunsplit

from . import validation
from .exceptions import ConfigError
from .pools import POOLS
from .setting import MAX_TIMEOUT, Setting

if TYPE_CHECKING:  # pragma: no cover
    from .resources.base import ResourceSettings

log = logging.getLogger("greenq.config")

SERIALIZERS = ("json", "msgpack", "pickle")
#: what a key_prefix may be: it becomes part of Redis keys, RabbitMQ names
#: and (quoted) SQLite table names, so no spaces, quotes or control characters
KEY_PREFIX = re.compile(r"[A-Za-z0-9_.:-]{1,64}")


#: ceilings (docs/configuration.md lists them with their reasons)
DAY = 86400
MAX_PROCESSES = 256
MAX_MESSAGE_SIZE = 128 * 1024 * 1024      # RabbitMQ's default max_message_size
MAX_RESULT_EXPIRES = 3650 * DAY
MAX_DELIVERIES = 1000
MAX_PREFETCH_BYTES = 1 << 30              # what one worker process holds of message bodies
#: the largest bare number (no unit) a ``size`` setting takes: Celery counts
#: --max-memory-per-child in KiB, so its 200000 would mean 195 GiB here
MAX_BARE_MIB = 65536


SETTINGS: Dict[str, Dict[str, Setting]] = {
    "greenq": {
        "app": Setting("list", [], "modules to import (comma-separated)"),
        "broker_url": Setting("str", "sqlite:///greenq.sqlite3", "broker URL; the embedded SQLite default"),
        "result_backend": Setting("str", "", "result backend URL; empty: derived from broker_url"),
        "result_expires": Setting("int", 86400, "seconds a stored result is kept", MAX_RESULT_EXPIRES),
        "serializer": Setting("choice:json|msgpack|pickle", "json", "serializer of task arguments and results"),
        "accept_content": Setting("list", ["json"], "serializers workers agree to decode"),
        "signing_key": Setting("str", "", "HMAC key; when set, unsigned or forged messages are dead-lettered"),
        "default_queue": Setting("str", "default", "queue used when a task names none"),
        "transports": Setting("list", [], "transports of other packages to load, package.module:NAME, "
                              "comma-separated (docs/transports.md)"),
        "eager": Setting("bool", False, "run tasks inline in the caller (users' unit tests)"),
        "key_prefix": Setting("str", "greenq", "names everything greenq makes on a shared server "
                                               "(Redis keys, RabbitMQ queues and exchanges, SQLite tables); "
                                               "1-64 of A-Z a-z 0-9 _ - . :"),
        "lease_seconds": Setting("float", 30.0, "how long a held message stays hidden from other workers", DAY),
        "max_deliveries": Setting("int", 10, "deliveries before a message is dead-lettered", MAX_DELIVERIES),
        "max_message_size": Setting("int", 1048576, "bytes; larger payloads are refused at enqueue",
                                    MAX_MESSAGE_SIZE),
        "logging_config": Setting("str", "", "path to a logging.config.fileConfig INI"),
        "broker_connect_timeout": Setting("float", 0.0, "seconds a starting worker waits for its broker; "
                                          "0 = forever", DAY),
        "exception_modules": Setting("list", [], "modules (and their submodules) whose exceptions a "
                                     "result may be rebuilt as, beside builtins and the tasks' modules"),
        "celery_queues": Setting("list", [], "queues that speak Celery's message protocol 2: a worker runs "
                                 "what Celery clients send there (docs/celery.md); comma-separated"),
        "celery_visibility_timeout": Setting("float", 3600.0, "kombu's visibility_timeout of the Celery "
                                             "queues' broker, seconds: set it to Celery's "
                                             "broker_transport_options value (docs/celery.md)", 365 * DAY),
        "task_send_sent_event": Setting("bool", False, "publish a task-sent event for every task this "
                                        "process sends (workers with -E always do)"),
        "tracing": Setting("bool", False, "OpenTelemetry spans for each task sent and run, and the "
                           "process-duration metric (needs opentelemetry-api; docs/tracing.md)"),
    },
    "worker": {
        "pool": Setting("choice:" + "|".join(POOLS), "gevent", "concurrency driver"),
        "concurrency": Setting("int", 100, "tasks run at once", validation.MAX_CONCURRENCY),
        "prefetch": Setting("int", 0, "messages held at once; 0 = auto (the concurrency plus a quarter)",
                            validation.MAX_PREFETCH),
        "prefetch_bytes": Setting("int", 0, "bytes of message bodies held at once (beside prefetch); "
                                  "0 = 8 x (max_message_size + 64 KiB)", MAX_PREFETCH_BYTES),
        "queues": Setting("list", ["default"], "queues consumed, comma-separated"),
        "processes": Setting("int", 1, "worker processes under one supervisor", MAX_PROCESSES),
        "loglevel": Setting("choice:DEBUG|INFO|WARNING|ERROR|CRITICAL", "INFO", "log level"),
        "shutdown_timeout": Setting("float", 30.0, "seconds running tasks get to finish on warm shutdown",
                                    DAY),
        "max_tasks_per_child": Setting("int", 0, "replace a child process after N tasks; 0 = off",
                                       10 ** 9),
        "max_memory_per_child": Setting("size", 0, "MiB, or with a unit (200MB, 200000KiB, 2GiB); "
                                        "replace a child process above it; 0 = off", 1024 * 1024),
        "http": Setting("hostport", "", "host:port for /metrics and /healthz; empty = off"),
        "blocking_threshold": Setting("float", 0.5, "seconds the hub may block before a warning; 0 = off",
                                      MAX_TIMEOUT),
        "track_started": Setting("bool", False, "store STARTED when a task begins (one more write per task)"),
        "events": Setting("bool", False, "send task events (-E), batched, for greenq events and the dashboard"),
        "control": Setting("bool", True, "answer inspect/control commands and send heartbeats"),
        "resource_wait_warning": Setting("float", 30.0, "seconds a task may wait for a resource permit before "
                                         "a warning (once per task); 0 = off", DAY),
    },
    "dashboard": {
        "http": Setting("hostport", "127.0.0.1:5555", "host:port greenq dashboard serves on"),
        "auth": Setting("str", "", "USER:PASSWORD for HTTP basic auth; empty = none"),
        "allowed_hosts": Setting("list", [], "Host names (HOST or HOST:PORT) the dashboard answers to "
                                 "beside the bound host and localhost; comma-separated"),
    },
}

# Every task option: the decorator's default (Celery's, where Celery has one)
# and, for the ones an INI ``[task:<name>]`` section may override, its type.
# greenq.task reads the defaults from here: one table for both.
TASK_SETTINGS: Dict[str, Setting] = {
    "queue": Setting("str", None, "queue"),
    "priority": Setting("int", None, "default priority 0-9", 9),
    "max_retries": Setting("int", 3, "retries before giving up", 2 ** 31),
    "retry_backoff": Setting("float", False, "backoff base in seconds; 0 = off", validation.MAX_SECONDS),
    "retry_backoff_max": Setting("float", 600.0, "longest backoff in seconds", validation.MAX_SECONDS),
    "retry_jitter": Setting("bool", True, "randomise the backoff"),
    "default_retry_delay": Setting("float", 180.0, "seconds before an explicit retry", validation.MAX_SECONDS),
    "soft_time_limit": Setting("float", None, "seconds before SoftTimeLimitExceeded", validation.MAX_SECONDS),
    "time_limit": Setting("float", None, "seconds before the task is killed", validation.MAX_SECONDS),
    "rate_limit": Setting("ratelimit", None, "N/s, N/m or N/h per worker"),
    "acks_late": Setting("bool", True, "acknowledge after the task finished"),
    "ignore_result": Setting("bool", False, "do not store the result"),
    "expires": Setting("float", None, "seconds after which an unstarted task is revoked",
                       validation.MAX_SECONDS),
    "track_started": Setting("bool", None, "store STARTED when the task begins; unset: [worker] track_started"),
}
#: decorator options that no INI section can set (they name code), with their defaults
CODE_ONLY_TASK_OPTIONS: Dict[str, Any] = {"autoretry_for": (), "resources": None}

# Periodic tasks, in [schedule:<name>] sections (greenq/beat.py reads them).
SCHEDULE_SETTINGS: Dict[str, Setting] = {
    "task": Setting("str", None, "task name"),
    "every": Setting("float", None, "seconds between runs", validation.MAX_EVERY),
    "cron": Setting("str", None, "five cron fields (minute hour day month weekday)"),
    "timezone": Setting("str", "UTC", "timezone of cron"),
    "args": Setting("json", [], "positional arguments, a JSON list"),
    "kwargs": Setting("json", {}, "keyword arguments, a JSON object"),
    "queue": Setting("str", None, "queue"),
    "priority": Setting("int", None, "priority 0-9", 9),
    "expires": Setting("float", None, "seconds after which an unstarted run is revoked", validation.MAX_SECONDS),
    "time_limit": Setting("float", None, "seconds before the task is killed", validation.MAX_SECONDS),
    "soft_time_limit": Setting("float", None, "seconds before SoftTimeLimitExceeded", validation.MAX_SECONDS),
}

# Resources, in [resource:<name>] sections (greenq/resources/, docs/resources.md).
#: the most permits one resource may have: far above any downstream's
#: connection limit, low enough that a typo (an extra zero or three) is caught
MAX_RESOURCE_LIMIT = 100000
RESOURCE_SCOPES = ("process", "host", "cluster")
RESOURCE_SETTINGS: Dict[str, Setting] = {
    "limit": Setting("int", None, "permits held at once (required), 1 to the ceiling", MAX_RESOURCE_LIMIT),
    "scope": Setting("choice:" + "|".join(RESOURCE_SCOPES), "process",
                     "who shares the permits: this process, this host, or every worker of the app"),
    "adaptive": Setting("bool", False, "the limit in force moves between min_limit and limit"),
    "min_limit": Setting("int", 1, "the lowest an adaptive limit goes, 1 to limit", MAX_RESOURCE_LIMIT),
    "errors": Setting("list", [], "dotted names of the exceptions that mean the resource is overloaded"),
}
#: a resource's name: it names locks and keys on a shared server too
RESOURCE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
#: a dotted exception name (``psycopg.OperationalError``, ``TimeoutError``)
_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")

SEARCH_PATH = ("./greenq.ini", "/etc/greenq/greenq.ini")
#: ``GREENQ_*`` environment variables that are not settings (no warning for them)
NON_SETTING_ENV = ("GREENQ_CONFIG", "GREENQ_TEST_", "GREENQ_SUPERVISOR_", "GREENQ_PERMITS_DIR")
#: warnings already logged by this process (one module may load the config twice)
_REPORTED: set = set()
#: set by the worker and the admin tool, which report the warnings of the
#: configuration they loaded: loads made later (by the app's module) stay quiet
_TAKEN_OVER = [False]
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*([smh])\s*$")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$", re.IGNORECASE)
#: a size's unit -> MiB (binary multiples whichever way the unit is spelt:
#: memory is counted in pages, and Celery's KiB are 1024 bytes)
SIZE_UNITS = {"b": 1 / 1048576, "k": 1 / 1024, "kb": 1 / 1024, "kib": 1 / 1024,
              "m": 1, "mb": 1, "mib": 1, "g": 1024, "gb": 1024, "gib": 1024}


def parse_rate(text: str) -> float:
    """``"100/s"`` -> 100.0 per second; ``"6/m"`` -> 0.1."""
    m = _RATE.match(text)
    if not m:
        raise ValueError("expected N/s, N/m or N/h")
    return float(m.group(1)) / {"s": 1, "m": 60, "h": 3600}[m.group(2)]


def parse_size(text: str) -> int:
    """A memory size in whole MiB (rounded, at least 1 when not 0): ``200MB``,
    ``200000KiB``, ``2GiB``, or a bare number of MiB up to ``MAX_BARE_MIB``.
    A bigger bare number is refused: it is most likely Celery's KiB."""
    m = _SIZE.match(text)
    unit = m.group(2).lower() if m else ""
    if not m or (unit and unit not in SIZE_UNITS):
        raise ValueError("expected a size: MiB, or a number with a unit (200MB, 200000KiB, 2GiB)")
    number = float(m.group(1))
    if not unit and number > MAX_BARE_MIB:
        raise ValueError(f"a bare number is MiB, and {number:.0f} MiB is above {MAX_BARE_MIB:,}; "
                         f"did you mean KiB, as Celery counts? write {m.group(1)}KiB "
                         f"(or a size with a unit: 200MB, 2GiB)")
    mib = _finite(number * SIZE_UNITS[unit or "mib"])
    return max(1, round(mib)) if mib else 0


def _parse_bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


def _parse_hostport(text: str) -> str:
    text = text.strip()
    if not text:
        return ""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("expected HOST:PORT")
    return text


def convert(kind: str, value: Any) -> Any:
    """Convert a raw (usually string) value to the setting's type; ValueError if it cannot."""
    if not isinstance(value, str):
        if kind == "list" and isinstance(value, (list, tuple)):
            return [str(v) for v in value]
        if kind in ("int", "float") and isinstance(value, bool):
            raise ValueError(f"expected {kind}")
        if kind == "int" and isinstance(value, int):
            return _non_negative(value)
        if kind == "float" and isinstance(value, (int, float)):
            return _non_negative(_finite(float(value)))
        if kind == "bool" and isinstance(value, bool):
            return value
        if kind == "size" and isinstance(value, (bool, float)):
            raise ValueError("expected a whole number of MiB, or a size with a unit")
        value = str(value)
    if kind == "str":
        return value.strip()
    if kind == "int":
        try:
            return _non_negative(int(value.strip()))
        except ValueError:
            raise ValueError("expected a whole number >= 0") from None
    if kind == "float":
        try:
            number = float(value.strip())
        except ValueError:
            raise ValueError("expected a number >= 0") from None
        return _non_negative(_finite(number))
    if kind == "bool":
        return _parse_bool(value)
    if kind == "list":
        return [part.strip() for part in value.split(",") if part.strip()]
    if kind == "hostport":
        return _parse_hostport(value)
    if kind == "size":
        return parse_size(value)
    if kind == "ratelimit":
        parse_rate(value)
        return value.strip()
    if kind.startswith("choice:"):
        choices = kind[len("choice:"):].split("|")
        v = value.strip()
        match = {c.lower(): c for c in choices}.get(v.lower())
        if match is None:
            raise ValueError("expected one of " + ", ".join(choices))
        return match
    raise AssertionError(kind)


def _non_negative(n):
    if n < 0:
        raise ValueError("must be >= 0")
    return n


def _finite(number: float) -> float:
    """nan and infinities compare false with every bound, so they are refused first."""
    if not math.isfinite(number):
        raise ValueError("expected a finite number (nan and infinities are refused)")
    return number


def check_ceiling(setting: Setting, value: Any) -> None:
    """ValueError when ``value`` is above the setting's documented ceiling."""
    if setting.high is not None and isinstance(value, (int, float)) and not isinstance(value, bool) \
            and value > setting.high:
        raise ValueError(f"above the ceiling of {setting.high:.0f} (docs/configuration.md, Ceilings)")


def mask_url(url: str) -> str:
    """Hide the password of a URL: ``redis://:secret@h/0`` -> ``redis://:***@h/0``;
    of each URL of a ``;``-separated node list."""
    if not url or "@" not in url:
        return url
    if ";" in url:
        return ";".join(mask_url(part) for part in url.split(";"))
    try:
        parts = urlsplit(url)
    except ValueError:
        return "***"
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, f"{user}:***@{host}", parts.path, parts.query, parts.fragment))


def _suggest(word: str, candidates: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else ""


def _defaults(table: Mapping[str, Setting]) -> Dict[str, Any]:
    return {k: (list(v.default) if isinstance(v.default, list) else v.default) for k, v in table.items()}


def add_section(name: str, table: Mapping[str, Setting]) -> None:
    """Declare a transport's INI section (greenq/transports/ calls it)."""
    if SETTINGS.get(name, table) != table:
        raise ConfigError(f"two transports declare the INI section [{name}] differently")
    SETTINGS[name] = dict(table)


class Config:
    """The effective settings.  ``cfg.broker_url`` reads ``[greenq]``;
    ``cfg.worker["concurrency"]``, ``cfg.section("redis")`` the others;
    ``cfg.task_options(name)`` the ``[task:NAME]`` overrides;
    ``cfg.origin(section, key)`` tells where a value came from."""

    def __init__(self) -> None:
        self._values: Dict[str, Dict[str, Any]] = {s: _defaults(keys) for s, keys in SETTINGS.items()}
        self._origin: Dict[Tuple[str, str], str] = {}
        self._tasks: Dict[str, Dict[str, Any]] = {}
        #: bumped by every ``set`` of a ``[task:NAME]`` key: a task's resolved options
        #: (``Task.resolved``) are made again after a change
        self.task_generation = 0
        self.routes: Dict[str, str] = {}                      # [routes]: task-name glob -> queue
        self.schedules: Dict[str, Dict[str, Any]] = {}        # [schedule:NAME] entries
        self.resources: Dict[str, Dict[str, Any]] = {}        # [resource:NAME] keys as set
        self._resource_origin: Dict[Tuple[str, str], str] = {}  # where each resource key was set
        self._schedule_origin: Dict[Tuple[str, str], str] = {}  # where each schedule key was set
        self.file: Optional[str] = None
        #: mistakes that do not stop a start (a misspelt variable...), see report()
        self.warnings: List[str] = []

    def __getattr__(self, key: str) -> Any:
        values = self.__dict__.get("_values")
        if values is not None and key in values["greenq"]:
            return values["greenq"][key]
        raise AttributeError(key)

    @property
    def worker(self) -> Dict[str, Any]:
        return self._values["worker"]

    def section(self, name: str) -> Dict[str, Any]:
        values = self._values.get(name)
        if values is None:          # a transport's section registered after this Config was made
            values = self._values[name] = _defaults(SETTINGS[name])
        return values

    def task_options(self, name: str) -> Dict[str, Any]:
        return self._tasks.get(name, {})

    def origin(self, section: str, key: str) -> str:
        return (self._origin.get((section, key)) or self._resource_origin.get((section, key))
                or self._schedule_origin.get((section, key), "default"))

    def set(self, section: str, key: str, value: Any, origin: str) -> None:
        """Set one value, converting and validating it; ``origin`` names the source in errors."""
        if section == "routes" or section.startswith("schedule:"):
            self._set_workflow(section, key, value, origin)
            return
        if section.startswith("resource:"):
            self._set_resource(section, key, value, origin)
            return
        if section.startswith("task:"):
            table = TASK_SETTINGS
        else:
            if section not in SETTINGS:
                raise ConfigError(f"{origin}: unknown section [{section}]"
                                  + _suggest(section, list(SETTINGS) + ["task:NAME", "resource:NAME"]))
            table = SETTINGS[section]
        if key not in table:
            raise ConfigError(f"{origin}: [{section}] unknown key '{key}'" + _suggest(key, table))
        try:
            converted = convert(table[key].type, value)
            check_ceiling(table[key], converted)
        except ValueError as exc:
            shown = mask_url(str(value)) if key.endswith("url") or key == "result_backend" else value
            if key == "signing_key":
                shown = "***"
            raise ConfigError(f"{origin}: [{section}] {key} = {shown!r}: {exc}") from None
        if section.startswith("task:"):
            self._tasks.setdefault(section[5:], {})[key] = converted
            self.task_generation += 1
        else:
            if section == "greenq" and key == "transports":
                from . import transports         # (their INI sections are known from here on)
                for reference in converted:
                    try:
                        transports.register(reference)
                    except ConfigError as exc:
                        raise ConfigError(f"{origin}: [greenq] transports = {reference!r}: {exc}") from None
            self.section(section)[key] = converted
        self._origin[(section, key)] = origin

    def _set_workflow(self, section: str, key: str, value: Any, origin: str) -> None:
        """``[routes]`` (``glob = queue``, in file order) and ``[schedule:NAME]``."""
        import json
        if section == "routes":
            queue = str(value).strip()
            if not queue or not key.strip():
                raise ConfigError(f"{origin}: [routes] {key} = {value!r}: expected task-name-glob = queue")
            self.routes[key.strip()] = queue
            return
        name = section[len("schedule:"):]
        if not name:
            raise ConfigError(f"{origin}: [{section}]: the entry needs a name, [schedule:NAME]")
        if key not in SCHEDULE_SETTINGS:
            raise ConfigError(f"{origin}: [{section}] unknown key '{key}'" + _suggest(key, SCHEDULE_SETTINGS))
        kind = SCHEDULE_SETTINGS[key].type
        try:
            if kind == "json":
                converted = json.loads(value) if isinstance(value, str) else value
                expected = list if key == "args" else dict
                if not isinstance(converted, expected):
                    raise ValueError(f"expected a JSON {'list' if key == 'args' else 'object'}")
            else:
                converted = convert(kind, value)
                check_ceiling(SCHEDULE_SETTINGS[key], converted)
        except ValueError as exc:
            raise ConfigError(f"{origin}: [{section}] {key} = {value!r}: {exc}") from None
        self.schedules.setdefault(name, {})[key] = converted
        self._schedule_origin[(section, key)] = origin

    def _set_resource(self, section: str, key: str, value: Any, origin: str) -> None:
        """One key of a ``[resource:NAME]`` section; the section as a whole is
        checked by ``check_resource`` (``resource_settings``)."""
        name = section[len("resource:"):]
        if not RESOURCE_NAME.fullmatch(name):
            raise ConfigError(f"{origin}: [{section}]: a resource needs a name of 1-64 characters of "
                              f"A-Z a-z 0-9 _ - ., [resource:NAME]")
        if key not in RESOURCE_SETTINGS:
            raise ConfigError(f"{origin}: [{section}] unknown key '{key}'" + _suggest(key, RESOURCE_SETTINGS))
        setting = RESOURCE_SETTINGS[key]
        try:
            converted = convert(setting.type, value)
            check_ceiling(setting, converted)
            if key in ("limit", "min_limit") and converted < 1:
                raise ValueError("must be >= 1")
            if key == "errors":
                for dotted in converted:
                    if not _DOTTED.fullmatch(dotted):
                        raise ValueError(f"{dotted!r} is not a dotted exception name such as "
                                         f"psycopg.OperationalError")
        except ValueError as exc:
            raise ConfigError(f"{origin}: [{section}] {key} = {value!r}: {exc}") from None
        self.resources.setdefault(name, {})[key] = converted
        self._resource_origin[(section, key)] = origin

    def resource_settings(self) -> Dict[str, "ResourceSettings"]:
        """Every ``[resource:NAME]`` section, checked (``check_resource``), by name."""
        return {name: check_resource(self, name) for name in self.resources}

    def copy(self) -> "Config":
        new = Config()
        new.routes = dict(self.routes)
        new.resources = {n: dict(v) for n, v in self.resources.items()}
        new._resource_origin = dict(self._resource_origin)
        new.schedules = {n: dict(v) for n, v in self.schedules.items()}
        new._values = {s: dict(v) for s, v in self._values.items()}
        new._origin = dict(self._origin)
        new._schedule_origin = dict(self._schedule_origin)
        new._tasks = {t: dict(v) for t, v in self._tasks.items()}
        new.file = self.file
        new.warnings = list(self.warnings)
        return new

    def items(self, masked: bool = True):
        """Yield ``(section, key, value, origin)`` for every setting, passwords masked."""
        for section, keys in self._values.items():
            for key, value in keys.items():
                yield section, key, self._display(key, value) if masked else value, self.origin(section, key)
        for task, opts in self._tasks.items():
            for key, value in opts.items():
                yield f"task:{task}", key, value, self.origin(f"task:{task}", key)
        for resource, opts in self.resources.items():
            for key, value in opts.items():
                yield f"resource:{resource}", key, value, self.origin(f"resource:{resource}", key)

    @staticmethod
    def _display(key: str, value: Any) -> Any:
        if key == "signing_key" and value:
            return "***"
        if key == "auth" and value:
            return value.partition(":")[0] + ":***"
        if isinstance(value, str) and (key.endswith("_url") or key == "result_backend"):
            return mask_url(value)
        return value


def find_config_file(explicit: Optional[str], env: Mapping[str, str]) -> Optional[str]:
    """``--config FILE``, else ``$GREENQ_CONFIG``, else ./greenq.ini, else /etc/greenq/greenq.ini."""
    if explicit:
        if not os.path.isfile(explicit):
            raise ConfigError(f"--config {explicit}: no such file")
        return explicit
    if env.get("GREENQ_CONFIG"):
        path = env["GREENQ_CONFIG"]
        if not os.path.isfile(path):
            raise ConfigError(f"GREENQ_CONFIG={path}: no such file")
        return path
    for path in SEARCH_PATH:
        if os.path.isfile(path):
            return path
    return None


def _read_ini(cfg: Config, path: str) -> None:
    parser = configparser.ConfigParser(inline_comment_prefixes=(";", "#"), interpolation=None,
                                       strict=True)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keep key case so errors show what was written (typeshed: a method)
    try:
        with open(path, encoding="utf-8") as fh:
            parser.read_file(fh)
    except (configparser.Error, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot parse: {exc}") from None
    # [greenq] first: its ``transports`` declare the sections of other packages' transports
    for section in sorted(parser.sections(), key=lambda name: name != "greenq"):
        for key, value in parser.items(section, raw=True):
            cfg.set(section, key if section == "routes" else key.lower(), value, origin=path)


def env_name(section: str, key: str) -> str:
    """The environment variable of a setting: ``GREENQ_BROKER_URL``, ``GREENQ_WORKER_CONCURRENCY``."""
    return f"GREENQ_{key.upper()}" if section == "greenq" else f"GREENQ_{section.upper()}_{key.upper()}"


def _read_env(cfg: Config, env: Mapping[str, str]) -> None:
    valid = [env_name(section, key) for section, keys in SETTINGS.items() for key in keys]
    for name, value in env.items():
        if not name.startswith("GREENQ_") or name.startswith(NON_SETTING_ENV):
            continue
        rest = name[len("GREENQ_"):].lower()
        for section in SETTINGS:
            if section != "greenq" and rest.startswith(section + "_"):
                key = rest[len(section) + 1:]
                if key in SETTINGS[section]:
                    cfg.set(section, key, value, origin=f"environment {name}")
                    break
        else:
            if rest in SETTINGS["greenq"]:
                cfg.set("greenq", rest, value, origin=f"environment {name}")
            else:  # a misspelt setting would otherwise be ignored without a word
                cfg.warnings.append(f"environment {name} is not a greenq setting and is ignored"
                                    + _suggest(name, valid))


def load(path: Optional[str] = None, *, env: Optional[Mapping[str, str]] = None,
         overrides: Optional[Mapping[Tuple[str, str], Any]] = None,
         search: bool = True, quiet: bool = False) -> Config:
    """Build the effective configuration.

    ``path`` is ``--config``; with ``search`` the usual places are tried when it
    is None.  ``overrides`` are CLI flags or constructor arguments, keyed by
    ``(section, key)``, applied last.  Warnings (``cfg.warnings``) are logged
    unless ``quiet``: the worker and the admin tool report them once their
    logging is set up.
    """
    env = os.environ if env is None else env
    cfg = Config()
    file = find_config_file(path, env) if (path or search) else None
    if env.get("GREENQ_TRANSPORTS"):     # before the file: it may hold their sections (set again below)
        cfg.set("greenq", "transports", env["GREENQ_TRANSPORTS"], origin="environment GREENQ_TRANSPORTS")
    if file:
        cfg.file = file
        _read_ini(cfg, file)
    _read_env(cfg, env)
    for (section, key), value in (overrides or {}).items():
        if value is not None:
            cfg.set(section, key, value, origin=f"option {key}")
    validate(cfg)
    if not quiet and not _TAKEN_OVER[0]:
        report(cfg)
    return cfg


def report(cfg: Config, write: Optional[Callable[[str], object]] = None, take_over: bool = False) -> None:
    """Pass each of ``cfg.warnings`` not reported yet in this process to
    ``write`` (default: log it at WARNING on ``greenq.config``).  With
    ``take_over`` (a command line tool), later ``load()`` calls in this
    process report nothing: the same file and environment were reported once."""
    _TAKEN_OVER[0] = _TAKEN_OVER[0] or take_over
    for message in cfg.warnings:
        if message not in _REPORTED:
            _REPORTED.add(message)
            if write is None:
                log.warning("%s", message)
            else:
                write(message)


def validate(cfg: Config) -> None:
    """Cross-key checks that a single key's type cannot express."""
    for name in cfg.accept_content:
        if name not in SERIALIZERS:
            raise ConfigError(f"{cfg.origin('greenq', 'accept_content')}: [greenq] accept_content = "
                              f"{','.join(cfg.accept_content)!r}: unknown serializer '{name}'"
                              + _suggest(name, SERIALIZERS))
    if cfg.worker["concurrency"] < 1:
        raise ConfigError(f"{cfg.origin('worker', 'concurrency')}: [worker] concurrency = 0: must be >= 1")
    if cfg.worker["processes"] < 1:
        raise ConfigError(f"{cfg.origin('worker', 'processes')}: [worker] processes = 0: must be >= 1")
    if cfg.lease_seconds < 1:
        raise ConfigError(f"{cfg.origin('greenq', 'lease_seconds')}: [greenq] lease_seconds = "
                          f"{cfg.lease_seconds}: must be >= 1")
    if cfg.celery_visibility_timeout < 1:
        raise ConfigError(f"{cfg.origin('greenq', 'celery_visibility_timeout')}: [greenq] "
                          f"celery_visibility_timeout = {cfg.celery_visibility_timeout}: must be >= 1")
    if cfg.max_deliveries < 1:
        raise ConfigError(f"{cfg.origin('greenq', 'max_deliveries')}: [greenq] max_deliveries = 0: must be >= 1")
    if not cfg.worker["queues"]:
        raise ConfigError(f"{cfg.origin('worker', 'queues')}: [worker] queues is empty")
    if not KEY_PREFIX.fullmatch(cfg.key_prefix):
        raise ConfigError(f"{cfg.origin('greenq', 'key_prefix')}: [greenq] key_prefix = {cfg.key_prefix[:80]!r}: "
                          f"must be 1-64 characters of A-Z a-z 0-9 _ - . : (it names Redis keys, RabbitMQ "
                          f"queues and exchanges, and SQLite tables)")
    if cfg.celery_queues:
        check_celery_broker(cfg)
    for entry, spec in cfg.schedules.items():
        check_schedule(cfg, entry, spec)
    cfg.resource_settings()
    for opts_name, opts in cfg._tasks.items():
        check_limits(f"{cfg.origin(f'task:{opts_name}', 'soft_time_limit')}: [task:{opts_name}]",
                     opts.get("soft_time_limit"), opts.get("time_limit"))
    w = cfg.worker
    if w["prefetch"] and w["prefetch"] < w["concurrency"]:
        cfg.warnings.append(
            f"{cfg.origin('worker', 'prefetch')}: [worker] prefetch = {w['prefetch']} is below "
            f"[worker] concurrency = {w['concurrency']} ({cfg.origin('worker', 'concurrency')}); "
            f"the worker holds {w['concurrency']} messages. Set prefetch >= concurrency, "
            f"or 0 for auto")


def check_schedule(cfg: Config, entry: str, spec: Mapping[str, Any]) -> None:
    """One ``[schedule:NAME]`` entry, checked with the rules send_task applies
    (greenq.validation.schedule_entry): a ConfigError naming the file,
    section, key and value of the first mistake."""
    section = f"schedule:{entry}"
    where = cfg.origin(section, next(iter(spec), "task"))
    if not spec.get("task") or (spec.get("every") is None) == (spec.get("cron") is None):
        raise ConfigError(f"{where}: [{section}]: needs a task and exactly one of every (seconds) and cron")
    try:
        validation.schedule_entry(dict(spec))
    except validation.FieldError as exc:
        raise ConfigError(f"{cfg.origin(section, exc.key)}: [{section}] {exc.key} = "
                          f"{spec.get(exc.key)!r}: {exc}") from None


def check_resource(cfg: Config, name: str) -> "ResourceSettings":
    """One ``[resource:NAME]`` section as a whole: ``limit`` is required and
    ``min_limit`` may not be above it.  A ConfigError names where each was set."""
    from .resources.base import ResourceSettings
    section = f"resource:{name}"
    spec = cfg.resources.get(name, {})
    limit = spec.get("limit")
    if limit is None:
        where = cfg.origin(section, next(iter(spec))) if spec else "configuration"
        raise ConfigError(f"{where}: [{section}] needs a limit (limit = N, the permits held at once)")
    min_limit = spec.get("min_limit", RESOURCE_SETTINGS["min_limit"].default)
    if min_limit > limit:
        raise ConfigError(f"{cfg.origin(section, 'min_limit')}: [{section}] min_limit = {min_limit} is "
                          f"above limit = {limit} ({cfg.origin(section, 'limit')})")
    return ResourceSettings(name, limit, scope=spec.get("scope", RESOURCE_SETTINGS["scope"].default),
                            adaptive=bool(spec.get("adaptive", False)), min_limit=min_limit,
                            errors=tuple(spec.get("errors", ())))


def check_limits(where: str, soft: Optional[float], hard: Optional[float]) -> None:
    """A soft time limit above the hard one never fires: a ConfigError naming ``where``."""
    if soft and hard and soft > hard:
        raise ConfigError(f"{where} soft_time_limit = {soft:g} is above time_limit = {hard:g}: "
                          f"the soft limit would never fire; lower soft_time_limit or raise time_limit")


def effective_prefetch(concurrency: int, prefetch: int) -> int:
    """How many messages a worker holds: ``[worker] prefetch``, never below the
    concurrency; when 0 (auto), the concurrency plus a quarter, so the next wave
    of messages is already local when a wave of tasks ends.  Never above
    MAX_PREFETCH, the most AMQP's basic_qos can carry (an unsigned short):
    a concurrency or prefetch above its ceiling is a ConfigError."""
    if concurrency > validation.MAX_CONCURRENCY:
        raise ConfigError(f"concurrency {concurrency} is above the ceiling of {validation.MAX_CONCURRENCY}")
    if prefetch > validation.MAX_PREFETCH:
        raise ConfigError(f"prefetch {prefetch} is above the ceiling of {validation.MAX_PREFETCH}")
    concurrency = max(1, concurrency)
    if prefetch:
        return max(prefetch, concurrency)
    return min(validation.MAX_PREFETCH, concurrency + max(1, concurrency // 4))


def check_celery_broker(cfg: Config) -> None:
    """``celery_queues`` needs a broker whose transport reads and writes
    Celery's protocol on its scheme (the descriptor's ``celery_schemes``)."""
    from .transports import lookup, registered, scheme_of
    scheme = scheme_of(cfg.broker_url)
    desc = lookup(cfg.broker_url, cfg)
    if desc is not None and scheme in desc.celery_schemes:
        return
    served = [s + "://" for d in registered() for s in d.celery_schemes]
    listed = ", ".join(served[:-1]) + " and " + served[-1] if len(served) > 1 else "".join(served) or "none"
    raise ConfigError(f"{cfg.origin('greenq', 'celery_queues')}: [greenq] celery_queues = "
                      f"{','.join(cfg.celery_queues)[:80]!r}: Celery's protocol is supported on {listed} "
                      f"brokers only (docs/celery.md), not {scheme}://")


def _add_transport_sections() -> None:
    from .transports import registered
    for desc in registered():
        if desc.ini_section and desc.settings:
            add_section(desc.ini_section, desc.settings)


_add_transport_sections()
