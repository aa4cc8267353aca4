"""``greenq``: the admin tool.  Every command works on every broker.

The app is resolved as the worker resolves it (``-A``, else ``[greenq] app``),
so every command uses that app's broker and result backend.  Listing commands
print a table for people, or one JSON document with ``--json``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, List, NoReturn, Optional

from .. import config as config_module
from ..exceptions import ConfigError, GreenQError
from . import beat as beat_cli
from . import dashboard
from . import inspect as fleet
from .common import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, check_app, load_app
from .listing import print_queues

#: seconds ``call --wait`` waits for the result unless --timeout says otherwise
WAIT_TIMEOUT = 60.0


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _json_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON document instead of a table")


def _yes_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--yes", action="store_true", help="do not ask (needed when stdin is not a terminal)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="greenq", description="greenq admin tool")
    p.add_argument("--config", metavar="FILE", help="INI file (default: $GREENQ_CONFIG, ./greenq.ini, "
                                                     "/etc/greenq/greenq.ini)")
    p.add_argument("-A", "--app", metavar="MODULE[:ATTR]",
                   help="the app whose broker and backend to use (default: [greenq] app)")
    p.add_argument("--broker", metavar="URL", help="broker URL (wins over the app and the INI file)")
    p.add_argument("--backend", metavar="URL", help="result backend URL (wins over the app and the INI file)")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    c = sub.add_parser("call", help="send a task by name")
    c.add_argument("name", help="the task's registered name")
    c.add_argument("--args", default="[]", help="positional arguments, a JSON list")
    c.add_argument("--kwargs", default="{}", help="keyword arguments, a JSON object")
    c.add_argument("--queue", help="queue (default: the task's, else [greenq] default_queue)")
    c.add_argument("--countdown", type=float, metavar="S", help="run no sooner than S seconds from now")
    c.add_argument("--priority", type=int, metavar="0-9", help="priority, 9 highest")
    c.add_argument("--wait", action="store_true", help="wait for the result and print it")
    c.add_argument("--timeout", type=float, default=WAIT_TIMEOUT, metavar="S",
                   help=f"seconds --wait waits before giving up with exit code 1 (default {WAIT_TIMEOUT:g})")

    r = sub.add_parser("result", help="show a task's state and result")
    r.add_argument("task_id", help="the id printed by call or returned by delay()")
    _json_flag(r)

    rv = sub.add_parser("revoke", help="revoke tasks")
    rv.add_argument("task_id", nargs="+", help="the task's id (several: broadcast "
                                                "1,000 per control command)")
    rv.add_argument("--terminate", action="store_true", help="also stop it if it is running")

    q = sub.add_parser("queues", help="depth of each queue, delayed and dead-letter counts")
    _json_flag(q)
    q.add_argument("--watch", action="store_true",
                   help="refresh the table in place until Ctrl-C (with --json: one document per line)")
    q.add_argument("--interval", type=float, default=2.0, metavar="S",
                   help="seconds between refreshes with --watch (default 2)")
    q.add_argument("--count", type=int, default=0, metavar="N",
                   help="with --watch, stop after N refreshes (default 0: until Ctrl-C)")

    sub.add_parser("worker", add_help=False,
                   help="run a worker: the same as greenq-worker with the same arguments")

    pg = sub.add_parser("purge", help="delete every waiting message of a queue")
    pg.add_argument("queue", help="the queue to empty")
    _yes_flag(pg)

    d = sub.add_parser("dlq", help="the dead-letter store")
    dsub = d.add_subparsers(dest="dlq_command", required=True, parser_class=_Parser)
    dl = dsub.add_parser("list", help="dead letters, oldest first, with the reason")
    dl.add_argument("--limit", type=int, default=100, metavar="N", help="show at most N (default 100)")
    _json_flag(dl)
    ds = dsub.add_parser("show", help="one dead letter with its message")
    ds.add_argument("id", help="the dead letter's id (from dlq list) or its task's id")
    dr = dsub.add_parser("requeue", help="send dead letters back to their queue")
    dr.add_argument("id", nargs="?", help="the dead letter's id (from dlq list) or its task's id")
    dr.add_argument("--all", action="store_true", help="requeue every dead letter")
    _yes_flag(dsub.add_parser("purge", help="delete every dead letter"))

    beat_cli.add_parser(sub)

    cf = sub.add_parser("config", help="validate or show the effective configuration")
    cf.add_argument("action", choices=("check", "show"),
                    help="check: validate the file, environment and app; show: print every value")
    _json_flag(cf)

    fleet.add_parsers(sub)
    dashboard.add_parser(sub)

    dm = sub.add_parser("demo", help="run the demo: a gevent worker drains I/O-bound tasks")
    dm.add_argument("-n", type=int, default=5000, help="tasks to enqueue (default 5000)")
    dm.add_argument("-c", "--concurrency", type=int, default=1000, help="greenlets of the demo worker")
    dm.add_argument("--pool", default="gevent", choices=config_module.POOLS, help="the demo worker's pool")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """Run one command; a closed stdout (``| head``) ends it quietly."""
    try:
        code = _main(argv)
        sys.stdout.flush()    # a pipe buffers: the write that fails may be this last flush
        return code
    except BrokenPipeError:
        # the reader went away: stop writing, and keep Python from complaining at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILURE


def _main(argv: Optional[List[str]]) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if "worker" in argv:
        known, rest = parser.parse_known_args(argv)
        if known.command == "worker":
            exec_worker(known, rest)
    args = parser.parse_args(argv)
    try:
        cfg = config_module.load(args.config, quiet=True,
                                 overrides={("greenq", "broker_url"): args.broker,
                                            ("greenq", "result_backend"): args.backend})
        config_module.report(cfg, lambda message: sys.stderr.write(f"greenq: warning: {message}\n"),
                             take_over=True)
        if args.command == "demo":
            from .demo import run_demo
            return run_demo(args, cfg)
        app = load_app(args.app, cfg)
        if args.command == "config":
            if args.action == "check":
                from ..beat import entries
                entries(app)                  # every schedule entry, built as the scheduler builds it
                for message in check_app(app):
                    sys.stderr.write(f"greenq: warning: {message}\n")
            return cmd_config(args, app.config)
        return COMMANDS[args.command](args, app)
    except ConfigError as exc:
        sys.stderr.write(f"greenq: error: {exc}\n")
        return EXIT_USAGE
    except GreenQError as exc:
        sys.stderr.write(f"greenq: error: {exc}\n")
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_FAILURE


def exec_worker(args: argparse.Namespace, rest: List[str]) -> None:
    """``greenq [-A APP] [--config F] [--broker U] [--backend U] worker ARGS``:
    replace this process with ``greenq-worker`` (``python -m greenq.worker``)
    so the worker is monkey-patched before anything else is imported (this
    process was not patched).  The admin tool's options go first, so the
    worker's own ARGS win."""
    argv = [sys.executable, "-m", "greenq.worker"]
    for flag, value in (("--app", args.app), ("--config", args.config), ("--broker", args.broker),
                        ("--backend", args.backend)):
        if value is not None:
            argv += [flag, value]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, argv + rest)


def refusal(question: str, yes: bool, what: str) -> Optional[int]:
    """None to go ahead (``--yes``, or the person at the terminal answered
    y); else the exit code: 2 without a terminal (after a line saying
    ``--yes`` is needed), 1 when the answer was not y."""
    if yes:
        return None
    if not sys.stdin.isatty():
        sys.stderr.write(f"greenq: error: {what}; pass --yes to confirm\n")
        return EXIT_USAGE
    return None if input(f"{question} [y/N] ").strip().lower() == "y" else EXIT_FAILURE


def _json_arg(text: str, flag: str, kind: type) -> Any:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"{flag} {text!r}: not JSON ({exc})") from None
    if not isinstance(value, kind):
        raise ConfigError(f"{flag} {text!r}: expected a JSON {'list' if kind is list else 'object'}")
    return value


def cmd_call(args: argparse.Namespace, app: Any) -> int:
    options = {k: v for k, v in (("queue", args.queue), ("countdown", args.countdown),
                                 ("priority", args.priority)) if v is not None}
    result = app.send_task(args.name, _json_arg(args.args, "--args", list),
                           _json_arg(args.kwargs, "--kwargs", dict), **options)
    print(result.id, flush=True)
    if args.wait:
        value = result.get(timeout=args.timeout, propagate=False)
        print(json.dumps({"state": result.state, "result": _jsonable(value)}))
        if result.traceback:
            sys.stderr.write(result.traceback.rstrip("\n") + "\n")
        return EXIT_OK if result.successful() else EXIT_FAILURE
    return EXIT_OK


def _jsonable(value: Any) -> Any:
    if isinstance(value, BaseException):
        return f"{type(value).__name__}: {value}"
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return repr(value)


def cmd_result(args: argparse.Namespace, app: Any) -> int:
    r = app.AsyncResult(args.task_id)
    out = {"id": r.id, "state": r.state}
    if r.ready():
        out["result"] = _jsonable(r.result)
    if r.traceback:
        out["traceback"] = r.traceback
    if args.json:
        print(json.dumps(out, indent=2))
        return EXIT_OK
    for key in ("id", "state", "result"):
        if key in out:
            print(f"{key + ':':<7} {json.dumps(out[key]) if key == 'result' else out[key]}")
    if r.traceback:  # as the worker printed it, line by line
        print("traceback:")
        print(r.traceback.rstrip("\n"))
    return EXIT_OK


def cmd_revoke(args: argparse.Namespace, app: Any) -> int:
    app.control_revoke(args.task_id, terminate=args.terminate)
    for task_id in args.task_id:
        print(f"revoked {task_id}{' (terminate)' if args.terminate else ''}")
    return EXIT_OK


def cmd_queues(args: argparse.Namespace, app: Any) -> int:
    """The table once; with --watch redrawn in place on a terminal (appended
    otherwise), or with --json one JSON document per line and refresh."""
    if not args.watch:
        print_queues(app, args.json, sys.stdout)
        return EXIT_OK
    redraw = sys.stdout.isatty() and not args.json
    shown = 0
    try:
        while True:
            if args.json:
                print_queues(app, True, sys.stdout, compact=True)
            else:
                sys.stdout.write("\x1b[H\x1b[2J" if redraw else ("\n" if shown else ""))  # home, clear
                sys.stdout.write(f"{time.strftime('%H:%M:%S')}  every {args.interval:g} s, Ctrl-C to stop\n")
                print_queues(app, False, sys.stdout)
            sys.stdout.flush()
            shown += 1
            if args.count and shown >= args.count:
                return EXIT_OK
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return EXIT_OK


def cmd_purge(args: argparse.Namespace, app: Any) -> int:
    refused = refusal(f"Delete every waiting message of {args.queue!r}?", args.yes, "purge deletes messages")
    if refused is not None:
        return refused
    print(f"purged {app.broker.purge(args.queue)} message(s) from {args.queue}")
    return EXIT_OK


def _find_dead(broker: Any, ident: str) -> Any:
    """The dead letter whose id, or whose task id, is ``ident``; None if neither."""
    dead = broker.dlq_get(ident)
    if dead is None:
        dead = next((d for d in broker.dlq_list(limit=100000) if d.message_id == ident), None)
    return dead


def _dlq_summary(broker: Any, shown: int, limit: int) -> str:
    """``100 of 5,000 dead letters ...``: the line under a list its --limit
    cut.  The total is the sum of the per-queue dead counts; where the broker
    knows fewer than were listed (RabbitMQ counts the queues it knows), it
    says "more than"."""
    total = sum(s.dead for s in broker.queue_stats())
    of = f"{total:,}" if total > shown else f"more than {shown:,}"
    return f"{shown:,} of {of} dead letters (--limit {limit}; raise it to list more)"


def cmd_dlq(args: argparse.Namespace, app: Any) -> int:
    from ..message import peek
    broker = app.broker
    if args.dlq_command == "list":
        letters = broker.dlq_list(limit=args.limit + 1)     # one more: was the list cut?
        cut = len(letters) > args.limit
        letters = letters[:args.limit]
        rows = [{"id": d.id, "queue": d.queue, "task": peek(d.body)[1], "task_id": d.message_id,
                 "reason": d.reason, "failed_at": d.failed_at} for d in letters]
        summary = _dlq_summary(broker, len(letters), args.limit) if cut else f"{len(letters)} dead letter(s)"
        if args.json:
            print(json.dumps(rows, indent=2))
            if cut:                     # stdout stays one JSON document
                sys.stderr.write(f"greenq: {summary}\n")
            return EXIT_OK
        print(f"{'id':<38} {'queue':<16} {'task':<28} {'task id':<34} reason")
        for row in rows:
            print(f"{row['id']:<38} {row['queue']:<16} {str(row['task'] or '?'):<28} "
                  f"{row['task_id'] or '?':<34} {row['reason']}")
        print(summary)
    elif args.dlq_command == "show":
        d = _find_dead(broker, args.id)
        if d is None:
            sys.stderr.write(f"greenq: error: no dead letter with id or task id {args.id!r}\n")
            return EXIT_FAILURE
        try:
            body: Any = json.loads(d.body)
        except (ValueError, RecursionError):
            body = d.body.decode("utf-8", "replace")
        print(json.dumps({"id": d.id, "queue": d.queue, "message_id": d.message_id, "reason": d.reason,
                          "failed_at": d.failed_at, "body": body}, indent=2))
    elif args.dlq_command == "requeue":
        if not args.all and not args.id:
            sys.stderr.write("greenq: error: dlq requeue needs an ID or --all\n")
            return EXIT_USAGE
        ids = None
        if not args.all:
            d = _find_dead(broker, args.id)
            ids = [d.id if d is not None else args.id]
        n = broker.dlq_requeue(ids)
        print(f"requeued {n} message(s)")
        return EXIT_OK if n or args.all else EXIT_FAILURE
    elif args.dlq_command == "purge":
        refused = refusal("Delete every dead letter?", args.yes, "dlq purge deletes every dead letter")
        if refused is not None:
            return refused
        print(f"purged {broker.dlq_purge()} dead letter(s)")
    return EXIT_OK


def cmd_config(args: argparse.Namespace, cfg: config_module.Config) -> int:
    """``check``: the file, environment and app load (errors exit 2); ``show``: every value and its source."""
    if args.action == "check":
        print(f"configuration OK ({cfg.file or 'no file; defaults and environment'})")
        return EXIT_OK
    rows = [{"section": s, "key": k, "value": v, "source": o} for s, k, v, o in cfg.items(masked=True)]
    if args.json:
        print(json.dumps({"file": cfg.file, "key_prefix": cfg.key_prefix, "settings": rows}, indent=2))
        return EXIT_OK
    print(f"; effective configuration (file: {cfg.file or 'none'}; key_prefix: {cfg.key_prefix}, "
          f"{cfg.origin('greenq', 'key_prefix')}); values show their source")
    current = None
    for row in rows:
        if row["section"] != current:
            print(f"\n[{row['section']}]")
            current = row["section"]
        value = row["value"]
        shown = ",".join(value) if isinstance(value, list) else ("" if value is None else value)
        if isinstance(shown, bool):
            shown = str(shown).lower()
        print(f"{row['key']} = {shown}    ; {row['source']}")
    return EXIT_OK


COMMANDS = {"call": cmd_call, "result": cmd_result, "revoke": cmd_revoke, "queues": cmd_queues,
            "purge": cmd_purge, "dlq": cmd_dlq, "beat": beat_cli.cmd_beat, **fleet.COMMANDS,
            **dashboard.COMMANDS}
