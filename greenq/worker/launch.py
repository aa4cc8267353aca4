"""The worker's first lines: find the pool, patch, verify, then import the rest.

Only the standard library is used until the process is patched (lesson 1 of
DESIGN.md): the pool comes from ``--pool``/``-P``, else ``GREENQ_WORKER_POOL``,
else ``[worker] pool`` of the INI file (``--config``, ``$GREENQ_CONFIG``,
./greenq.ini, /etc/greenq/greenq.ini), else gevent.  A worker that is not
patched after patching refuses to start with exit code 2.
"""
import configparser
import os
import sys

from greenq.pools import POOLS   # no imports of its own: safe before patching
from greenq import transports    # descriptors only: safe before patching

EXIT_USAGE = 2
#: Celery's pools greenq does not have, and what to write instead
CELERY_POOLS = {
    "prefork": "; Celery's prefork pool is --processes N here (each process runs its own pool)",
    "processes": "; Celery's prefork pool is --processes N here (each process runs its own pool)",
}

def _flag(argv, *names):
    """The value of the last ``--name V`` / ``--name=V`` / ``-P V`` / ``-PV``
    in argv, or None (the spellings argparse takes later)."""
    found = None
    for i, arg in enumerate(argv):
        for name in names:
            if arg == name and i + 1 < len(argv):
                found = argv[i + 1]
            elif arg.startswith(name + "=") and name.startswith("--"):
                found = arg.split("=", 1)[1]
            elif len(name) == 2 and arg.startswith(name) and len(arg) > 2:
                found = arg[2:]
    return found


def _config_file(argv, environ):
    path = _flag(argv, "--config") or environ.get("GREENQ_CONFIG")
    if path:
        return path
    for candidate in ("./greenq.ini", "/etc/greenq/greenq.ini"):
        if os.path.isfile(candidate):
            return candidate
    return None


def choose_pool(argv, environ):
    """(pool, where it came from).  Raises ValueError with a usage message."""
    pool = _flag(argv, "--pool", "-P")
    if pool is not None:
        source = "--pool"
    elif environ.get("GREENQ_WORKER_POOL"):
        pool, source = environ["GREENQ_WORKER_POOL"], "environment GREENQ_WORKER_POOL"
    else:
        path = _config_file(argv, environ)
        pool, source = "gevent", "default"
        if path and os.path.isfile(path):
            parser: "configparser.ConfigParser | None"
            parser = configparser.ConfigParser(inline_comment_prefixes=(";", "#"), interpolation=None)
            try:
                parser.read(path, encoding="utf-8")
            except configparser.Error:
                parser = None  # the full loader reports the parse error with its location
            if parser is not None and parser.has_option("worker", "pool"):
                pool, source = parser.get("worker", "pool").strip(), f"{path}: [worker] pool"
    if pool.lower() not in POOLS:
        hint = CELERY_POOLS.get(pool.lower(), "")
        raise ValueError(f"{source} = {pool!r}: unknown pool; expected one of {', '.join(POOLS)}{hint}")
    return pool.lower(), source


def patch(pool):
    """Monkey-patch for ``pool``; returns the driver (imported after patching)."""
    if pool == "gevent":
        try:
            from gevent import monkey
        except ImportError:
            raise SystemExit(_usage("pool gevent needs gevent: pip install 'greenq[gevent]'"))
        monkey.patch_all()
    elif pool == "eventlet":
        try:
            import eventlet
        except ImportError:
            raise SystemExit(_usage("pool eventlet needs eventlet: pip install 'greenq[eventlet]'"))
        eventlet.monkey_patch()
    from greenq.drivers import get_driver  # noqa: E402 - after patching, on purpose
    return get_driver(pool)


def _usage(message):
    sys.stderr.write(f"greenq-worker: error: {message}\n")
    return EXIT_USAGE


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        from greenq.cli.worker import main as worker_main
        return worker_main(argv, driver=None)
    try:
        pool, source = choose_pool(argv, os.environ)
    except ValueError as exc:
        return _usage(str(exc))
    heavy = ("ssl", *transports.libraries())     # warned about when imported before patching
    early = [m for m in heavy if m in sys.modules and pool in ("gevent", "eventlet")]
    driver = patch(pool)
    if not driver.is_patched():
        return _usage(f"pool {pool} (from {source}) is selected but the process is not "
                      f"monkey-patched; refusing to start")
    if early:
        sys.stderr.write(f"greenq-worker: warning: {', '.join(early)} imported before patching\n")
    from greenq.cli.worker import main as worker_main  # noqa: E402 - after patching, on purpose
    return worker_main(argv, driver=driver, pool_source=source)
