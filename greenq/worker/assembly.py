"""Wiring the worker's parts: the one place that decides who gets what.

``assemble`` creates the state the worker and its parts share (the lock, the
running jobs, the run queue, the held messages, the stop state, the events)
and builds each part with only the collaborators it uses: the settler gets
the broker, the result backend's port, the follow-ups and ``Held.release``;
the runners get the run queue, the reaper and the ``finish``/``settle``
callables; none of them gets the Worker.  The Worker
(greenq/worker/consumer.py) then takes these parts and runs them.

Called by the composition root (greenq/cli/worker.py ``build_worker``), and
by the Worker itself when it is constructed without parts (tests, embedding),
so there is one wiring, not two.  The callables handed to the parts are the
same functions the Worker used to hand out (``finish``, ``Held.release``,
``Settler.put``...): nothing is added on the per-task path.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional

from ..hooks import INTERNAL_HOOKS, PUBLIC_HOOKS, Hooks
from . import jobs
from ..resources.registry import Resources, check_tasks
from ..resources.step import Permits
from .admission import Admission, RateLimit
from .followups import Followups
from .jobs import Job
from .limits import Reaper
from .revocations import Revocations
from .runners import Runners, StartedRecorder
from .settle import Settler
from .state import Held, Stats, Stop, worker_name

if TYPE_CHECKING:  # pragma: no cover
    from ..app import GreenQ
    from ..drivers.base import Driver


class BackendPort:
    """The parts' port to the result backend: None until ``Worker.run`` sets
    ``backend`` (building it may connect), then the app's backend."""

    def __init__(self) -> None:
        self.backend: Any = None

    def __call__(self) -> Any:
        return self.backend


@dataclass
class WorkerParts:
    """What ``assemble`` built: the shared state, then the parts."""
    name: str
    lock: Any
    running: Dict[Job, Job]        # by itself (identity), under lock
    runq: Any                      # admitted jobs waiting for a free runner (put by runners.submit); None retires one
    room: Any                      # event: set when the held messages shrink (or on a stop)
    stopped: Any                   # event: set when the consumer loop ended
    stop: Stop
    held: Held
    backend: BackendPort
    stats: Stats
    hooks: Hooks
    reaper: Reaper
    revocations: Revocations
    settler: Settler
    admission: Admission
    runners: Runners
    finish: Callable[..., None]    # finish(job, outcome, reason=None): a job that will not run, to the settler
    resources: Optional[Resources] = None   # the permit pools (greenq/resources/), shared with app.resource


def assemble(app: "GreenQ", driver: "Driver", *, name: Optional[str] = None, max_tasks: int = 0,
             shutdown_timeout: float = 30.0) -> WorkerParts:
    """Build the parts of a worker of ``app`` under ``driver`` (which the app
    then routes its blocking calls through).  ``max_tasks``: stop after that
    many settled messages (0: never); ``shutdown_timeout``: named in the warm
    stop's log line and waited by the Worker."""
    app.set_driver(driver)
    config, codec, broker = app.config, app.codec, app.broker
    lock = driver.lock()
    running: Dict[Job, Job] = {}
    runq = driver.queue()
    room = driver.event()
    stopped = driver.event()
    stop = Stop(room, broker.interrupt, shutdown_timeout)
    held = Held(lock, room, stop, max_tasks)
    backend = BackendPort()
    stats = Stats()
    hooks = Hooks(PUBLIC_HOOKS + INTERNAL_HOOKS)
    stats.subscribe(hooks)
    tasks = list(app.tasks.values())
    started = StartedRecorder(codec, backend, bool(config.worker.get("track_started", False)))
    if started.default or any(t.option("track_started") for t in tasks):
        hooks.on("task_prerun", started)     # subscribers cost per task: only when needed
    if config.tracing:                       # consumer spans (greenq/tracing.py), before the app's hooks
        from ..tracing import instrument_worker
        instrument_worker(hooks)
    hooks.extend(app.hooks)                  # the app's hooks run after the worker's own
    label = worker_name(name)
    started.hostname = label                 # Celery's STARTED names the worker
    reaper = Reaper(driver, lock, running, stopped)
    revocations = Revocations(driver, backend, lambda: config.result_expires, reaper.terminate, stopped)
    settler = Settler(broker, backend, codec, Followups(app, codec, broker, backend),
                      release=held.release, hooks=hooks, driver=driver,
                      stopping=lambda: stop.state, worker_name=label)
    settle = settler.put

    def finish(job: Job, outcome: str, reason: Optional[str] = None) -> None:
        """Hand a job that will not run to the settler."""
        if job.admitted is not None:
            admission.release(job)
        job.outcome, job.reason = outcome, reason
        settle(job)

    def defer(job: Job, eta: float) -> None:
        """An admission step deferred ``job``: back to the broker, due at ``eta``."""
        assert job.msg is not None, "admission sees decoded messages only"
        job.msg = dataclasses.replace(job.msg, eta=eta)
        finish(job, jobs.DEFER, reason="deferred by admission")

    runners = Runners(driver, runq, hooks, broker, lock=lock, running=running,
                      revoked=revocations.ids, reaper=reaper, finish=finish,
                      settle=settle, release=lambda job: admission.release(job), stopping=lambda: stop.state,
                      stats=stats)
    # admitted jobs go to the runners' submit: a runner is spawned for one when none is idle
    admission = Admission(driver, run=runners.submit, defer=defer)
    admission.pull = True                    # the runners take what the permits step grants (take)
    admission.on_room = room.set
    if any(t.option("rate_limit") for t in tasks):
        admission.add(RateLimit())
    resources = Resources(config, app_key=config.key_prefix, driver=driver)
    check_tasks(tasks, resources.settings)   # a resource with no section: a ConfigError at start
    app.set_permits(resources)
    if any(t.option("resources") for t in tasks):
        admission.add(Permits(resources, wait_warning=float(config.worker.get("resource_wait_warning", 30.0))))
    runners.take, runners.release = admission.take, admission.release
    return WorkerParts(label, lock, running, runq, room, stopped, stop, held, backend, stats, hooks,
                       reaper, revocations, settler, admission, runners, finish, resources)
