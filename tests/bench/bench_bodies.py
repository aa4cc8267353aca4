"""The task bodies every benchmarked system runs, and the completion probe.

Each system's tasks module (bench_greenq_tasks, bench_celery_tasks,
bench_dramatiq_tasks) registers these same three functions under the same
names, wrapped by :func:`counted`.

The probe is how the driver learns that a drain is over without touching the
broker or adding I/O to the tasks: the wrapper keeps an integer and two
timestamps in the worker's memory (well under a microsecond per task, the same
for every system) and, when the ``BENCH_PROBE_EXPECT``-th task has returned,
writes one small JSON file (``BENCH_PROBE_FILE``) with the time the first task
started, the time the last one ended, and the CPU time the worker process
(every thread of it) used in between.  ``time.monotonic`` is the system-wide
CLOCK_MONOTONIC on Linux, so the driver can compare it with its own clock.
With ``--instructions`` (``BENCH_CALLGRIND=1``, the worker under callgrind)
the first task switches callgrind's counting on and the last one off, and the
report says how many tasks ran wholly while it counted.
"""
from __future__ import annotations

import functools
import json
import os
import sys
import time
from typing import Any, Callable

_EXPECT = int(os.environ.get("BENCH_PROBE_EXPECT") or 0)
_PATH = os.environ.get("BENCH_PROBE_FILE") or ""
_CALLGRIND = os.environ.get("BENCH_CALLGRIND") == "1"    # --instructions: the worker runs under callgrind
_seen = {"started": 0, "done": 0, "first_start": 0.0, "first_cpu": 0.0, "started_uncounted": 0}


def noop() -> None:
    """Nothing at all: what is measured is the queue's own overhead."""


def sleep(seconds: float) -> None:
    """An I/O-bound task: a cooperative sleep in a patched worker."""
    time.sleep(seconds)


def echo(value: Any) -> Any:
    """Returns its argument: the round-trip task."""
    return value


def counted(body: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap ``body`` so the worker reports when the expected count has run."""
    @functools.wraps(body)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not _seen["started"]:
            _seen["first_start"] = time.monotonic()
            _seen["first_cpu"] = time.process_time()
        _seen["started"] += 1
        if _CALLGRIND and _seen["started"] == 1:
            _callgrind("on")           # this task and those started meanwhile are not (fully) counted
            _seen["started_uncounted"] = _seen["started"]
        try:
            return body(*args, **kwargs)
        finally:
            _seen["done"] += 1
            if _seen["done"] == _EXPECT and _PATH:
                if _CALLGRIND:
                    _callgrind("off")
                _report(time.monotonic(), time.process_time())
    return wrapper


def _report(last_end: float, last_cpu: float) -> None:
    record = {"first_start": _seen["first_start"], "last_end": last_end,
              "cpu_seconds": last_cpu - _seen["first_cpu"],
              "done": _seen["done"], "pid": os.getpid(),
              "counted": _seen["done"] - _seen["started_uncounted"] if _CALLGRIND else None,
              "greenq_file": getattr(sys.modules.get("greenq"), "__file__", None)}
    tmp = f"{_PATH}.{os.getpid()}.tmp"
    with open(tmp, "w") as out:
        json.dump(record, out)
    os.replace(tmp, _PATH)


def _callgrind(state: str) -> None:
    """Switch callgrind's counting on or off in this process (callgrind_control
    returns once valgrind has done it; tasks of other greenlets may run meanwhile)."""
    import subprocess
    subprocess.run(["callgrind_control", f"--instr={state}", str(os.getpid())],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
