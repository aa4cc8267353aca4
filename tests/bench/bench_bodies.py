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

With ``BENCH_PROBE_SPLIT=1`` (a worker of several processes, ``greenq-worker
--processes N``: no process knows when the others are done) each process keeps
a slot of its own instead, ``BENCH_PROBE_FILE.<pid>.slot``, mapped in memory:
its task count, its first task's start and CPU time, and its last task's end,
written after every task (a ``pack_into``, no system call).  The driver adds
the counts up and reads each process's CPU time (``/proc/<pid>/task/*/schedstat``,
the clock ``time.process_time`` reads) when they reach the expected total.

``incr_setnx`` is the body of the limit scenario: one INCR and one SETNX on
Redis (``BENCH_BODY_REDIS_URL``, keys under ``bench-body:``) through a client
of the module, created at the first call in each process (after the pool
patched it; a forked child makes its own), with a pool of
``BENCH_CONCURRENCY`` + 20 connections, as the peers' broker pools.
"""
from __future__ import annotations

import functools
import json
import mmap
import os
import struct
import sys
import time
from typing import Any, Callable

_EXPECT = int(os.environ.get("BENCH_PROBE_EXPECT") or 0)
_PATH = os.environ.get("BENCH_PROBE_FILE") or ""
_CALLGRIND = os.environ.get("BENCH_CALLGRIND") == "1"    # --instructions: the worker runs under callgrind
_SPLIT = os.environ.get("BENCH_PROBE_SPLIT") == "1"      # one slot per process (greenq --processes N)
SLOT = struct.Struct("<qddd")                              # done, first start, first CPU, last end
BODY_PREFIX = "bench-body:"
_seen = {"started": 0, "done": 0, "first_start": 0.0, "first_cpu": 0.0, "started_uncounted": 0}


def noop() -> None:
    """Nothing at all: what is measured is the queue's own overhead."""


def sleep(seconds: float) -> None:
    """An I/O-bound task: a cooperative sleep in a patched worker."""
    time.sleep(seconds)


def echo(value: Any) -> Any:
    """Returns its argument: the round-trip task."""
    return value


_body: dict = {"client": None}


def _forget_body_client() -> None:
    _body["client"] = None


os.register_at_fork(after_in_child=_forget_body_client)


def body_client() -> Any:
    """The module's Redis client for ``incr_setnx``, created in this process."""
    client = _body["client"]
    if client is None:
        import redis
        url = os.environ.get("BENCH_BODY_REDIS_URL") or "redis://127.0.0.1:6379/14"
        size = int(os.environ.get("BENCH_CONCURRENCY") or 100) + 20
        client = redis.Redis(connection_pool=redis.ConnectionPool.from_url(url, max_connections=size))
        _body["client"] = client
    return client


def incr_setnx() -> None:
    """One INCR and one SETNX on Redis: a task that does a little I/O."""
    client = _body["client"] or body_client()
    n = client.incr(BODY_PREFIX + "calls")
    client.setnx(f"{BODY_PREFIX}seen:{n}", 1)


def counted(body: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap ``body`` so the worker reports when the expected count has run."""
    if _SPLIT:
        return _counted_split(body)
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


def _counted_split(body: Callable[..., Any]) -> Callable[..., Any]:
    slot: list = []

    @functools.wraps(body)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not slot:
            slot.append(_open_slot())
        try:
            return body(*args, **kwargs)
        finally:
            _seen["done"] += 1
            SLOT.pack_into(slot[0], 0, _seen["done"], _seen["first_start"], _seen["first_cpu"],
                           time.monotonic())
    return wrapper


def _open_slot() -> mmap.mmap:
    _seen["first_start"] = time.monotonic()
    _seen["first_cpu"] = time.process_time()
    path = f"{_PATH}.{os.getpid()}.slot"
    with open(path, "wb+") as f:
        f.write(SLOT.pack(0, _seen["first_start"], _seen["first_cpu"], 0.0))
        f.flush()
        return mmap.mmap(f.fileno(), SLOT.size)


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
