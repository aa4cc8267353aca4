"""The worker's layering: the control plane uses the Worker's operations, the
parts get only what they use, and worker/ and control/ do not import each
other's way round (read from the source: an import-graph check)."""
from __future__ import annotations

import ast
import time
from pathlib import Path
from types import SimpleNamespace as NS

import greenq
from greenq import GreenQ
from greenq.control.commands import COMMANDS
from greenq.drivers import get_driver

ROOT = Path(greenq.__file__).resolve().parent


def imports_of(path: Path) -> set:
    """Every module ``path`` imports (relative imports resolved), at any depth
    of the file, TYPE_CHECKING blocks included."""
    package = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[:len(parts) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def test_control_does_not_import_the_worker_consumer_and_the_consumer_not_control():
    consumer = "greenq.worker.consumer"
    offenders = [p.name for p in (ROOT / "control").glob("*.py") if consumer in imports_of(p)]
    assert offenders == [], f"greenq/control modules importing {consumer}: {offenders}"
    parts = [p.name for p in (ROOT / "worker").glob("*.py")
             if p.name != "consumer.py" and consumer in imports_of(p)]
    assert parts == [], f"worker parts importing {consumer} back: {parts}"
    back = sorted(m for m in imports_of(ROOT / "worker" / "consumer.py") if m.startswith("greenq.control"))
    assert back == [], f"worker/consumer.py imports the control plane: {back}"


def test_the_import_check_sees_relative_imports(tmp_path):
    """The check itself: a relative import of the consumer is found."""
    fake = ROOT / "control" / "agent.py"
    assert "greenq.worker.state" in imports_of(fake)        # from ..worker.state import ...
    assert "greenq.control.commands" in imports_of(fake)    # from .commands import ...


class FakeWorker:
    """A ControlledWorker (greenq/control/commands.py) that records the operations called."""

    def __init__(self):
        self.calls = []
        self.concurrency = 2
        self.driver = NS(name="threads")

    def resize(self, concurrency):
        self.calls.append(("resize", concurrency))
        self.concurrency = concurrency

    def add_queue(self, queue):
        self.calls.append(("add_queue", queue))
        return queue != "known"

    def cancel_queue(self, queue):
        self.calls.append(("cancel_queue", queue))
        return queue == "known"

    def set_rate_limit(self, task, rate):
        self.calls.append(("set_rate_limit", task, rate))

    def task_names(self):
        return ["b", "a"]


def test_commands_call_the_workers_operations():
    w = FakeWorker()
    agent = NS(worker=w)
    assert COMMANDS["pool_grow"](agent, n=3) == "pool grown by 3 to 5"
    assert COMMANDS["pool_shrink"](agent, n=10) == "pool shrunk by 4 to 1"
    assert COMMANDS["add_consumer"](agent, queue="new") == "now consuming new"
    assert COMMANDS["add_consumer"](agent, queue="known") == "already consuming known"
    assert COMMANDS["cancel_consumer"](agent, queue="known") == "no longer consuming known"
    assert COMMANDS["cancel_consumer"](agent, queue="other") == "not consuming other"
    assert COMMANDS["rate_limit"](agent, task="a", rate="5/s") == "a: rate limit set to 5/s"
    assert COMMANDS["rate_limit"](agent, task="a", rate="off") == "a: rate limit removed"
    assert COMMANDS["registered"](agent) == ["b", "a"]
    assert w.calls == [("resize", 5), ("resize", 1), ("add_queue", "new"), ("add_queue", "known"),
                       ("cancel_queue", "known"), ("cancel_queue", "other"),
                       ("set_rate_limit", "a", "5/s"), ("set_rate_limit", "a", None)]


def test_the_worker_operations_change_the_real_worker():
    from greenq.worker.consumer import Worker
    app = GreenQ("ports", broker=f"memory://ports-{time.monotonic_ns()}")

    @app.task
    def noop():
        return None
    w = Worker(app, get_driver("threads"), queues=["default"], concurrency=2)
    from greenq.config import effective_prefetch
    w.resize(4)
    assert (w.concurrency, w.prefetch) == (4, effective_prefetch(4, 0)) and len(w.runners.all) == 2  # two more
    w.resize(1)
    assert w.concurrency == 1 and [w.runq.get(block=False) for _ in range(3)] == [None] * 3
    assert w.add_queue("extra") and not w.add_queue("extra") and w.queues == ["default", "extra"]
    assert w.cancel_queue("extra") and not w.cancel_queue("extra")
    try:
        w.cancel_queue("default")
    except ValueError as exc:
        assert "only queue" in str(exc)
    else:
        raise AssertionError("the last queue was cancelled")
    try:
        w.set_rate_limit("nope", "1/s")
    except ValueError as exc:
        assert "unknown task" in str(exc)
    else:
        raise AssertionError("an unknown task got a rate limit")
    w.request_stop(cold=True)
    w.runners.stop()


def test_the_composition_root_attaches_the_control_agent_only_when_asked():
    from greenq.cli.worker import build_worker
    from greenq.config import load
    from greenq.control.agent import ControlAgent
    for control in (True, False):
        url = f"memory://root-{time.monotonic_ns()}"
        cfg = load(search=False, env={"GREENQ_BROKER_URL": url})
        cfg.set("worker", "control", control, origin="test")
        app = GreenQ("root", config=cfg)
        w = build_worker(app, get_driver("threads"), queues=["default"], concurrency=1, name="n1")
        agents = [s for s in w.services if isinstance(s, ControlAgent)]
        assert len(agents) == (1 if control else 0)
        if control:
            assert agents[0].worker is w and agents[0].name == "n1"
        app.close()


def test_a_settler_is_built_without_a_worker():
    """The settler gets the broker, backend, follow-ups and a release callback."""
    from greenq.worker import jobs
    from greenq.worker.followups import Followups
    from greenq.worker.jobs import Job
    from greenq.worker.settle import Settler
    from greenq.worker.state import StopState
    app = GreenQ("settle", broker=f"memory://settle-{time.monotonic_ns()}")

    @app.task
    def add(x, y):
        return x + y
    driver = get_driver("threads")
    result = add.delay(2, 3)
    broker = app.broker
    [delivery] = broker.fetch(["default"], 1, 1.0)
    released = []
    settler = Settler(broker, lambda: app.backend, app.codec, Followups(app, app.codec, broker, lambda: app.backend),
                      release=released.extend, hooks=NS(emit=lambda *a: None), driver=driver,
                      stopping=lambda: StopState.RUNNING, worker_name="w")
    j = Job(delivery, app.codec.decode(delivery.body), add)
    j.outcome, j.value = jobs.SUCCESS, 5
    settler.settle([j])
    assert released == [j]
    assert result.get(timeout=5) == 5
    app.close()


def reaches(start, target_type, limit=50000):
    """Whether an object of ``target_type`` is reachable from ``start`` through
    attributes, bound methods' ``__self__``, closures and containers (not
    through classes or modules)."""
    import types
    seen, todo = set(), [start]
    while todo:
        assert len(seen) < limit, "the object graph is larger than the check expects"
        obj = todo.pop()
        if id(obj) in seen or isinstance(obj, (type, types.ModuleType, str, bytes, int, float)):
            continue
        seen.add(id(obj))
        if isinstance(obj, target_type):
            return True
        if isinstance(obj, types.MethodType):
            todo.append(obj.__self__)
            todo.append(obj.__func__)
        elif isinstance(obj, types.FunctionType):
            todo.extend(c.cell_contents for c in obj.__closure__ or () if c.cell_contents is not None)
        elif isinstance(obj, dict):
            todo.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            todo.extend(obj)
        if hasattr(obj, "__dict__") and not isinstance(obj, (types.FunctionType, types.MethodType)):
            todo.extend(vars(obj).values())
    return False


def test_the_assembly_hands_each_part_only_what_it_uses_never_the_worker():
    """build_worker has the parts assembled before the Worker exists and gives
    them to it: no part (nor a callable a part holds) reaches the Worker."""
    from greenq.cli.worker import build_worker
    from greenq.worker.consumer import Worker
    app = GreenQ("assembly", broker=f"memory://assembly-{time.monotonic_ns()}")

    @app.task(rate_limit="10/s", track_started=True)    # the optional parts too: RateLimit, STARTED records
    def noop():
        return None
    w = build_worker(app, get_driver("threads"), queues=["default"], concurrency=2, name="n1", max_tasks=7,
                     shutdown_timeout=3.0)
    parts = w.parts
    assert (w.name, w.max_tasks, w.shutdown_timeout) == ("n1", 7, 3.0)
    assert (w.settler, w.runners, w.reaper, w.admission, w.revocations) == (
        parts.settler, parts.runners, parts.reaper, parts.admission, parts.revocations)
    assert w.runq is parts.runq and w.running is parts.running and w.held is parts.held.messages
    # the settler: the broker, the backend's port, the follow-ups and a release callback (Held's)
    assert parts.settler._release == parts.held.release and parts.settler.broker is app.broker
    assert parts.runners.finish is parts.finish and parts.runners.settle == parts.settler.put
    for label in ("settler", "runners", "reaper", "admission", "revocations", "held", "stop", "finish"):
        assert not reaches(getattr(parts, label), Worker), f"the {label} reaches the Worker"
    # the check itself: a part wired with a callback into the Worker is caught
    parts.settler._release = w.release
    assert reaches(parts.settler, Worker)
    app.close()


def test_a_worker_built_without_parts_assembles_them_the_one_way(monkeypatch):
    import greenq.worker.consumer as consumer
    from greenq.worker.assembly import assemble
    calls = []

    def counting(*a, **kw):
        calls.append(kw)
        return assemble(*a, **kw)
    monkeypatch.setattr(consumer, "assemble", counting)
    app = GreenQ("one-way", broker=f"memory://one-way-{time.monotonic_ns()}")
    w = consumer.Worker(app, get_driver("threads"), queues=["default"], concurrency=1, max_tasks=2, name="x")
    assert calls == [{"name": "x", "max_tasks": 2, "shutdown_timeout": 30.0}] and w.name == "x"
    app.close()


def test_held_messages_make_room_and_stop_the_worker_after_max_tasks():
    from greenq.brokers.base import Delivery
    from greenq.worker.state import Held, Stop, StopState
    driver = get_driver("threads")
    room, interrupted = driver.event(), []
    stop = Stop(room, lambda: interrupted.append(1), 5.0)
    held = Held(driver.lock(), room, stop, max_tasks=3)
    deliveries = [Delivery("q", b"x" * n, f"m{n}", 1, n) for n in (1, 2, 3)]   # held by themselves
    held.add(deliveries)
    assert (len(held.messages), held.bytes) == (3, 6)
    held.release([NS(delivery=deliveries[0]), NS(delivery=deliveries[1])])
    assert (len(held.messages), held.bytes, held.done) == (1, 3, 2)
    assert room.is_set() and stop.state == StopState.RUNNING and not interrupted
    held.release([NS(delivery=deliveries[2])])
    assert held.bytes == 0 and stop.state == StopState.WARM and interrupted == [1]
    stop.request(cold=True)
    assert stop.state == StopState.COLD and interrupted == [1, 1]


def test_the_monitor_uses_only_what_monitored_declares():
    """Monitor takes a Monitored (greenq/worker/monitor.py): an object with
    just those members is enough for /healthz and /metrics."""
    from greenq.hooks import PUBLIC_HOOKS, Hooks
    from greenq.worker.monitor import Monitor, Monitored
    from greenq.worker.state import Snapshot, Stats, StopState
    members = {name for name in vars(Monitored) if not name.startswith("_")}
    assert members == {"driver", "hooks", "stats", "runners", "broker", "queues", "fetch_timeout",
                       "config", "snapshot", "resource_stats", "resource_waits"}
    snap = Snapshot("threads", 2, 8, ["default"], StopState.RUNNING, None, 0.1, 0.0, 0)
    fake = NS(driver=get_driver("threads"), hooks=Hooks(PUBLIC_HOOKS), stats=Stats(),
              runners=NS(job_of_frame=lambda frame: None), broker=NS(healthy=True), queues=["default"],
              fetch_timeout=1.0, config=NS(lease_seconds=60.0), snapshot=lambda: snap,
              resource_stats=lambda: {}, resource_waits=lambda: {})
    monitor = Monitor(fake, 0, "")
    ok, body = monitor.healthy()
    assert ok and body["status"] == "ok"
    assert "greenq_concurrency 2" in monitor.metrics() and "greenq_up 1" in monitor.metrics()
