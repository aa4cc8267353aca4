"""``greenq-worker``: parse the command line, build the app, run the worker.

Reached through greenq.worker.launch, which has already patched the process.

This module is the worker's composition root (``build_worker``): it has the
worker's parts built (greenq/worker/assembly.py ``assemble``: each part with
only the collaborators it uses, none with the Worker) and hands them to the
Worker (greenq/worker/consumer.py); what lives in another package -- the
control agent (greenq/control/) and the monitor -- is built here and handed
the worker, so worker/ and control/ never import each other's modules that
way round.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import TYPE_CHECKING, Any, List, NoReturn, Optional

from .. import config as config_module
from ..exceptions import BrokerError, ConfigError
from .common import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, check_app, load_app

if TYPE_CHECKING:  # pragma: no cover
    from ..worker.consumer import Worker

log = logging.getLogger("greenq.worker")

#: Celery worker flags greenq accepts and ignores: it has no gossip or mingle
#: step, and its heartbeats are the control plane's (--without-control)
CELERY_NO_OPS = ("gossip", "mingle", "heartbeat")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # exit 2 with the flag named, as argparse does
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"greenq-worker: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="greenq-worker", description="Run a greenq worker.")
    p.add_argument("-A", "--app", metavar="MODULE[:ATTR]",
                   help="module holding the GreenQ app (default: [greenq] app)")
    p.add_argument("-P", "--pool", choices=config_module.POOLS, help="concurrency driver (default gevent)")
    p.add_argument("-c", "--concurrency", type=int, metavar="N", help="tasks run at once")
    p.add_argument("-Q", "--queues", metavar="Q1,Q2", help="queues to consume")
    p.add_argument("--config", metavar="FILE",
                   help="INI file (default: $GREENQ_CONFIG, ./greenq.ini, /etc/greenq/greenq.ini)")
    p.add_argument("--broker", metavar="URL", help="broker URL")
    p.add_argument("--backend", metavar="URL", help="result backend URL")
    p.add_argument("--processes", type=int, metavar="N", help="worker processes under a supervisor")
    p.add_argument("--prefetch", type=int, metavar="N", help="messages held at once (0 = auto)")
    p.add_argument("--loglevel", "-l", metavar="LEVEL", help="DEBUG, INFO, WARNING, ERROR")
    p.add_argument("--http", metavar="HOST:PORT", help="serve /metrics and /healthz")
    p.add_argument("--max-tasks-per-child", type=int, metavar="N",
                   help="replace a worker process after N tasks (0 = never)")
    p.add_argument("--max-memory-per-child", metavar="SIZE",
                   help="replace a worker process that grows past SIZE: MiB, or with a unit "
                        "(200MB, 200000KiB); 0 = off")
    p.add_argument("--shutdown-timeout", type=float, metavar="S",
                   help="seconds running tasks get to finish on SIGTERM")
    p.add_argument("--blocking-threshold", type=float, metavar="S",
                   help="seconds the hub may block before a warning with the stack (0 = off)")
    p.add_argument("--burst", action="store_true", help="process what is queued, then exit 0")
    p.add_argument("-B", "--beat", action="store_true", help="also run the periodic-task scheduler")
    p.add_argument("-n", "--name", "--hostname", metavar="NAME",
                   help="worker name (%%h = host name, %%n = its first label, %%d = its domain, "
                        "%%i = process index, %%p = pid); default greenq@%%h, and under --processes "
                        "N greenq-<index>@%%h")
    p.add_argument("--time-limit", type=float, metavar="S",
                   help="hard time limit of every task that sets none (Celery's --time-limit)")
    p.add_argument("--soft-time-limit", type=float, metavar="S",
                   help="soft time limit of every task that sets none (Celery's --soft-time-limit)")
    p.add_argument("-O", dest="optimization", choices=("fair", "default"),
                   help="accepted for Celery's spelling: a free runner always takes the next "
                        "message, as Celery's -O fair does")
    for part in CELERY_NO_OPS:
        p.add_argument(f"--without-{part}", action="append_const", const=f"--without-{part}",
                       dest="no_ops", help="accepted for Celery's spelling; does nothing (docs/worker.md)")
    p.add_argument("-E", "--events", action="store_const", const=True, help="send task events")
    p.add_argument("--without-control", action="store_const", const=False, dest="control",
                   help="no heartbeats, no inspect/control answers")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # started by the supervisor
    return p


def _overrides(args: argparse.Namespace) -> dict:
    w = "worker"
    return {
        ("greenq", "broker_url"): args.broker, ("greenq", "result_backend"): args.backend,
        (w, "pool"): args.pool, (w, "concurrency"): args.concurrency, (w, "queues"): args.queues,
        (w, "processes"): args.processes, (w, "prefetch"): args.prefetch,
        (w, "loglevel"): args.loglevel.upper() if args.loglevel else None, (w, "http"): args.http,
        (w, "max_tasks_per_child"): args.max_tasks_per_child,
        (w, "max_memory_per_child"): args.max_memory_per_child,
        (w, "shutdown_timeout"): args.shutdown_timeout,
        (w, "blocking_threshold"): args.blocking_threshold,
        (w, "events"): args.events, (w, "control"): args.control,
    }


def banner(app: Any, pool: str, pool_source: str) -> str:
    """The start-up lines: version, app, pool, broker, backend, and every
    registered task with the limits it will run with."""
    from .. import __version__
    from ..backends import backend_url_for
    cfg = app.config
    lines = [f"greenq {__version__} worker: app={app.name!r} key_prefix={cfg.key_prefix!r} "
             f"pool={pool} ({pool_source}) broker={config_module.mask_url(cfg.broker_url)} "
             f"backend={config_module.mask_url(backend_url_for(cfg))}"]
    tasks = sorted(app.tasks.values(), key=lambda t: t.name)
    lines.append(f"  {len(tasks)} registered task(s):")
    for task in tasks:
        queue = task.option("queue") or app.route(task.name) or cfg.default_queue
        parts = [f"queue={queue}", f"max_retries={task.option('max_retries')}"]
        parts += [f"{key}={task.option(key)}" for key in ("soft_time_limit", "time_limit", "rate_limit")
                  if task.option(key)]
        if not task.option("acks_late"):
            parts.append("acks_late=False")
        lines.append(f"    {task.name} [{', '.join(parts)}]")
    return "\n".join(lines)


def child_name(name: Optional[str], processes: int) -> str:
    """A supervised child's name: ``-n NAME`` (default ``greenq@%h``) with
    ``%i`` its index; under ``--processes N`` (N > 1) a name without ``%i``
    gets ``-<index>`` after its name part, ``greenq-1@host`` (``NAME-1``
    without an ``@``), so no two children answer to one name.  The index is
    the supervisor's slot: a replacement keeps its name."""
    from ..worker.monitor import HEARTBEAT_ENV
    from ..worker.state import DEFAULT_NAME, worker_name
    name = name or DEFAULT_NAME
    slot = os.path.basename(os.environ.get(HEARTBEAT_ENV, "")).rpartition("-")[2]
    if not slot.isdigit():
        slot = str(os.getpid())
    if processes > 1 and "%i" not in name:
        part, at, host = name.partition("@")
        name = f"{part}-{slot}{at}{host}"
    return worker_name(name, int(slot))


def default_time_limits(app: Any, args: argparse.Namespace) -> None:
    """``--time-limit`` / ``--soft-time-limit``: the limits of every
    registered task that has none of its own (decorator or ``[task:NAME]``),
    as Celery's worker flags are; a message's own limits still win.  A soft
    default above a task's own hard limit is left out for that task (it
    would never fire)."""
    for key, value in (("time_limit", args.time_limit), ("soft_time_limit", args.soft_time_limit)):
        if value is None:
            continue
        for task in app.tasks.values():
            hard = task.option("time_limit")
            if task.option(key) is None and not (key == "soft_time_limit" and hard and value > hard):
                app.config.set(f"task:{task.name}", key, value, origin=f"option --{key.replace('_', '-')}")


def celery_notes(args: argparse.Namespace) -> List[str]:
    """One line per Celery flag accepted without effect, saying why."""
    notes = [f"{flag}: accepted for Celery's spelling; greenq has no gossip, mingle or Celery "
             f"heartbeat step to turn off (its own heartbeats stop with --without-control)"
             for flag in args.no_ops or ()]
    if args.optimization:
        notes.append(f"-O {args.optimization}: accepted for Celery's spelling; a free runner always "
                     f"takes the next message held, as Celery's -O fair does")
    return notes


def build_worker(app: Any, driver: Any, *, name: Optional[str] = None, **options: Any) -> "Worker":
    """A worker for ``app`` under ``driver``, with its control agent attached
    (unless ``[worker] control`` is off).  ``options``: Worker's (queues,
    concurrency, prefetch, burst, shutdown_timeout, max_tasks...);
    ``name``, ``max_tasks`` and ``shutdown_timeout`` go to the parts."""
    from ..control.agent import ControlAgent
    from ..worker.assembly import assemble
    from ..worker.consumer import Worker
    parts = assemble(app, driver, name=name, max_tasks=options.pop("max_tasks", 0),
                     shutdown_timeout=options.pop("shutdown_timeout", 30.0))
    worker = Worker(app, driver, parts=parts, **options)
    if app.config.worker["control"]:
        worker.attach(ControlAgent(worker, worker.name, events=app.config.worker["events"]))
    return worker


def main(argv: Optional[List[str]] = None, driver: Any = None, pool_source: str = "") -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = config_module.load(args.config, overrides=_overrides(args), quiet=True)
    except ConfigError as exc:
        sys.stderr.write(f"greenq-worker: error: {exc}\n")
        return EXIT_USAGE
    w = cfg.worker
    from .. import logs
    try:
        logs.setup(w["loglevel"], cfg.logging_config or None)
    except ConfigError as exc:
        sys.stderr.write(f"greenq-worker: error: {exc}\n")
        return EXIT_USAGE
    # a supervised child stays silent: its supervisor said it already
    config_module.report(cfg, (lambda message: None) if args.child else None, take_over=True)
    if driver is None or driver.name != w["pool"]:
        sys.stderr.write(f"greenq-worker: error: pool {w['pool']!r} was not patched at start-up; "
                         f"start through the greenq-worker launcher\n")
        return EXIT_USAGE
    try:  # the supervisor too: a mistake is reported once, before any child starts
        app = load_app(args.app, cfg)
        default_time_limits(app, args)
        warnings = check_app(app)
    except ConfigError as exc:
        sys.stderr.write(f"greenq-worker: error: {exc}\n")
        return EXIT_USAGE
    if not args.child:
        for message in warnings:
            log.warning("%s", message)
        for message in celery_notes(args):
            log.info("%s", message)
    supervised = w["processes"] > 1 or w["max_tasks_per_child"] or w["max_memory_per_child"]
    if supervised and not args.child:
        from ..worker.supervisor import Supervisor
        return Supervisor(argv if argv is not None else sys.argv[1:], w["processes"],
                          w["max_memory_per_child"], driver, stuck_after=cfg.lease_seconds,
                          http=w["http"]).run()
    try:
        worker = build_worker(app, driver, queues=app.config.worker["queues"],
                        concurrency=app.config.worker["concurrency"],
                        prefetch=app.config.worker["prefetch"], burst=args.burst,
                        shutdown_timeout=app.config.worker["shutdown_timeout"],
                        max_tasks=app.config.worker["max_tasks_per_child"],
                        name=child_name(args.name, w["processes"]) if args.child else args.name)
    except ConfigError as exc:
        sys.stderr.write(f"greenq-worker: error: {exc}\n")
        return EXIT_USAGE
    from ..worker.monitor import HEARTBEAT_ENV, HTTP_PORT_ENV, Monitor
    from ..worker.signals import StopSignals
    StopSignals(worker.request_stop, heartbeat=os.environ.get(HEARTBEAT_ENV) if args.child else None).install(driver)
    from ..worker.startup import refuse_without_tasks, wait_for_broker
    from ..prefixes import announce
    monitor = Monitor(worker, app.config.worker["blocking_threshold"], app.config.worker["http"],
                      port_file=os.environ.get(HTTP_PORT_ENV) if args.child else None)
    log.info("%s", banner(app, driver.name, pool_source or "default"))
    scheduler = None
    try:
        monitor.start()
        try:
            if not wait_for_broker(worker.broker, worker.queues, app.config.broker_connect_timeout,
                                   driver, log, url=app.config.broker_url,
                                   stopping=lambda: bool(worker.stopping)):
                return EXIT_OK
            refuse_without_tasks(app.tasks, worker.broker, worker.queues, log)
            announce(app, worker.name)     # greenq.prefixes: the app's key_prefix, for clients to compare
        except ConfigError as exc:  # refused by the broker (a bad password...), or no tasks
            log.error("%s", exc)
            return EXIT_USAGE
        except BrokerError as exc:  # broker_connect_timeout passed: one line, no traceback
            log.error("%s", exc)
            return EXIT_FAILURE
        if args.beat:
            from .beat import start_in_worker
            scheduler = start_in_worker(app, driver)
        return worker.run()
    except KeyboardInterrupt:
        return EXIT_OK
    except Exception:
        log.exception("worker failed")
        return EXIT_FAILURE
    finally:
        if scheduler is not None:
            scheduler.stop()
        monitor.stop()
        app.close()   # flush what the broker still holds for us (acks kept during an outage)
