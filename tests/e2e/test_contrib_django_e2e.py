"""greenq.contrib.django against real Django (issue 23, item 5): the test
project tests/e2e/contrib_projects/djshop, its client steps run in their own
process, a real greenq-worker --burst running its tasks, on a SQLite file
database and on a private PostgreSQL (initdb + pg_ctl, psycopg 3)."""
from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.conftest import REQUIRE

pytest.importorskip("django")

PROJECT = Path(__file__).resolve().parent / "contrib_projects" / "djshop"


def _skip(reason: str) -> None:
    if REQUIRE:
        pytest.fail(f"GREENQ_TEST_REQUIRE_SERVICES=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def postgres():
    """A private PostgreSQL on 127.0.0.1:<free port> in a temporary folder
    (as the ``postgres`` user when run as root: initdb refuses root), with a
    database ``shop``; stopped and removed after the module's tests."""
    if not shutil.which("initdb") or not shutil.which("pg_ctl"):
        _skip("PostgreSQL's initdb/pg_ctl are not on PATH")
    pytest.importorskip("psycopg")
    as_user = []
    folder = Path(tempfile.mkdtemp(prefix="greenq-djshop-pg-"))
    if os.geteuid() == 0:
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            _skip("running as root and there is no 'postgres' user for initdb")
        os.chown(folder, pw.pw_uid, pw.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = folder / "data"
    subprocess.run(as_user + ["initdb", "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                              "--no-sync"], check=True, capture_output=True)
    with open(data / "postgresql.conf", "a") as conf:
        conf.write(f"\nlisten_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{folder}'\n"
                   "fsync = off\nshared_buffers = 16MB\n")
    subprocess.run(as_user + ["pg_ctl", "-D", str(data), "-l", str(folder / "log"), "-w", "start"],
                   check=True, capture_output=True)
    try:
        import psycopg
        with psycopg.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres",
                             autocommit=True) as conn:
            conn.execute("CREATE DATABASE shop")
        yield f"postgresql://postgres@127.0.0.1:{port}/shop"
    finally:
        subprocess.run(as_user + ["pg_ctl", "-D", str(data), "-m", "immediate", "-w", "stop"],
                       capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request, tmp_path):
    if request.param == "sqlite":
        return str(tmp_path / "shop.sqlite3")
    return request.getfixturevalue("postgres")


def _shop(env, database):
    """The e2e Env with the project on PYTHONPATH, the broker URL given by
    the Django settings only (DJSHOP_BROKER -> GREENQ_BROKER_URL there)."""
    env.env["DJSHOP_BROKER"] = env.env.pop("GREENQ_BROKER_URL")
    env.env["DJSHOP_DB"] = database
    env.env["PYTHONPATH"] = os.pathsep.join([str(PROJECT), env.env["PYTHONPATH"]])
    env.env.pop("DJANGO_SETTINGS_MODULE", None)
    return env


@pytest.fixture
def shop(sqlite_env, database):
    return _shop(sqlite_env, database)


@pytest.fixture
def shop_sqlite(sqlite_env, tmp_path):
    return _shop(sqlite_env, str(tmp_path / "shop.sqlite3"))


@pytest.fixture
def shop_pg(sqlite_env, postgres):
    return _shop(sqlite_env, postgres)


def run(env, *args, timeout=60):
    return subprocess.run([sys.executable, *args], cwd=env.tmp, env=env.env, capture_output=True, text=True,
                          timeout=timeout)


def worker(env, *args):
    """A real greenq-worker --burst of the project's app; (exit code, output)."""
    return env.run_worker("gevent", "-A", "djshop.greenq_app", *args)


def test_sent_on_commit_never_on_rollback_and_run_by_a_worker(shop, database):
    steps = run(shop, str(PROJECT / "client_steps.py"))
    assert steps.returncode == 0, steps.stderr
    seen = json.loads(steps.stdout)
    # inside atomic(): not in the broker; after the commit: there; a rollback sends nothing;
    # outside a transaction: sent at once
    assert (seen["inside_atomic"], seen["after_commit"], seen["after_rollback"], seen["outside_atomic"]) \
        == (0, 1, 1, 2), seen
    code, out = worker(shop)
    assert code == 0, out
    assert "2 succeeded, 0 failed" in out, out
    after = run(shop, str(PROJECT / "read_results.py"), json.dumps(seen["ids"]))
    assert after.returncode == 0, after.stderr
    found = json.loads(after.stdout)
    # the worker read the rows the client committed (and wrote them back, processed)
    assert found["kept"] == "teapot" and found["outside"] == "kettle"
    assert found["rows"] == [["kettle", True], ["teapot", True]]     # the rolled-back row is not there
    assert found["dropped_state"] == "PENDING"                        # and its task was never sent


def test_each_task_gets_a_fresh_connection_with_conn_max_age_0(shop_pg):
    """close_old_connections after each task: one worker thread running three
    tasks one after the other opens a new session for each (CONN_MAX_AGE = 0),
    and keeps one with CONN_MAX_AGE = 60: the hooks close what Django would."""
    shop = shop_pg
    code = ("from djshop.greenq_app import app; from djshop.orders.tasks import backend_pid; import json; "
            "print(json.dumps([backend_pid.delay().id for _ in range(3)]))")
    pids = {}
    for age in ("0", "60"):
        shop.env["DJSHOP_CONN_MAX_AGE"] = age
        sent = shop.client(code)
        assert sent.returncode == 0, sent.stderr
        ids = json.loads(sent.stdout)
        exit_code, out = shop.run_worker("threads", "-A", "djshop.greenq_app", "--concurrency", "1")
        assert exit_code == 0, out
        read = shop.client("from djshop.greenq_app import app; import json, sys; "
                           f"print(json.dumps([app.AsyncResult(i).get(timeout=10) for i in {ids!r}]))")
        assert read.returncode == 0, read.stderr
        pids[age] = json.loads(read.stdout)
    assert len(set(pids["0"])) == 3, pids
    assert len(set(pids["60"])) == 1, pids


def test_manage_py_check_names_a_misspelt_setting_and_a_missing_broker(shop_sqlite):
    shop = shop_sqlite
    shop.env["DJSHOP_MISTAKE"] = "1"
    checked = run(shop, str(PROJECT / "manage.py"), "check")
    assert checked.returncode == 1
    assert "(greenq.E001) Django setting GREENQ_WORKER_CONCURENCY is not a greenq setting" in checked.stderr
    assert "HINT: did you mean GREENQ_WORKER_CONCURRENCY?" in checked.stderr
    del shop.env["DJSHOP_MISTAKE"], shop.env["DJSHOP_BROKER"]
    checked = run(shop, str(PROJECT / "manage.py"), "check")
    assert checked.returncode == 0, checked.stderr       # a warning: runserver still starts
    assert "(greenq.W001) no greenq broker URL is set" in checked.stderr
    shop.env["DJSHOP_BROKER"] = shop.broker_url
    checked = run(shop, str(PROJECT / "manage.py"), "check")
    assert checked.returncode == 0 and "greenq" not in checked.stderr + checked.stdout, checked.stderr


def test_a_worker_of_an_unconfigured_app_stops_before_taking_a_message(shop_sqlite):
    shop = shop_sqlite
    del shop.env["DJSHOP_BROKER"]
    code, out = worker(shop)
    assert code == 1, out
    assert "greenq.W001: no greenq broker URL is set" in out
    shop.env["DJSHOP_SILENCED"] = "greenq.W001"      # the default on purpose: ./greenq.sqlite3
    code, out = worker(shop)
    assert code == 0 and "greenq.W001" not in out, out
    assert (shop.tmp / "greenq.sqlite3").exists()
    del shop.env["DJSHOP_SILENCED"]
    # the environment sets it: the worker's layers count
    shop.env["GREENQ_BROKER_URL"] = shop.broker_url
    shop.env["DJSHOP_MISTAKE"] = "1"
    code, out = worker(shop)
    assert code == 1, out
    assert "greenq.E001: Django setting GREENQ_WORKER_CONCURENCY is not a greenq setting" in out
    assert "did you mean GREENQ_WORKER_CONCURRENCY?" in out
    del shop.env["DJSHOP_MISTAKE"]
    code, out = worker(shop)
    assert code == 0, out


EAGER = """
import django
from django.conf import settings
settings.configure(DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}},
                   GREENQ_EAGER=True, GREENQ_BROKER_URL="memory://")
django.setup()
from django.db import transaction
from greenq.contrib.django import create_app, delay_on_commit
app = create_app("eager")
ran = []

@app.task
def add(a, b):
    ran.append((a, b))
    return a + b

with transaction.atomic():
    r = delay_on_commit(add, 1, 2)
    assert r.state == "PENDING" and ran == [], (r.state, ran)
assert r.get() == 3 and r.state == "SUCCESS", r.state
try:
    with transaction.atomic():
        gone = delay_on_commit(add, 5, 5)
        raise KeyError
except KeyError:
    pass
assert ran == [(1, 2)] and gone.state == "PENDING", ran
print("ok")
"""


def test_eager_mode_runs_the_task_at_the_commit(tmp_path):
    """Users' unit tests (GREENQ_EAGER): the task runs when the transaction
    commits, its result handed to what delay_on_commit returned; never on a rollback."""
    done = subprocess.run([sys.executable, "-c", EAGER], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          env={**{k: v for k, v in os.environ.items() if not k.startswith("GREENQ_")},
                               "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
