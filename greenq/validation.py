"""One set of rules for every field of a task call, used in both directions.

The client checks the options of ``apply_async``/``send_task`` and the
decorator's options with these rules and raises ``ValueError`` (or
``TypeError``) naming the option before anything is sent.  The worker's
decoder (``greenq.message.Codec.decode``) checks every envelope field with the
same rules and turns a violation into ``MessageError``, so a bad message ends
as a dead letter with the reason instead of an exception somewhere later.

docs/reliability.md lists the rules field by field.
"""
from __future__ import annotations

import math
import re
from datetime import datetime, timezone as dt_timezone, tzinfo
from typing import Any, Dict, Iterable, Optional

#: task ids, task names, queue names and reply queues: at most this many UTF-8
#: bytes.  255 is AMQP's limit for a queue name and a message id (shortstr),
#: applied on every broker so that a call valid on one is valid on all.
MAX_NAME_BYTES = 255
#: arguments nested deeper than this are refused (deep nesting makes encoders
#: and decoders recurse until RecursionError)
MAX_DEPTH = 100
#: the latest eta/expires accepted: year 9999, as epoch seconds
MAX_EPOCH = 253402300799.0
#: the longest countdown or time limit accepted, in seconds (100 years)
MAX_SECONDS = 100 * 365 * 86400.0

# -- ceilings of what an operator or a remote command can raise (docs/configuration.md) --
#: the most task slots a worker process runs ([worker] concurrency, control pool-grow)
MAX_CONCURRENCY = 10000
#: the most messages a worker process holds ([worker] prefetch); AMQP's basic_qos
#: prefetch_count is an unsigned short, so this is also the most RabbitMQ takes
MAX_PREFETCH = 65535
#: the most task ids one revoke command (or control broadcast) carries
MAX_REVOKE_IDS = 1000


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def name(option: str, value: Any, *, limit: int = MAX_NAME_BYTES) -> str:
    """A non-empty string of at most ``limit`` UTF-8 bytes, no control characters."""
    if not isinstance(value, str):
        raise TypeError(f"{option} must be a string, not {type(value).__name__} {value!r:.80}")
    if not value:
        raise ValueError(f"{option} must not be empty")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise ValueError(f"{option} {value!r:.80} is not valid UTF-8 text") from None
    if size > limit:
        raise ValueError(f"{option} is {size} bytes long; at most {limit} are allowed")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
        raise ValueError(f"{option} {value!r:.80} contains control characters")
    return value


def optional_name(option: str, value: Any) -> Optional[str]:
    return None if value is None else name(option, value)


def seconds(option: str, value: Any, *, allow_zero: bool = True, limit: float = MAX_SECONDS) -> float:
    """A finite, non-negative number of seconds (a time limit, a countdown)."""
    if not _number(value):
        raise TypeError(f"{option} must be a number of seconds, not {type(value).__name__} {value!r:.80}")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero) or value > limit:
        low = "0" if allow_zero else "more than 0"
        raise ValueError(f"{option} must be {low} to {limit:.0f} seconds, not {value!r}")
    return value


def offset(option: str, value: Any) -> float:
    """A finite number of seconds from now, either sign (a countdown or an
    ``expires`` in the past means "now" and "already expired")."""
    if not _number(value):
        raise TypeError(f"{option} must be a number of seconds, not {type(value).__name__} {value!r:.80}")
    value = float(value)
    if not math.isfinite(value) or abs(value) > MAX_SECONDS:
        raise ValueError(f"{option} must be a finite number of seconds within {MAX_SECONDS:.0f}, not {value!r}")
    return value


def optional_seconds(option: str, value: Any) -> Optional[float]:
    return None if value is None else seconds(option, value)


def epoch(option: str, value: Any) -> float:
    """A point in time: a datetime, or finite epoch seconds between 0 and year 9999."""
    if isinstance(value, datetime):
        value = value.timestamp()
    elif not _number(value):
        raise TypeError(f"{option} must be a datetime or epoch seconds, not {type(value).__name__} {value!r:.80}")
    value = float(value)
    if not math.isfinite(value) or not 0 <= value <= MAX_EPOCH:
        raise ValueError(f"{option} must be epoch seconds between 0 and {MAX_EPOCH:.0f}, not {value!r}")
    return value


def optional_epoch(option: str, value: Any) -> Optional[float]:
    return None if value is None else epoch(option, value)


def priority(option: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{option} must be an integer 0-9, not {type(value).__name__} {value!r:.80}")
    if not 0 <= value <= 9:
        raise ValueError(f"{option} must be 0-9, not {value}")
    return value


def count(option: str, value: Any) -> int:
    """A non-negative integer (retries)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 0 or value > 2 ** 31:
        raise ValueError(f"{option} must be a non-negative integer, not {value!r:.80}")
    return value


def limits(soft: Optional[float], hard: Optional[float], where: str = "") -> None:
    """A soft limit at or above the hard one would never fire."""
    if soft and hard and soft > hard:
        raise ValueError(f"{where}soft_time_limit ({soft:g} s) is above time_limit ({hard:g} s); "
                         f"the soft limit must come first")


def depth(value: Any, limit: int = MAX_DEPTH) -> None:
    """Raise ValueError when lists/dicts nest deeper than ``limit`` (iterative:
    the check itself cannot overflow)."""
    stack = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            children: Iterable[Any] = item.values()
        elif isinstance(item, (list, tuple)):
            children = item
        else:
            continue
        if level > limit:
            raise ValueError(f"arguments nest more than {limit} levels deep")
        stack.extend((child, level + 1) for child in children if isinstance(child, (dict, list, tuple)))


def arguments(args: Any, kwargs: Any) -> None:
    if not isinstance(args, (list, tuple)):
        raise TypeError(f"args must be a list or tuple, not {type(args).__name__}")
    if not isinstance(kwargs, dict):
        raise TypeError(f"kwargs must be a dict, not {type(kwargs).__name__}")
    bad = [k for k in kwargs if not isinstance(k, str)]
    if bad:
        raise TypeError(f"kwargs keys must be strings, not {bad[0]!r:.80}")
    depth([args, kwargs], MAX_DEPTH + 1)


def rate(option: str, value: Any) -> Optional[str]:
    """``"100/s"``, ``"6/m"``, ``"2/h"`` (or None); a bad one is refused at
    decoration instead of killing a runner when the task first runs."""
    if value is None:
        return None
    from .config import parse_rate
    if not isinstance(value, str):
        raise TypeError(f"{option} must be a string such as '100/s', not {value!r:.80}")
    try:
        per_second = parse_rate(value)
    except ValueError:
        raise ValueError(f"{option} {value!r} is not N/s, N/m or N/h") from None
    if per_second <= 0:
        raise ValueError(f"{option} {value!r} must allow more than 0 tasks")
    return value


#: the decorator's (and ``[task:NAME]``'s) options that have a value rule
#: the most permits of one resource a task may ask for (a resource's limit has its own ceiling)
MAX_PERMITS = 100000


def resources(option: str, value: Any) -> Optional[Dict[str, int]]:
    """``resources={"pg": 1}``: resource names (as ``[resource:NAME]`` spells
    them) to a whole number of permits, at least 1.  None or {}: none."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise TypeError(f"{option} must be a dict of resource name to permit count, such as "
                        f"{{'pg': 1}}, not {type(value).__name__} {value!r:.80}")
    for key, count in value.items():
        name(f"{option} name", key, limit=64)
        if type(count) is not int or not 1 <= count <= MAX_PERMITS:
            raise ValueError(f"{option}[{key!r}] must be a whole number of permits, 1 to {MAX_PERMITS}, "
                             f"not {count!r:.80}")
    return value


TASK_OPTION_RULES: Dict[str, Any] = {
    "queue": optional_name,
    "priority": lambda o, v: None if v is None else priority(o, v),
    "soft_time_limit": optional_seconds,
    "time_limit": optional_seconds,
    "expires": lambda o, v: None if v is None else offset(o, v),
    "rate_limit": rate,
    "retry_backoff_max": optional_seconds,
    "default_retry_delay": optional_seconds,
    "resources": resources,
}


def task_options(task_name: str, options: Dict[str, Any]) -> None:
    """Check the decorator's options of one task; ValueError/TypeError names it."""
    for key, rule in TASK_OPTION_RULES.items():
        if key in options:
            try:
                rule(key, options[key])
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"@app.task {task_name}: {exc}") from None
    max_retries = options.get("max_retries")
    if max_retries is not None:
        count("max_retries", max_retries)
    limits(options.get("soft_time_limit"), options.get("time_limit"), f"@app.task {task_name}: ")


# -- numbers read from configuration and from stored scheduler records --------------
def finite(option: str, value: float) -> float:
    """``value`` unless it is nan or an infinity (which compare false with
    everything, so a ceiling or a ``> 0`` test would let them through)."""
    if not math.isfinite(value):
        raise ValueError(f"{option} must be a finite number, not {value!r}")
    return value


# -- periodic tasks (greenq/beat.py, [schedule:NAME]) ---------------------------------
#: the shortest ``every`` accepted: the scheduler looks at the schedule once a second
MIN_EVERY = 1.0
#: the longest ``every`` accepted (366 days); a longer period is a cron expression
MAX_EVERY = 366 * 86400.0
#: a cron expression must fire within this many years of now (cronsim gives up after 50)
CRON_HORIZON_YEARS = 50
#: an IANA time zone name: letters, digits and ``_ - +``, in ``/``-separated parts
_ZONE_NAME = re.compile(r"^[A-Za-z0-9_+\-]+(/[A-Za-z0-9_+\-]+)*$")


def every(option: str, value: Any) -> float:
    """The period of an ``every`` entry, in seconds: MIN_EVERY to MAX_EVERY."""
    if not _number(value):
        raise TypeError(f"{option} must be a number of seconds, not {type(value).__name__} {value!r:.80}")
    value = float(value)
    if not (math.isfinite(value) and MIN_EVERY <= value <= MAX_EVERY):
        raise ValueError(f"{option} must be {MIN_EVERY:g} to {MAX_EVERY:.0f} seconds, not {value!r}")
    return value


def timezone(option: str, value: Any) -> tzinfo:
    """The tzinfo of an IANA zone name (``Europe/Paris``, ``UTC``), loaded by
    zoneinfo.  Names are never paths: ``..``, a leading ``/`` and any
    character outside ``A-Za-z0-9_+-/`` are refused before zoneinfo sees them."""
    name(option, value)
    if value.upper() == "UTC":
        return dt_timezone.utc
    if not _ZONE_NAME.match(value) or ".." in value:
        raise ValueError(f"{option} {value!r:.80} is not an IANA time zone name such as Europe/Paris")
    from zoneinfo import ZoneInfo
    try:
        return ZoneInfo(value)
    except Exception as exc:          # unknown name, a directory (``Europe``), a file that is no zone
        raise ValueError(f"{option} {value!r}: no such IANA time zone ({type(exc).__name__})") from None


def cron(option: str, value: Any, zone: tzinfo) -> str:
    """A five-field cron expression that cronsim accepts and that fires at
    least once within CRON_HORIZON_YEARS of now in ``zone`` (``0 0 30 2 *``
    never does)."""
    name(option, value)
    try:
        from cronsim import CronSim, CronSimError
    except ImportError:  # pragma: no cover - depends on the install
        raise ValueError(f"{option}: cron needs the cronsim package: pip install greenq[cron]") from None
    expr = value.strip()
    try:
        next(iter(CronSim(expr, datetime.now(zone))))
    except CronSimError as exc:
        raise ValueError(f"{option} {expr!r}: {exc}") from None
    except StopIteration:
        raise ValueError(f"{option} {expr!r} never fires (no time matches within "
                         f"{CRON_HORIZON_YEARS} years)") from None
    return expr


#: the options of a schedule entry that have a value rule (cron is checked with its zone)
SCHEDULE_RULES: Dict[str, Any] = {
    "task": name,
    "every": lambda o, v: None if v is None else every(o, v),
    "timezone": timezone,
    **{key: TASK_OPTION_RULES[key] for key in ("queue", "priority", "expires", "time_limit", "soft_time_limit")},
}


def schedule_entry(spec: Dict[str, Any]) -> None:
    """Check every field of one schedule entry (``task``, ``every`` or
    ``cron``, ``timezone``, and the apply_async options) with the rules
    ``send_task`` applies.  Raises ValueError/TypeError whose ``args[1]``, when
    FieldError (a ValueError) naming the offending key."""
    for key, rule in SCHEDULE_RULES.items():
        if key in spec:
            _checked(key, spec[key], rule)
    if spec.get("cron") is not None:
        zone = _checked("timezone", spec.get("timezone") or "UTC", timezone)
        _checked("cron", spec["cron"], lambda o, v: cron(o, v, zone))
    if spec.get("args") is not None or spec.get("kwargs") is not None:
        _checked("args", spec.get("args") or [], lambda o, v: arguments(v, spec.get("kwargs") or {}))
    _checked("soft_time_limit", spec.get("soft_time_limit"),
             lambda o, v: limits(v, spec.get("time_limit")))


class FieldError(ValueError):
    """A ValueError naming the field (``key``) it is about."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


def _checked(key: str, value: Any, rule: Any) -> Any:
    try:
        return rule(key, value)
    except (TypeError, ValueError) as exc:
        raise FieldError(key, str(exc)) from None
