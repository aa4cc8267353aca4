"""``greenq inspect``, ``greenq control`` and ``greenq events``: the fleet's
control plane from the command line (greenq/control/)."""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Dict, List

from ..exceptions import BrokerError, GreenQError
from .common import EXIT_FAILURE, EXIT_OK, EXIT_USAGE

#: sysexits.h EX_UNAVAILABLE: no worker replied (Celery's inspect and control
#: exit with it too, so health probes written for Celery work unchanged)
EXIT_NO_REPLY = 69

INSPECT = ("ping", "active", "reserved", "scheduled", "stats", "registered", "revoked")
#: control command -> (its arguments, in order)
CONTROL = {"shutdown": (), "pool-grow": ("n",), "pool-shrink": ("n",), "rate-limit": ("task", "rate"),
           "add-consumer": ("queue",), "cancel-consumer": ("queue",)}


def add_parsers(sub: Any) -> None:
    """Add the three commands to the admin tool's subparsers."""
    i = sub.add_parser("inspect", help="ask the workers what they are doing")
    i.add_argument("what", choices=INSPECT, help="what to ask every worker (or the one named by -d)")
    _common(i)
    c = sub.add_parser("control", help="steer the workers without a restart")
    c.add_argument("what", choices=tuple(CONTROL), help="what to tell every worker (or the one named by -d)")
    c.add_argument("params", nargs="*", metavar="ARG", help="N | TASK RATE | QUEUE")
    _common(c)
    e = sub.add_parser("events", help="print worker and task events as they happen")
    e.add_argument("--json", action="store_true", help="one JSON document per line")
    e.add_argument("--limit", type=int, default=0, metavar="N", help="stop after N events")
    e.add_argument("--timeout", type=float, default=0, metavar="S", help="stop after S seconds")
    e.add_argument("--no-heartbeats", action="store_true", help="leave out worker-heartbeat events")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-d", "--destination", metavar="WORKER", action="append",
                   help="only this worker (repeat, or comma-separate, for several)")
    p.add_argument("--timeout", type=float, default=1.0, metavar="S", help="seconds to gather replies")
    p.add_argument("--json", action="store_true", help="one JSON document: {worker: reply}")


def _destination(args: argparse.Namespace) -> List[str]:
    return [name.strip() for value in args.destination or () for name in value.split(",") if name.strip()]


def _call(app: Any, command: str, params: Dict[str, Any], args: argparse.Namespace) -> List[Dict[str, Any]]:
    from ..control.client import Control
    control = Control(app)
    try:
        return control.call(command, params, _destination(args) or None, args.timeout)
    except GreenQError:
        raise
    except Exception as exc:          # the broker library's own errors: the broker is away
        raise BrokerError(f"the control plane cannot reach the broker: {type(exc).__name__}: {exc}") from None
    finally:
        control.close()


def _json_reply(what: str, reply: Dict[str, Any]) -> Any:
    """One worker's reply in ``--json``: the value, or ``{"error": ...}``;
    ping's as Celery prints it, ``{"ok": "pong"}``."""
    if "ok" not in reply:
        return {"error": reply.get("error")}
    return {"ok": reply["ok"]} if what == "ping" else reply["ok"]


def _print(replies: List[Dict[str, Any]], args: argparse.Namespace, what: str) -> int:
    if args.json:
        print(json.dumps({r["worker"]: _json_reply(what, r) for r in replies}, indent=2, default=repr))
    else:
        for r in replies:
            if "error" in r:
                print(f"{r['worker']}: error: {r['error']}")
            else:
                print(f"{r['worker']}: {_human(what, r.get('ok'))}")
    if not replies:
        sys.stderr.write(f"greenq: no worker replied within {args.timeout:g} s\n")
        return EXIT_NO_REPLY
    return EXIT_OK if all("ok" in r for r in replies) else EXIT_FAILURE


def _human(what: str, value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        if not value:
            return "(none)"
        lines = []
        for item in value:
            if isinstance(item, dict):
                lines.append(f"  {item.get('id')} {item.get('name')} args={json.dumps(item.get('args'), default=repr)}"
                             f" kwargs={json.dumps(item.get('kwargs'), default=repr)}")
            else:
                lines.append(f"  {item}")
        return f"{len(value)}\n" + "\n".join(lines)
    if isinstance(value, dict):
        return "\n" + "\n".join(_resources_lines(v) if k == "resources" and isinstance(v, dict)
                                 else f"  {k}: {json.dumps(v, default=repr)}" for k, v in value.items())
    return json.dumps(value, default=repr)


def _resources_lines(section: Dict[str, Any]) -> str:
    """``inspect stats``'s resources, one line each (docs/resources.md, "Seeing it")."""
    if not section:
        return "  resources: (none)"
    lines = ["  resources:"]
    for name, r in section.items():
        if not isinstance(r, dict):
            lines.append(f"    {name}: {json.dumps(r, default=repr)}")
            continue
        adaptive = ", adaptive" if r.get("adaptive") else ""
        lines.append(f"    {name}: limit {r.get('limit')} (configured {r.get('configured_limit')}, "
                     f"{r.get('scope')}{adaptive}), in use {r.get('in_use')}, waiting {r.get('waiting')}; "
                     f"waited: {r.get('wait_count')} tasks, {r.get('wait_seconds_sum')} s in all, "
                     f"at most {r.get('wait_seconds_max')} s")
    return "\n".join(lines)


def cmd_inspect(args: argparse.Namespace, app: Any) -> int:
    if args.what == "scheduled":
        return _print_scheduled(app, args)
    from ..prefixes import mismatch_hint
    replies = _call(app, args.what, {}, args)
    hint = None if replies else mismatch_hint(app)     # nobody answered: another key_prefix?
    if hint:
        sys.stderr.write(f"greenq: warning: {hint}\n")
    return _print(replies, args, args.what)


def _print_scheduled(app: Any, args: argparse.Namespace) -> int:
    """``inspect scheduled``: the periodic schedule (each entry's last and next
    run: the dashboard's /api/schedule), then what each worker holds with a
    future eta.  With --json, the workers' replies only, as for every inspect
    command (the schedule as JSON: /api/schedule)."""
    replies = _call(app, "scheduled", {}, args)
    if args.json:
        return _print(replies, args, "scheduled")
    from ..dashboard.server import schedule
    entries = schedule(app)
    print(f"schedule: {len(entries)} periodic entr{'y' if len(entries) == 1 else 'ies'}")
    for e in entries:
        rule = f"cron {e['cron']} ({e['timezone']})" if e["cron"] else f"every {e['every']:g} s"
        last = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["last_run"])) if e["last_run"] else "never"
        nxt = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["next_run"]))
        print(f"  {e['name']}: {e['task']}, {rule}, last run {last}, next run {nxt}")
    if not replies:
        sys.stderr.write(f"greenq: no worker replied within {args.timeout:g} s\n")
        return EXIT_OK if entries else EXIT_NO_REPLY
    for r in replies:
        print(f"{r['worker']}: {_human('scheduled', r.get('ok')) if 'ok' in r else 'error: ' + str(r.get('error'))}")
    return EXIT_OK if all("ok" in r for r in replies) else EXIT_FAILURE


def cmd_control(args: argparse.Namespace, app: Any) -> int:
    names = CONTROL[args.what]
    if len(args.params) != len(names):
        wanted = " ".join(n.upper() for n in names) or "no argument"
        sys.stderr.write(f"greenq: error: control {args.what} takes {wanted}\n")
        return EXIT_USAGE
    params: Dict[str, Any] = dict(zip(names, args.params))
    if "n" in params:
        if not params["n"].isdigit() or int(params["n"]) < 1:
            sys.stderr.write(f"greenq: error: control {args.what} N: expected a whole number >= 1\n")
            return EXIT_USAGE
        params["n"] = int(params["n"])
    return _print(_call(app, args.what.replace("-", "_"), params, args), args, args.what)


def cmd_events(args: argparse.Namespace, app: Any) -> int:
    """Print events as they come.  Each is checked first (greenq.events.clean):
    a malformed one is skipped, a bad field dropped, and a line on stderr at
    the end says how many; only a broker that cannot be read ends the command."""
    from ..control.client import Control
    from ..events import Tally
    control = Control(app)
    deadline = time.monotonic() + args.timeout if args.timeout else None
    tally = Tally()
    seen = 0
    try:
        stream = control.events(poll=0.5)
        while args.limit <= 0 or seen < args.limit:
            try:
                batch = next(stream)
            except GreenQError:
                raise
            except Exception as exc:
                raise BrokerError(f"the control plane cannot reach the broker: {type(exc).__name__}: {exc}") from None
            lines = event_lines(batch, tally, args.json, args.no_heartbeats)
            for line in lines[:args.limit - seen] if args.limit > 0 else lines:
                print(line, flush=True)
                seen += 1
            if deadline is not None and time.monotonic() >= deadline:
                break
    except KeyboardInterrupt:       # Ctrl-C is how a live stream ends: exit 0, as celery events does
        pass
    finally:
        control.close()
        if tally.skipped or tally.dropped:
            sys.stderr.write(f"greenq events: {tally.skipped} malformed event(s) skipped, "
                             f"{tally.dropped} field(s) of the wrong type dropped\n")
    return EXIT_OK


def event_lines(batch: Any, tally: Any, as_json: bool = False, no_heartbeats: bool = False) -> List[str]:
    """The lines ``greenq events`` prints for ``batch``: each event checked
    (``tally`` counts what was skipped), as JSON or for people; never raises."""
    from ..events import clean_all
    events = clean_all(batch if isinstance(batch, list) else [], tally)
    return [json.dumps(e) if as_json else format_event(e) for e in events
            if not (no_heartbeats and e["type"] == "worker-heartbeat")]


def format_event(e: Dict[str, Any]) -> str:
    """One line for people: time, type, worker, and the task or worker facts,
    from an event checked by greenq.events.clean.  Every control character
    (ANSI escapes, carriage returns, newlines) is shown escaped, never sent
    to the terminal."""
    when = time.strftime("%H:%M:%S", time.localtime(e.get("timestamp") or 0))
    kind = e["type"]
    if kind.startswith("worker-"):
        detail = (f"pool={e.get('pool')} concurrency={e.get('concurrency')} running={e.get('running')} "
                  f"processed={e.get('processed')} rss={int(e.get('rss') or 0) // 1048576}MiB")
    else:
        detail = f"{e.get('name')}[{e.get('uuid')}]"
        for key in ("args", "queue", "runtime", "queue_wait", "exception", "reason"):
            if e.get(key) is not None:
                detail += f" {key}={e[key]}"
    return printable(f"{when} {kind:<18} {e.get('worker')}: {detail}")


def printable(text: str) -> str:
    """``text`` with each character a terminal would act on (C0 and C1
    controls, ESC of ANSI sequences, bidirectional overrides) written as its
    Python escape."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


COMMANDS = {"inspect": cmd_inspect, "control": cmd_control, "events": cmd_events}
