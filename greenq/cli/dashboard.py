"""``greenq dashboard [--http HOST:PORT]``: serve the live web page of the fleet."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from .. import config as config_module
from .common import EXIT_OK, EXIT_USAGE


def add_parser(sub: Any) -> None:
    d = sub.add_parser("dashboard", help="serve a live web page of workers, queues and tasks")
    d.add_argument("--http", metavar="HOST:PORT", help="where to serve (default [dashboard] http, "
                   "127.0.0.1:5555)")


def cmd_dashboard(args: argparse.Namespace, app: Any) -> int:
    from ..dashboard.server import Dashboard, allowed_hosts, serve
    from ..dashboard.state import EventReader, FleetState
    options = app.config.section("dashboard")
    try:
        where = config_module.convert("hostport", args.http) if args.http else options["http"]
    except ValueError as exc:
        sys.stderr.write(f"greenq: error: --http {args.http}: {exc}\n")
        return EXIT_USAGE
    host, _, port = where.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("greenq.dashboard")
    if host not in ("127.0.0.1", "localhost", "::1") and not options["auth"]:
        log.warning("serving on %s without [dashboard] auth: anyone who reaches it can requeue and "
                    "purge dead letters", host)
    state = FleetState()
    reader = EventReader(app, state)
    reader.start()
    dashboard = Dashboard(app, state, options["auth"])
    server = serve(dashboard, host, int(port))
    dashboard.hosts = allowed_hosts(host, server.server_address[1], options["allowed_hosts"])
    print(f"greenq dashboard on http://{where} (broker {config_module.mask_url(app.config.broker_url)})",
          flush=True)
    try:
        server.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        pass
    finally:
        reader.stop()
        server.server_close()
    return EXIT_OK


COMMANDS = {"dashboard": cmd_dashboard}
