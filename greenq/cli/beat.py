"""``greenq beat`` (the scheduler alone) and ``greenq-worker --beat`` (the
scheduler in a worker's greenlet); greenq/beat.py says how schedulers agree."""
from __future__ import annotations

import argparse
import logging
import signal
from typing import TYPE_CHECKING, Any

from .common import EXIT_OK

if TYPE_CHECKING:  # pragma: no cover
    from ..app import GreenQ
    from ..beat import Scheduler


def add_parser(sub: Any) -> None:
    b = sub.add_parser("beat", help="run the periodic-task scheduler ([schedule:NAME], app.add_periodic)")
    b.add_argument("--loglevel", "-l", default="INFO", metavar="LEVEL", help="DEBUG, INFO, WARNING, ERROR")
    b.add_argument("--list", action="store_true", help="print the schedule with each entry's next run, then exit")


def cmd_beat(args: argparse.Namespace, app: "GreenQ") -> int:
    """Run the scheduler in this process until SIGTERM or SIGINT (or, with
    ``--list``, print the schedule)."""
    from .. import logs
    from ..beat import Scheduler
    if args.list:
        return print_schedule(app)
    logs.setup(args.loglevel.upper(), app.config.logging_config or None)
    from ..beat import unknown_tasks
    for message in unknown_tasks(app):
        logging.getLogger("greenq.beat").warning("%s", message)
    scheduler = Scheduler(app)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: scheduler.stop())
    logging.getLogger("greenq.beat").info("greenq beat: app=%r", app.name)
    scheduler.run()
    return EXIT_OK


def print_schedule(app: "GreenQ") -> int:
    """One line per entry, soonest first: name, task, period, last and next run (UTC)."""
    import time
    from ..beat import LEADERSHIP_SECONDS, scheduled
    from ..leadership import make_leadership
    leadership = make_leadership(app, LEADERSHIP_SECONDS)
    try:
        rows = scheduled(app, leadership=leadership)
    finally:
        leadership.close()

    def when(t: Any) -> str:
        if t is None:
            return "-"
        try:
            return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t))
        except (OverflowError, ValueError, OSError):   # a record no scheduler could have written
            return "?"
    for row in rows:
        period = f"every {row['every']:g} s" if row["every"] else f"cron {row['cron']} {row['timezone']}"
        print(f"{row['name']}  {row['task']}  {period}  last={when(row['last_run'])}  next={when(row['next_run'])}")
    if not rows:
        print("no periodic tasks ([schedule:NAME] sections or app.add_periodic)")
    return EXIT_OK


def start_in_worker(app: "GreenQ", driver: Any) -> "Scheduler":
    """``--beat``: the scheduler in a greenlet (thread) of the worker; stop it
    with ``.stop()``."""
    from ..beat import Scheduler
    scheduler = Scheduler(app, sleep=driver.sleep)
    scheduler.handle = driver.spawn(scheduler.run)
    return scheduler
