"""Tasks of tests/bench/inflight_memory.py, imported by its ``greenq-worker``
(``-A inflight_tasks``) and by its client side.

``inflight.hold(seconds)`` sleeps cooperatively (``time.sleep``, patched by
the worker's driver): a task in flight that does nothing else.

With ``INFLIGHT_READY=PATH``, the worker writes PATH once all its runners
have started and wait for work (0 in flight, every runner's stack made), or,
where runners are spawned on demand, once it is ready (0 in flight, no runner).
With ``INFLIGHT_TRACEMALLOC=FRAMES`` and ``INFLIGHT_DUMPS=DIR`` in its
environment, the worker starts tracemalloc in ``worker_process_init`` and,
writes ``DIR/dump-0.json`` there, before the runners start; then on each
SIGUSR2 the next, ``DIR/dump-N.json`` (N = 1, 2, ...; written whole, then
renamed): what tracemalloc traces now, its top allocation sites by
file:line as a difference from the previous dump (the first: from the start),
and the greenlets alive with the bytes of C stack each keeps saved.
"""
import gc
import json
import os
import signal
import sys
import time
import tracemalloc

from greenq import GreenQ

app = GreenQ.from_config(name="inflight")

#: how many sites a dump lists
TOP = 25


@app.task(name="inflight.hold", ignore_result=True)
def hold(seconds):
    time.sleep(seconds)


def _greenlets():
    """(count, bytes of C stack saved) of the live greenlets."""
    try:
        from greenlet import greenlet
    except ImportError:     # pragma: no cover - every green driver has it
        return 0, 0
    count = saved = 0
    for obj in gc.get_objects():
        if isinstance(obj, greenlet):
            count += 1
            saved += getattr(obj, "_stack_saved", 0)
    return count, saved


def _site(stat):
    frame = stat.traceback[0]
    return f"{frame.filename}:{frame.lineno}"


def _shorten(path, roots):
    for root in roots:
        if path.startswith(root):
            return path[len(root):].lstrip("/")
    return path


class _Dumper:
    def __init__(self, directory):
        self.directory = directory
        self.previous = None
        self.index = 0
        paths = sorted({os.path.dirname(os.path.dirname(os.path.abspath(__import__("greenq").__file__)))}
                       | {p for p in sys.path if p and os.path.isdir(p)}, key=len, reverse=True)
        self.roots = [p.rstrip("/") + "/" for p in paths]

    def dump(self):
        gc.collect()
        count, saved = _greenlets()
        snapshot = tracemalloc.take_snapshot().filter_traces((
            tracemalloc.Filter(False, tracemalloc.__file__),
            tracemalloc.Filter(False, "<frozen importlib._bootstrap>"),
            tracemalloc.Filter(False, "<frozen importlib._bootstrap_external>"),
        ))
        traced = sum(stat.size for stat in snapshot.statistics("filename"))
        if self.previous is None:
            stats = snapshot.statistics("lineno")[:TOP]
            top = [{"site": _shorten(_site(s), self.roots), "size": s.size, "count": s.count} for s in stats]
        else:
            stats = snapshot.compare_to(self.previous, "lineno")[:TOP]
            top = [{"site": _shorten(_site(s), self.roots), "size": s.size_diff, "count": s.count_diff}
                   for s in stats]
        self.previous = snapshot
        record = {"index": self.index, "traced": traced, "greenlets": count, "stack_saved": saved,
                  "top": top}
        path = os.path.join(self.directory, f"dump-{self.index}.json")
        with open(path + ".tmp", "w") as fh:
            json.dump(record, fh)
        os.replace(path + ".tmp", path)
        self.index += 1


def _mark_ready(worker, path):
    """Write ``path`` once every runner of ``worker`` has started and waits
    for work; with runners spawned on demand (a green pool since they are),
    once the worker allows its concurrency (none is spawned before work)."""
    runners = worker.runners
    if getattr(runners, "on_demand", False):
        while runners.target < worker.concurrency:
            worker.driver.sleep(0.05)
    else:
        while len(runners.all) < worker.concurrency or any(r.frame is None for r in runners.all):
            worker.driver.sleep(0.05)
    with open(path, "w") as fh:
        fh.write(f"{os.getpid()}\n")


@app.on("worker_process_init")
def _start_tracing(worker):
    ready = os.environ.get("INFLIGHT_READY")
    if ready:
        worker.driver.spawn(_mark_ready, worker, ready)
    frames = os.environ.get("INFLIGHT_TRACEMALLOC")
    directory = os.environ.get("INFLIGHT_DUMPS")
    if not (frames and directory):
        return
    tracemalloc.start(int(frames))
    dumper = _Dumper(directory)
    dumper.dump()       # dump-0: before the runners start (what they cost is in dump-1)
    wanted = worker.driver.event()

    def loop():
        while True:
            wanted.wait()
            wanted.clear()
            dumper.dump()

    worker.driver.spawn(loop)
    worker.driver.install_signal(signal.SIGUSR2, wanted.set)
