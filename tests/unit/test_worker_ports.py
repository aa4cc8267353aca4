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
