"""Shared fixtures: real services, isolated per run, skipped on a laptop
without them and failing instead when GREENQ_TEST_REQUIRE_SERVICES=1 (CI)."""
from __future__ import annotations

import os
import socket
import subprocess
import uuid
from urllib.parse import quote

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

# Hermetic: a GreenQ(...) built in this process reads $GREENQ_CONFIG, ./greenq.ini
# and /etc/greenq/greenq.ini like a worker (issue 18); the tests' apps must not
# pick up a developer's file.  Tests that want a file pass it, or chdir to a
# tmp_path holding a greenq.ini (./greenq.ini stays searched there).
os.environ.pop("GREENQ_CONFIG", None)
gq_config.SEARCH_PATH = ("./greenq.ini",)
if os.path.isfile("greenq.ini"):
    pytest.exit(f"{os.path.abspath('greenq.ini')}: the tests' apps would read it; move it away", returncode=2)


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


def make_config(**overrides):
    """A Config from defaults only (no file, no environment) plus ``overrides``;
    keys are ``greenq`` keys or ``section__key``."""
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


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="session")
def amqp_url():
    """A RabbitMQ vhost of this run's own, deleted at the end; or
    $GREENQ_TEST_AMQP_VHOST, an existing one, left in place."""
    try:
        import amqp  # noqa: F401
    except ImportError:
        _missing("the amqp package")
    if not _answers(AMQP_HOST, AMQP_PORT):
        _missing(f"RabbitMQ on {AMQP_HOST}:{AMQP_PORT}")
    credentials = f"{quote(AMQP_USER, safe='')}:{quote(AMQP_PASSWORD, safe='')}"
    if AMQP_VHOST:
        yield f"amqp://{credentials}@{AMQP_HOST}:{AMQP_PORT}/{quote(AMQP_VHOST, safe='')}"
        return
    vhost = f"greenq-test-{RUN_ID}"
    try:
        _rabbitmqctl("add_vhost", vhost)
        _rabbitmqctl("set_permissions", "-p", vhost, AMQP_USER, ".*", ".*", ".*")
    except (OSError, subprocess.SubprocessError) as exc:
        _missing(f"rabbitmqctl ({exc}); or set GREENQ_TEST_AMQP_VHOST to an existing vhost")
    yield f"amqp://{credentials}@{AMQP_HOST}:{AMQP_PORT}/{vhost}"
    try:
        _rabbitmqctl("delete_vhost", vhost)
    except (OSError, subprocess.SubprocessError):
        pass
