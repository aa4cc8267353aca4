"""``greenq``: the admin tool.  Every command works on every broker."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, List, Optional

from .. import config as config_module
from ..exceptions import ConfigError, GreenQError
from . import dashboard
from . import inspect as fleet
from .common import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, load_app


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="greenq", description="greenq admin tool")
    p.add_argument("--config", metavar="FILE")
    p.add_argument("-A", "--app", metavar="MODULE[:ATTR]")
    p.add_argument("--broker", metavar="URL")
    p.add_argument("--backend", metavar="URL")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    c = sub.add_parser("call", help="send a task by name")
    c.add_argument("name")
    c.add_argument("--args", default="[]", help="JSON list")
    c.add_argument("--kwargs", default="{}", help="JSON object")
    c.add_argument("--queue")
    c.add_argument("--countdown", type=float)
    c.add_argument("--priority", type=int)
    c.add_argument("--wait", action="store_true", help="wait for the result and print it")
    c.add_argument("--timeout", type=float, default=None)

    r = sub.add_parser("result", help="show a task's state and result")
    r.add_argument("task_id")

    rv = sub.add_parser("revoke", help="revoke a task")
    rv.add_argument("task_id")
    rv.add_argument("--terminate", action="store_true")

    sub.add_parser("queues", help="depth of each queue, delayed and dead-letter counts")

    pg = sub.add_parser("purge", help="delete every waiting message of a queue")
    pg.add_argument("queue")
    pg.add_argument("--yes", action="store_true", help="do not ask")

    d = sub.add_parser("dlq", help="the dead-letter store")
    dsub = d.add_subparsers(dest="dlq_command", required=True, parser_class=_Parser)
    dl = dsub.add_parser("list")
    dl.add_argument("--limit", type=int, default=100)
    ds = dsub.add_parser("show")
    ds.add_argument("id")
    dr = dsub.add_parser("requeue")
    dr.add_argument("id", nargs="?")
    dr.add_argument("--all", action="store_true")
    dsub.add_parser("purge")

    cf = sub.add_parser("config", help="validate or show the effective configuration")
    cf.add_argument("action", choices=("check", "show"))

    fleet.add_parsers(sub)
    dashboard.add_parser(sub)

    dm = sub.add_parser("demo", help="run the demo: a gevent worker drains I/O-bound tasks")
    dm.add_argument("-n", type=int, default=5000, help="tasks to enqueue")
    dm.add_argument("-c", "--concurrency", type=int, default=1000)
    dm.add_argument("--pool", default="gevent", choices=config_module.POOLS)
    return p


def _load(args: argparse.Namespace):
    cfg = config_module.load(args.config, overrides={("greenq", "broker_url"): args.broker,
                                                      ("greenq", "result_backend"): args.backend})
    return cfg


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = _load(args)
        if args.command == "config":
            return cmd_config(args, cfg)
        if args.command == "demo":
            from .demo import run_demo
            return run_demo(args, cfg)
        app = load_app(args.app, cfg)
        return COMMANDS[args.command](args, app)
    except ConfigError as exc:
        sys.stderr.write(f"greenq: error: {exc}\n")
        return EXIT_USAGE
    except GreenQError as exc:
        sys.stderr.write(f"greenq: error: {exc}\n")
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_FAILURE


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
    print(result.id)
    if args.wait:
        value = result.get(timeout=args.timeout, propagate=False)
        print(json.dumps({"state": result.state, "result": _jsonable(value)}))
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
    print(json.dumps(out, indent=2))
    return EXIT_OK


def cmd_revoke(args: argparse.Namespace, app: Any) -> int:
    app.control_revoke(args.task_id, terminate=args.terminate)
    print(f"revoked {args.task_id}{' (terminate)' if args.terminate else ''}")
    return EXIT_OK


def cmd_queues(args: argparse.Namespace, app: Any) -> int:
    stats = app.broker.queue_stats()
    print(f"{'queue':<30} {'ready':>8} {'delayed':>8} {'held':>8} {'dead':>8}")
    for s in stats:
        print(f"{s.name:<30} {s.ready:>8} {s.delayed:>8} {s.held:>8} {s.dead:>8}")
    return EXIT_OK


def cmd_purge(args: argparse.Namespace, app: Any) -> int:
    if not args.yes:
        if not sys.stdin.isatty():
            sys.stderr.write("greenq: error: purge deletes messages; pass --yes to confirm\n")
            return EXIT_USAGE
        if input(f"Delete every waiting message of {args.queue!r}? [y/N] ").strip().lower() != "y":
            return EXIT_FAILURE
    print(f"purged {app.broker.purge(args.queue)} message(s) from {args.queue}")
    return EXIT_OK


def cmd_dlq(args: argparse.Namespace, app: Any) -> int:
    from ..message import peek
    broker = app.broker
    if args.dlq_command == "list":
        letters = broker.dlq_list(limit=args.limit)
        print(f"{'id':<38} {'queue':<16} {'task':<28} reason")
        for d in letters:
            _, task = peek(d.body)
            print(f"{d.id:<38} {d.queue:<16} {str(task or '?'):<28} {d.reason}")
        print(f"{len(letters)} dead letter(s)")
    elif args.dlq_command == "show":
        d = broker.dlq_get(args.id)
        if d is None:
            sys.stderr.write(f"greenq: error: no dead letter {args.id!r}\n")
            return EXIT_FAILURE
        try:
            body: Any = json.loads(d.body)
        except ValueError:
            body = d.body.decode("utf-8", "replace")
        print(json.dumps({"id": d.id, "queue": d.queue, "message_id": d.message_id, "reason": d.reason,
                          "failed_at": d.failed_at, "body": body}, indent=2))
    elif args.dlq_command == "requeue":
        if not args.all and not args.id:
            sys.stderr.write("greenq: error: dlq requeue needs an ID or --all\n")
            return EXIT_USAGE
        n = broker.dlq_requeue(None if args.all else [args.id])
        print(f"requeued {n} message(s)")
        return EXIT_OK if n or args.all else EXIT_FAILURE
    elif args.dlq_command == "purge":
        print(f"purged {broker.dlq_purge()} dead letter(s)")
    return EXIT_OK


def cmd_config(args: argparse.Namespace, cfg: config_module.Config) -> int:
    if args.action == "check":
        print(f"configuration OK ({cfg.file or 'no file; defaults and environment'})")
        return EXIT_OK
    print(f"; effective configuration (file: {cfg.file or 'none'}); values show their source")
    current = None
    for section, key, value, origin in cfg.items(masked=True):
        if section != current:
            print(f"\n[{section}]")
            current = section
        shown = ",".join(value) if isinstance(value, list) else ("" if value is None else value)
        if isinstance(shown, bool):
            shown = str(shown).lower()
        print(f"{key} = {shown}    ; {origin}")
    return EXIT_OK


COMMANDS = {"call": cmd_call, "result": cmd_result, "revoke": cmd_revoke, "queues": cmd_queues,
            "purge": cmd_purge, "dlq": cmd_dlq, **fleet.COMMANDS, **dashboard.COMMANDS}
