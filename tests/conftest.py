"""Shared fixtures: real services, isolated per run, skipped on a laptop
without them and failing instead when GREENQ_TEST_REQUIRE_SERVICES=1 (CI)."""
from __future__ import annotations

import http.server
import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
import uuid
from typing import Callable, Iterable, List, Set
from urllib.parse import quote, unquote, urlsplit

import pytest

from greenq import config as gq_config

REQUIRE = os.environ.get("GREENQ_TEST_REQUIRE_SERVICES") == "1"
REDIS_HOST = os.environ.get("GREENQ_TEST_REDIS_HOST", "127.0.0.1")
REDIS_PORT = int(os.environ.get("GREENQ_TEST_REDIS_PORT", "6379"))
REDIS_DB = int(os.environ.get("GREENQ_TEST_REDIS_DB", "13"))   # greenq's tests own this db number
AMQP_HOST = os.environ.get("GREENQ_TEST_AMQP_HOST", "127.0.0.1")
AMQP_PORT = int(os.environ.get("GREENQ_TEST_AMQP_PORT", "5672"))
AMQP_USER = os.environ.get("GREENQ_TEST_AMQP_USER", "guest")
AMQP_PASSWORD = os.environ.get("GREENQ_TEST_AMQP_PASSWORD", "guest")
AMQP_VHOST = os.environ.get("GREENQ_TEST_AMQP_VHOST", "")   # an existing vhost: used, never created or deleted
RUN_ID = uuid.uuid4().hex[:8]
#: a helper process that a test starts gets its parent's AMQP_PREFIX through this variable
CHILD_PREFIX = "GQ_TEST_CHILD_PREFIX"
#: every RabbitMQ name this run makes starts with this ``key_prefix`` (the
#: amqp_common naming: ``P.<queue>``, ``P.control``, ``P.dlq``...), so parallel
#: tox environments sharing $GREENQ_TEST_AMQP_VHOST never see each other's
#: queues, control commands, events or dead letters
AMQP_PREFIX = os.environ.get(CHILD_PREFIX) or \
    f"t{RUN_ID}-{re.sub(r'[^A-Za-z0-9_-]', '', os.environ.get('TOX_ENV_NAME', '')) or os.getpid()}"

# Hermetic: a GreenQ(...) built in this process reads $GREENQ_CONFIG, ./greenq.ini
# and /etc/greenq/greenq.ini like a worker (issue 18); the tests' apps must not
# pick up a developer's file.  Tests that want a file pass it, or chdir to a
# tmp_path holding a greenq.ini (./greenq.ini stays searched there).
os.environ.pop("GREENQ_CONFIG", None)
gq_config.SEARCH_PATH = ("./greenq.ini",)
if os.path.isfile("greenq.ini"):
    pytest.exit(f"{os.path.abspath('greenq.ini')}: the tests' apps would read it; move it away", returncode=2)


def until(check: Callable[[], bool], timeout: float = 5.0, step: float = 0.05) -> bool:
    """Whether ``check()`` came true within ``timeout`` seconds: for a state the
    code reaches by itself (a message leaving a delay cascade), asserted with a
    bound a loaded machine still meets instead of at one instant."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(step)
    return True


def _answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def _missing(what: str) -> None:
    reason = f"{what} is not answering; start it or unset the tests that need it"
    if REQUIRE:
        pytest.fail(f"GREENQ_TEST_REQUIRE_SERVICES=1 but {reason}")
    pytest.skip(reason)


_ISSUED: List[str] = []   # own_prefix()es and redis_prefixes of this process


def own_prefix() -> str:
    """A key_prefix of one test's own inside the run's (``AMQP_PREFIX-<hex>``):
    for tests that set key_prefix themselves; deleted with the run's names."""
    _ISSUED.append(f"{AMQP_PREFIX}-{uuid.uuid4().hex[:6]}")
    return _ISSUED[-1]


def on_rabbitmq(url: object) -> bool:
    from greenq import transports
    desc = transports.lookup(url, results=True) if isinstance(url, str) else None
    return desc is not None and desc.name == "amqp"


def make_config(**overrides):
    """A Config from defaults only (no file, no environment) plus ``overrides``;
    keys are ``greenq`` keys or ``section__key``.  A RabbitMQ broker or backend
    without a ``key_prefix`` of its own gets the run's (``AMQP_PREFIX``)."""
    if "key_prefix" not in overrides and any(on_rabbitmq(overrides.get(k)) for k in ("broker_url", "result_backend")):
        overrides["key_prefix"] = AMQP_PREFIX
    pairs = {}
    for key, value in overrides.items():
        section, _, name = key.rpartition("__")
        pairs[(section or "greenq", name)] = value
    return gq_config.load(search=False, env={}, overrides=pairs)


@pytest.fixture(scope="session")
def redis_url():
    """URL of the test Redis database; every test must still use its own key_prefix."""
    try:
        import redis  # noqa: F401
    except ImportError:
        _missing("the redis package")
    if not _answers(REDIS_HOST, REDIS_PORT):
        _missing(f"Redis on {REDIS_HOST}:{REDIS_PORT}")
    return f"redis://{REDIS_HOST}:{REDIS_PORT}/{REDIS_DB}"


@pytest.fixture
def redis_prefix(redis_url):
    """A key prefix of this test's own; its keys are deleted afterwards."""
    import redis
    prefix = f"gqtest-{RUN_ID}-{uuid.uuid4().hex[:6]}"
    _ISSUED.append(prefix)   # a test may name its RabbitMQ things with it too
    yield prefix
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
    if keys:
        client.delete(*keys)
    # the workers' entries in the unprefixed app registry (greenq/prefixes.py)
    fields = [f for f in client.hkeys("greenq:apps") if f.decode("utf-8", "replace").split(" ")[-1]
              .startswith(prefix)]
    if fields:
        client.hdel("greenq:apps", *fields)
    client.close()


def rabbitmqctl(*args: str) -> str:
    """``rabbitmqctl -q ARGS``'s output; an ``OSError`` or ``SubprocessError``
    when it is missing or fails."""
    return subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, text=True,
                          timeout=60).stdout


def ctl_or_skip(why: str) -> None:
    """Skip a test that drives the broker with ``rabbitmqctl`` (``why``: what for)
    when this user has none that answers."""
    if shutil.which("rabbitmqctl") is None:
        pytest.skip(f"needs rabbitmqctl to {why}; it is not on PATH")
    try:
        rabbitmqctl("status")
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"needs rabbitmqctl to {why}; it does not answer here ({exc})")


def vhost_of(url: str) -> str:
    """The vhost of an ``amqp://`` URL (``/`` when it names none)."""
    path = urlsplit(url).path
    return unquote(path[1:]) if len(path) > 1 else "/"


def close_connections(url: str, pids: Iterable[int], reason: str = "greenq test") -> int:
    """Close the RabbitMQ connections of processes ``pids`` on ``url``'s vhost
    (greenq names each connection ``greenq <role> pid=<pid> <host>``), and
    nobody else's: the vhost may be shared.  Returns how many; needs rabbitmqctl
    (call ``ctl_or_skip`` first)."""
    wanted = {f"pid={pid}" for pid in pids}
    closed = 0
    rows = rabbitmqctl("list_connections", "-p", vhost_of(url), "--no-table-headers", "pid", "client_properties")
    for line in rows.splitlines():
        conn_pid, _, props = line.partition("\t")
        found = re.search(r'\{"connection_name","([^"]*)"\}', props)
        words = found.group(1).split() if found else []
        if words and words[-1] == socket.gethostname() and set(words) & wanted:
            try:
                rabbitmqctl("close_connection", conn_pid.strip(), reason)
                closed += 1
            except subprocess.CalledProcessError:   # it went away on its own
                pass
    return closed


#: (key_prefix, logical queue) of every task queue this process named on RabbitMQ
_NAMED: Set["tuple[str, str]"] = set()


def _track_queue_names() -> None:
    """Record every task queue this process names (``Settings.queue_name``, which
    every declare and publish goes through): what the session deletes when no
    rabbitmqctl can list the vhost.  Worker processes declare the queues their
    test names too, so the parent's record covers them."""
    try:
        from greenq.transports.amqp.common import Settings
    except ImportError:   # no py-amqp: no RabbitMQ tests
        return
    named = Settings.queue_name

    def queue_name(self: "Settings", queue: str) -> str:
        _NAMED.add((self.prefix, queue))
        return named(self, queue)
    Settings.queue_name = queue_name  # type: ignore[method-assign]


_track_queue_names()


def _amqp_names(url: str) -> "tuple[List[str], List[str]]":
    """The queues and exchanges of this run's prefixes on ``url``'s vhost:
    listed by rabbitmqctl, or else the ones this process named (task queues and
    their delay cascades, and greenq's fixed names of each prefix)."""
    ours = (AMQP_PREFIX + ".", AMQP_PREFIX + "-", f"gqtest-{RUN_ID}-")   # own_prefix(), redis_prefix
    try:
        lists = [rabbitmqctl(what, "-p", vhost_of(url), "--no-table-headers", "name").split()
                 for what in ("list_queues", "list_exchanges")]
    except (OSError, subprocess.SubprocessError):
        prefixes = {AMQP_PREFIX, *_ISSUED, *(p for p, _ in _NAMED if (p + ".").startswith(ours))}
        queues = [f"{p}.{n}" for p in prefixes for n in ("dlq", "revoked", "beat.state")]
        exchanges = [f"{p}.{n}" for p in prefixes for n in ("dlx", "control", "events")]
        for prefix, queue in _NAMED:
            if prefix in prefixes:
                cascade = [f"{prefix}.delay.{queue}.{level}" for level in range(32)]
                queues += [f"{prefix}.{queue}", *cascade]
                exchanges += cascade
        return queues, exchanges
    return [[n for n in names if n.startswith(ours)] for names in lists]  # type: ignore


def delete_amqp_names(url: str, queues: Iterable[str] = (), exchanges: Iterable[str] = ()) -> None:
    """Delete these queues and exchanges (absent ones are fine) over AMQP."""
    import amqp
    from greenq.transports.amqp.common import connection_params
    conn = amqp.Connection(**connection_params(url))
    conn.connect()
    try:
        for kind, names in (("queue", queues), ("exchange", exchanges)):
            for name in names:
                channel = conn.channel()
                try:
                    getattr(channel, f"{kind}_delete")(name)
                except amqp.exceptions.AMQPError:
                    pass
                if channel.is_open:
                    channel.close()
    finally:
        conn.close()


def delete_queues(url: str, queues: Iterable[str], prefix: str = AMQP_PREFIX) -> None:
    """Delete the task queues ``queues`` (logical names) of ``prefix`` and their
    delay cascades (``P.delay.<q>.<i>``, queues and exchanges)."""
    from greenq.transports.amqp.common import DEFAULT_PREFIX
    names, cascade = [], []
    for queue in queues:
        names.append(queue if prefix == DEFAULT_PREFIX else f"{prefix}.{queue}")
        cascade += [f"{prefix}.delay.{queue}.{level}" for level in range(32)]
    delete_amqp_names(url, names + cascade, cascade)


@pytest.fixture(scope="session")
def amqp_url():
    """A RabbitMQ vhost of this run's own, deleted at the end; or
    $GREENQ_TEST_AMQP_VHOST, an existing one, left in place, shared by the
    parallel tox environments: each keeps to its names (``AMQP_PREFIX``), and
    the queues and exchanges of its prefixes are deleted at the end (listed by
    rabbitmqctl where it answers; the names this process used otherwise)."""
    try:
        import amqp  # noqa: F401
    except ImportError:
        _missing("the amqp package")
    if not _answers(AMQP_HOST, AMQP_PORT):
        _missing(f"RabbitMQ on {AMQP_HOST}:{AMQP_PORT}")
    credentials = f"{quote(AMQP_USER, safe='')}:{quote(AMQP_PASSWORD, safe='')}"
    if AMQP_VHOST:
        url = f"amqp://{credentials}@{AMQP_HOST}:{AMQP_PORT}/{quote(AMQP_VHOST, safe='')}"
        yield url
        delete_amqp_names(url, *_amqp_names(url))
        return
    vhost = f"greenq-test-{RUN_ID}"
    try:
        rabbitmqctl("add_vhost", vhost)
        rabbitmqctl("set_permissions", "-p", vhost, AMQP_USER, ".*", ".*", ".*")
    except (OSError, subprocess.SubprocessError) as exc:
        _missing(f"rabbitmqctl ({exc}); or set GREENQ_TEST_AMQP_VHOST to an existing vhost")
    yield f"amqp://{credentials}@{AMQP_HOST}:{AMQP_PORT}/{vhost}"
    try:
        rabbitmqctl("delete_vhost", vhost)
    except (OSError, subprocess.SubprocessError):
        pass


@pytest.fixture
def management_api():
    """A plain-HTTP stand-in for RabbitMQ's management API on 127.0.0.1: answers
    /api/queues/<vhost> with ``rows`` and records ``(path, Authorization)``
    of every request in ``seen``.  Yields ``(url, rows, seen)``."""
    rows: list = []
    seen: list = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            seen.append((self.path, self.headers.get("Authorization")))
            body = json.dumps(rows).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", rows, seen
    server.shutdown()
    server.server_close()


# Host-scope resource permits (greenq/resources/host.py) keep lock files in
# /dev/shm/greenq-permits-<uid>: each test gets a directory of its own
# instead ($GREENQ_PERMITS_DIR, inherited by the workers it starts, kept by
# the tests' environment filters: ``keep_env``), removed after it, and the
# run fails if anything appeared in the real one.
PERMITS_ENV = "GREENQ_PERMITS_DIR"
_PERMIT_DIRS: List[object] = []


def keep_env(name: str) -> bool:
    """Whether a test that starts a process without the ``GREENQ_*`` settings
    of its own environment keeps variable ``name`` all the same."""
    return not name.startswith("GREENQ_") or name.startswith(("GREENQ_TEST_", PERMITS_ENV))


def _permit_entries(path: str) -> Set[str]:
    """The app directories in permit root ``path`` made by this greenq (mode
    0700: before it, greenq made them 0755; those that appear meanwhile are
    another checkout's tests, running beside these)."""
    found = set()
    try:
        for entry in os.scandir(path):
            try:
                if entry.stat(follow_symlinks=False).st_mode & 0o777 == 0o700:
                    found.add(entry.name)
            except FileNotFoundError:
                pass
    except FileNotFoundError:
        pass
    return found


@pytest.fixture(scope="session", autouse=True)
def _no_permits_left_in_shm(tmp_path_factory):
    from greenq.resources.host import default_root
    real = default_root()
    before = _permit_entries(real)
    base = tmp_path_factory.mktemp("permits")
    _PERMIT_DIRS.append(base)
    saved = os.environ.get(PERMITS_ENV)
    os.environ[PERMITS_ENV] = str(base / "session")
    yield
    if saved is None:
        os.environ.pop(PERMITS_ENV, None)
    else:
        os.environ[PERMITS_ENV] = saved
    shutil.rmtree(base, ignore_errors=True)
    left = sorted(_permit_entries(real) - before)
    if left:
        pytest.fail(f"host-scope permit directories appeared in {real} during the run: {left}; "
                    f"a process started without ${PERMITS_ENV}?", pytrace=False)


@pytest.fixture(autouse=True)
def _own_permits_dir(_no_permits_left_in_shm, monkeypatch):
    base = _PERMIT_DIRS[-1]
    path = os.path.join(str(base), uuid.uuid4().hex[:12])
    monkeypatch.setenv(PERMITS_ENV, path)
    yield
    shutil.rmtree(path, ignore_errors=True)
