"""The client side of issue 18 with real worker processes: ``get()`` inside
a task is refused at once (Celery's rule) instead of every slot waiting."""
from __future__ import annotations

import time

import pytest

from greenq.cli.inspect import EXIT_NO_REPLY
from greenq.result import SYNC_SUBTASK_RULE

pytestmark = pytest.mark.e2e


def _app(env):
    """client_config_tasks' app pointed at ``env``'s broker (this pytest
    process is the unpatched client)."""
    return env.app("client_config_tasks")


def test_get_inside_a_task_fails_at_once(pool, sqlite_env):
    """Four tasks each waiting on a subtask on a -c 2 worker: before the fix
    every slot waited and every wait timed out (20 s); now each fails with
    the rule at once, and a task that opts out gets its subtask's value."""
    import client_config_tasks as t
    _app(sqlite_env)
    parents = [t.waits.delay(i) for i in range(4)]
    grouped = t.waits_group.delay(3)
    opted_out = t.waits.delay(10, opt_out=True)
    proc = sqlite_env.worker(pool, "-A", "client_config_tasks", "-c", "2", burst=False)
    try:
        started = time.monotonic()
        for result in parents + [grouped]:
            exc = result.get(timeout=15, propagate=False)
            assert isinstance(exc, RuntimeError), (exc, sqlite_env.dump())
            assert "Never call result.get() within a task" in str(exc)
            assert result.state == "FAILURE"
        assert time.monotonic() - started < 10        # refused, not timed out
        assert opted_out.get(timeout=15) == 11
    finally:
        proc.terminate()
        proc.wait(30)


def test_rule_names_the_way_out():
    assert "disable_sync_subtasks=False" in SYNC_SUBTASK_RULE and "chord" in SYNC_SUBTASK_RULE


IDLE_CLIENT = r"""
import sys, threading, redis
import client_config_tasks as t
from greenq.transports.redis.client import client_name

def calls():
    for i in range(5):
        assert t.add.delay(i, i).get(timeout=20) == 2 * i

threads = [threading.Thread(target=calls) for _ in range(30)]
for th in threads:
    th.start()
for th in threads:
    th.join()
mine = client_name(t.app.config.key_prefix, "")
admin = redis.Redis.from_url(t.app.config.broker_url)
held = sum(1 for c in admin.client_list() if c["name"].startswith(mine))
admin.close()
print("idle", held, flush=True)
sys.stdin.read()              # idle until the test is done
"""


def test_idle_client_lets_its_connections_go(pool, tmp_path, redis_url, redis_prefix):
    """A client that made many concurrent calls from threads, then idles:
    before the fix it kept its peak (10 broker + 11 result connections) for
    ever, the idle check running only when the pool was next used; now
    every connection, the result listener's too, closes within
    idle_timeout (1 s here) plus a quarter of it plus the listener's slice."""
    import subprocess
    import sys

    import redis

    from .conftest import Env, HERE
    sys.path.insert(0, str(HERE))
    env = Env(tmp_path, redis_url, {"GREENQ_KEY_PREFIX": redis_prefix, "GREENQ_REDIS_IDLE_TIMEOUT": "1"})
    env.worker(pool, "-A", "client_config_tasks", "-c", "50", burst=False)
    client = subprocess.Popen([sys.executable, "-c", IDLE_CLIENT], cwd=tmp_path, env=env.env, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    admin = redis.Redis.from_url(redis_url)
    try:
        line = client.stdout.readline()
        assert line.startswith("idle"), (line, client.stderr.read() if client.poll() is not None else "")
        peak = int(line.split()[1])
        assert 2 < peak <= 21, peak                  # the documented bound: 10 + 10 + the listener
        name = f"greenq-{redis_prefix}-{client.pid}"
        deadline = time.monotonic() + 1 + 0.25 + 1 + 3   # idle_timeout, idle closer period, slice, margin
        held = peak
        while time.monotonic() < deadline:
            held = sum(1 for c in admin.client_list() if c["name"].startswith(name))
            if held == 0:
                break
            time.sleep(0.1)
        assert held == 0, f"{held} connections still open after idling"
    finally:
        client.stdin.close()
        client.wait(10)
        admin.close()
        env.cleanup()


SHOP = """
import os
from greenq import GreenQ

app = GreenQ(os.environ["SHOP_APP"], broker=os.environ["SHOP_BROKER"])   # the README's first line


@app.task(name="shop.add")
def add(x, y):
    return x + y
"""


@pytest.fixture
def shop(tmp_path, redis_url, redis_prefix):
    """The tutorial's layout: shop_tasks.py builds ``GreenQ(name, broker=...)``
    in code; greenq.ini beside it sets key_prefix and the queues.  The app's
    name is this test's own, so its entry in the unprefixed greenq:apps
    registry is removed afterwards."""
    import sys

    import redis

    from greenq.prefixes import REGISTRY
    from .conftest import Env, HERE
    sys.path.insert(0, str(HERE))
    (tmp_path / "shop_tasks.py").write_text(SHOP)
    (tmp_path / "greenq.ini").write_text(f"[greenq]\nkey_prefix = {redis_prefix}\n\n"
                                         f"[worker]\nqueues = high,default\n")
    env = Env(tmp_path, redis_url, {"SHOP_APP": f"shop-{redis_prefix}", "SHOP_BROKER": redis_url})
    env.env.pop("GREENQ_BROKER_URL")          # the broker comes from the code, as in the tutorial
    env.app_name = f"shop-{redis_prefix}"
    yield env
    env.cleanup()
    admin = redis.Redis.from_url(redis_url)
    for field in admin.hkeys(REGISTRY):
        if field.decode().startswith(env.app_name + " "):
            admin.hdel(REGISTRY, field)
    admin.close()


def test_client_reads_the_ini_the_worker_reads(pool, shop, redis_prefix):
    """``GreenQ("shop", broker=...)`` now reads ./greenq.ini like the worker
    started with ``--config greenq.ini``: before, the client published under
    key_prefix "greenq" and get() timed out."""
    shop.worker(pool, "-A", "shop_tasks", "--config", "greenq.ini", burst=False)
    done = shop.client("from shop_tasks import add, app\n"
                       "print(app.config.key_prefix, app.config.worker['queues'])\n"
                       "print(add.delay(2, 3).get(timeout=10))\n", timeout=30)
    assert done.returncode == 0, done.stderr + shop.dump()
    assert done.stdout.split("\n")[:2] == [f"{redis_prefix} ['high', 'default']", "5"]
    out = shop.dump()
    assert f"key_prefix='{redis_prefix}'" in out            # the banner shows it


def _wait_registered(shop, prefix: str, seconds: float = 20) -> None:
    """Until the worker has recorded its app and prefix (once it consumes)."""
    import redis

    from greenq.prefixes import REGISTRY
    client = redis.Redis.from_url(shop.env["SHOP_BROKER"])
    try:
        deadline = time.monotonic() + seconds
        while not client.hexists(REGISTRY, f"{shop.app_name} {prefix}"):
            assert time.monotonic() < deadline, shop.dump()
            time.sleep(0.05)
    finally:
        client.close()


def test_prefix_mismatch_is_named(pool, shop, redis_prefix):
    """A client whose environment sets another key_prefix (the environment
    beats the INI) and a worker of the same app under the INI's prefix:
    get()'s TimeoutError, its log line and ``greenq inspect`` name the
    prefix the app's workers use."""
    shop.worker(pool, "-A", "shop_tasks", "--config", "greenq.ini", burst=False)
    _wait_registered(shop, redis_prefix)
    shop.env["GREENQ_KEY_PREFIX"] = f"{redis_prefix}-client"   # env beats the INI: the client disagrees
    done = shop.client("from greenq import TimeoutError\nfrom shop_tasks import add\n"
                       "try:\n    add.delay(2, 3).get(timeout=1)\n"
                       "except TimeoutError as exc:\n    print(exc)\n", timeout=30)
    assert f"key_prefix {redis_prefix!r}" in done.stdout, done.stdout + done.stderr
    assert f"this client's key_prefix '{redis_prefix}-client'" in done.stdout
    assert "were seen under key_prefix" in done.stderr                     # and logged as a warning
    inspect = shop.admin("-A", "shop_tasks", "inspect", "ping", "--timeout", "0.5")
    assert inspect.returncode == EXIT_NO_REPLY and f"key_prefix {redis_prefix!r}" in inspect.stderr, inspect.stderr
