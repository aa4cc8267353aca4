"""Production day one (issue 18): what a user meets in the first hour, done
as the user did it, with real processes and real servers."""
from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from urllib.parse import urlsplit, urlunsplit

import pytest

from greenq.exceptions import MessageError

from .conftest import ROOT

PY = sys.executable


def _run(args, cwd, env, timeout=60):
    return subprocess.run([PY, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("GREENQ_") or k.startswith("GREENQ_TEST_")}
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


# -- item 2: greenq demo ------------------------------------------------------

def test_demo_never_uses_the_configured_broker(tmp_path, redis_url, redis_prefix):
    import redis
    (tmp_path / "greenq.ini").write_text(f"[greenq]\nbroker_url = {redis_url}\nkey_prefix = {redis_prefix}\n")
    done = _run(["-m", "greenq.cli", "demo", "-n", "100", "-c", "20"], tmp_path, _clean_env(), timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "private broker sqlite:///" in done.stdout and "100 tasks done" in done.stdout
    client = redis.Redis.from_url(redis_url)
    assert list(client.scan_iter(match=f"{redis_prefix}*")) == []
    assert not (tmp_path / "greenq.sqlite3").exists()


def test_demo_ends_at_once_when_its_worker_cannot_start(tmp_path):
    fake = tmp_path / "nogevent"
    fake.mkdir()
    (fake / "gevent.py").write_text("raise ImportError('No module named gevent (test)')\n")
    env = _clean_env(PYTHONPATH=os.pathsep.join([str(fake), str(ROOT)]))
    started = time.monotonic()
    done = _run(["-m", "greenq.cli", "demo", "-n", "50", "-c", "10"], tmp_path, env, timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "needs gevent" in done.stderr and "exited with code 2" in done.stdout
    assert time.monotonic() - started < 20
    assert not (tmp_path / "greenq.sqlite3").exists()


# -- item 4: a worker with no tasks --------------------------------------------

def _bare_worker(tmp_path, env, *args):
    return _run(["-m", "greenq.worker", "--pool", "threads", "--burst", *args], tmp_path, env, timeout=60)


def test_worker_without_tasks_warns_and_refuses_a_full_queue(tmp_path, redis_url, redis_prefix):
    from greenq import GreenQ
    env = _clean_env(GREENQ_KEY_PREFIX=redis_prefix)
    empty = _bare_worker(tmp_path, env, "--broker", redis_url)
    assert empty.returncode == 0, empty.stderr
    assert "NO registered tasks" in empty.stderr
    app = GreenQ("client", broker=redis_url, key_prefix=redis_prefix)
    try:
        app.send_task("tasks.anything", (1,))
        full = _bare_worker(tmp_path, env, "--broker", redis_url)
        assert full.returncode == 2, full.stderr
        assert "refusing to start a worker with no registered tasks" in full.stderr
        stats = {s.name: s for s in app.broker.queue_stats(["default"])}
        assert stats["default"].ready == 1 and stats["default"].dead == 0   # nothing lost
    finally:
        app.close()


# -- item 6: errors no retry can fix -------------------------------------------

def _refusing_urls(redis_url, amqp_url):
    r = urlsplit(redis_url)
    a = urlsplit(amqp_url)
    return {
        "redis-db": (urlunsplit(r._replace(path="/99")), "DB index"),
        "redis-user": (urlunsplit(r._replace(netloc=f"baduser:s3cretpw@{r.hostname}:{r.port}")),
                       "invalid username-password"),
        "amqp-vhost": (urlunsplit(a._replace(path=f"/nope-{uuid.uuid4().hex[:6]}")), "NOT_ALLOWED"),
        "amqp-password": (urlunsplit(a._replace(netloc=f"{a.username}:s3cretpw@{a.hostname}:{a.port}")),
                          "ACCESS_REFUSED"),
    }


@pytest.mark.parametrize("case", ["redis-db", "redis-user", "amqp-vhost", "amqp-password"])
def test_refused_broker_exits_2_and_client_raises(case, tmp_path, redis_url, amqp_url):
    url, text = _refusing_urls(redis_url, amqp_url)[case]
    started = time.monotonic()
    worker = _bare_worker(tmp_path, _clean_env(GREENQ_BROKER_CONNECT_TIMEOUT="0"), "--broker", url)
    assert worker.returncode == 2, worker.stderr
    assert text in worker.stderr and "s3cretpw" not in worker.stderr
    assert time.monotonic() - started < 20
    code = ("import sys\nfrom greenq import GreenQ, BrokerError, ConfigError\n"
            f"app = GreenQ('c', broker={url!r})\n"
            "try:\n    app.send_task('tasks.add', (1, 2))\n"
            "except BrokerError as exc:\n"
            "    assert isinstance(exc, ConfigError)\n    print('REFUSED', exc)\n    sys.exit(0)\n"
            "sys.exit(3)\n")
    client = _run(["-c", code], tmp_path, _clean_env(), timeout=30)
    assert client.returncode == 0 and "REFUSED" in client.stdout, client.stdout + client.stderr
    assert text in client.stdout and "s3cretpw" not in client.stdout


# -- item 9: a task nobody can run ----------------------------------------------

def test_dead_lettered_unknown_task_fails_its_caller(any_env):
    app = any_env.app()
    result = app.send_task("tasks.not_deployed", (1, 2))
    code, out = any_env.run_worker("threads")
    assert code == 0, out
    started = time.monotonic()
    with pytest.raises(MessageError, match="unknown task 'tasks.not_deployed'"):
        result.get(timeout=10)
    assert time.monotonic() - started < 2
    assert result.state == "FAILURE"
    app.close()


def test_signed_dead_letter_records_are_signed_and_forged_ones_write_nothing(sqlite_env):
    sqlite_env.env["GREENQ_SIGNING_KEY"] = "k1-" + uuid.uuid4().hex
    app = sqlite_env.app()
    signed = app.send_task("tasks.not_deployed", ())
    from greenq import GreenQ
    forger = GreenQ("forger", broker=sqlite_env.broker_url)   # no signing key: an unsigned message
    forged = forger.send_task("e2e.add", (1, 2), task_id="victim-" + uuid.uuid4().hex)
    forger.close()
    code, out = sqlite_env.run_worker("threads")
    assert code == 0, out
    with pytest.raises(MessageError, match="unknown task 'tasks.not_deployed'"):
        signed.get(timeout=10)       # read through the signing codec: verified
    assert "unsigned message refused" in out
    assert app.AsyncResult(forged.id).state == "PENDING"   # the forged message wrote no result
    app.close()


def test_schedule_misspelt_task_gets_did_you_mean(sqlite_env):
    (sqlite_env.tmp / "greenq.ini").write_text("[schedule:x]\ntask = e2e.addd\nevery = 3600\n")
    check = sqlite_env.admin("-A", "e2e_tasks", "config", "check")
    assert check.returncode == 0 and "did you mean e2e.add?" in check.stderr, check.stderr
    code, out = sqlite_env.run_worker("threads", "--beat")
    assert code == 0 and "[schedule:x] task = e2e.addd" in out and "did you mean e2e.add?" in out, out


# -- item 11: import errors -----------------------------------------------------

@pytest.mark.parametrize("helpers, error", [
    ("x = 1\nimport not_installed_dependency_xyz\n", "ModuleNotFoundError"),
    ("x = 1\ndef broken(:\n", "SyntaxError"),
])
def test_app_import_error_names_the_file_and_line(tmp_path, helpers, error):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "tasks.py").write_text("from greenq import GreenQ\nfrom . import helpers\napp = GreenQ('p')\n")
    (pkg / "helpers.py").write_text(helpers)
    env = _clean_env(GREENQ_BROKER_URL=f"sqlite:///{tmp_path / 'b.sqlite3'}")
    worker = _bare_worker(tmp_path, env, "-A", "pkg.tasks")
    assert worker.returncode == 2, worker.stderr
    assert error in worker.stderr and f"{pkg / 'helpers.py'}, line 2" in worker.stderr, worker.stderr
    assert "Traceback" not in worker.stderr
