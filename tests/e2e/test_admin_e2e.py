"""The admin tool against a real broker and a real worker."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from tests.conftest import AMQP_PREFIX, delete_queues

pytestmark = pytest.mark.e2e


def test_call_wait_and_result(pool, sqlite_env):
    proc = sqlite_env.worker(pool, burst=False)
    called = sqlite_env.admin("call", "e2e.add", "--args", "[20, 22]", "--wait", "--timeout", "30")
    assert called.returncode == 0, called.stderr
    task_id, outcome = called.stdout.splitlines()
    assert json.loads(outcome) == {"state": "SUCCESS", "result": 42}
    shown = sqlite_env.admin("result", task_id, "--json")
    assert json.loads(shown.stdout) == {"id": task_id, "state": "SUCCESS", "result": 42}
    failed = sqlite_env.admin("call", "e2e.fail", "--args", '["gone"]', "--wait", "--timeout", "30")
    assert failed.returncode == 1 and "KeyError" in failed.stdout
    assert failed.stderr.startswith("Traceback (most recent call last):\n"), failed.stderr   # text, not JSON
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0


def test_call_rejects_malformed_json(sqlite_env):
    bad = sqlite_env.admin("call", "e2e.add", "--args", "[1,")
    assert bad.returncode == 2 and "--args" in bad.stderr and "not JSON" in bad.stderr


def test_queues_and_purge(sqlite_env):
    import e2e_tasks
    sqlite_env.app()
    for i in range(3):
        e2e_tasks.add.delay(i, i)
    e2e_tasks.add.apply_async((1, 1), countdown=600)
    listing = sqlite_env.admin("queues")
    row = [line.split() for line in listing.stdout.splitlines() if line.startswith("default")][0]
    assert row[1:5] == ["3", "1", "0", "0"] and row[5].endswith("s"), listing.stdout
    refused = sqlite_env.admin("purge", "default")
    assert refused.returncode == 2 and "--yes" in refused.stderr
    purged = sqlite_env.admin("purge", "default", "--yes")
    assert purged.returncode == 0 and "purged 4" in purged.stdout, purged.stdout
    listing = sqlite_env.admin("queues")
    row = [line.split() for line in listing.stdout.splitlines() if line.startswith("default")][0]
    assert row[1:3] == ["0", "0"]


def test_config_show_masks_passwords_and_check_fails_with_2(sqlite_env):
    sqlite_env.env["GREENQ_BROKER_URL"] = "redis://:hunter2@127.0.0.1:6379/3"
    shown = sqlite_env.admin("config", "show")
    assert shown.returncode == 0, shown.stderr
    assert "hunter2" not in shown.stdout and "redis://:***@127.0.0.1:6379/3" in shown.stdout
    assert "environment GREENQ_BROKER_URL" in shown.stdout
    (sqlite_env.tmp / "bad.ini").write_text("[greenq]\nbroker = redis://x\n")
    checked = sqlite_env.admin("--config", "bad.ini", "config", "check")
    assert checked.returncode == 2
    assert "bad.ini" in checked.stderr and "did you mean 'broker_url'" in checked.stderr


def test_revoke_terminate_stops_a_running_task(pool, sqlite_env):
    import e2e_tasks
    sqlite_env.app()
    r = e2e_tasks.slow_steps.delay("victim", 30)
    proc = sqlite_env.worker(pool, burst=False)
    sqlite_env.wait_marker("victim.started")
    started = time.monotonic()
    revoked = sqlite_env.admin("revoke", r.id, "--terminate")
    assert revoked.returncode == 0, revoked.stderr
    with pytest.raises(Exception) as info:
        r.get(timeout=15)
    assert type(info.value).__name__ == "TaskRevokedError"
    assert r.state == "REVOKED" and time.monotonic() - started < 15
    assert sqlite_env.marker_count("victim.finished") == 0
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0


SHOP_TASKS = '''
from greenq import GreenQ

app = GreenQ("shop", broker="sqlite:///{db}")


@app.task
def add(x, y):
    return x + y
'''


def _shop(env, tmp):
    """A project whose app names its own broker; no GREENQ_BROKER_URL in the environment."""
    (tmp / "shop").mkdir()
    (tmp / "shop" / "__init__.py").write_text("")
    (tmp / "shop" / "tasks.py").write_text(SHOP_TASKS.format(db=tmp / "shop.sqlite3"))
    env.env.pop("GREENQ_BROKER_URL")


def test_admin_and_worker_use_the_app_named_by_dash_a_or_by_the_ini(pool, sqlite_env):
    tmp = sqlite_env.tmp
    _shop(sqlite_env, tmp)
    called = sqlite_env.admin("-A", "shop.tasks", "call", "shop.tasks.add", "--args", "[2, 3]")
    assert called.returncode == 0, called.stderr
    task_id = called.stdout.strip()
    listing = json.loads(sqlite_env.admin("-A", "shop.tasks", "queues", "--json").stdout)
    [row] = [{k: v for k, v in q.items() if k != "oldest_ready_age"} for q in listing["queues"]
             if q["name"] == "default"]
    assert row == {"name": "default", "ready": 1, "delayed": 0, "held": 0, "dead": 0}
    shown = json.loads(sqlite_env.admin("-A", "shop.tasks", "config", "show", "--json").stdout)
    broker = [s for s in shown["settings"] if s["key"] == "broker_url"][0]
    assert broker["value"] == f"sqlite:///{tmp / 'shop.sqlite3'}"
    # the documented way: only --config, the INI names the app
    (tmp / "greenq.ini").write_text("[greenq]\napp = shop.tasks\n")
    listing = json.loads(sqlite_env.admin("--config", "greenq.ini", "queues", "--json").stdout)
    assert listing["queues"][0]["ready"] == 1
    worker = subprocess.run([sys.executable, "-m", "greenq.worker", "--config", "greenq.ini", "--pool", pool,
                             "--burst"], cwd=tmp, env=sqlite_env.env, capture_output=True, text=True,
                            timeout=60)
    out = worker.stdout + worker.stderr
    assert worker.returncode == 0, out
    assert "app='shop'" in out and "unknown task" not in out
    result = sqlite_env.admin("--config", "greenq.ini", "result", task_id, "--json")
    assert json.loads(result.stdout) == {"id": task_id, "state": "SUCCESS", "result": 5}
    assert not (tmp / "greenq.sqlite3").exists()   # nothing went to the SQLite default


def test_call_wait_gives_up_after_its_timeout(sqlite_env):
    started = time.monotonic()
    waited = sqlite_env.admin("call", "e2e.add", "--args", "[1, 1]", "--wait", "--timeout", "0.5")
    assert waited.returncode == 1 and "not ready after 0.5 s" in waited.stderr
    assert time.monotonic() - started < 20


def test_result_prints_the_traceback_as_text(pool, sqlite_env):
    import e2e_tasks
    sqlite_env.app()
    r = e2e_tasks.fail.delay("gone")
    code, out = sqlite_env.run_worker(pool)
    assert code == 0, out
    shown = sqlite_env.admin("result", r.id)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[1].split() == ["state:", "FAILURE"]
    assert "traceback:" in lines and "Traceback (most recent call last):" in lines
    assert any(line.startswith("KeyError") for line in lines)
    as_json = json.loads(sqlite_env.admin("result", r.id, "--json").stdout)
    assert as_json["traceback"].startswith("Traceback (most recent call last):\n")


def test_dlq_show_and_requeue_accept_the_task_id(pool, sqlite_env):
    app = sqlite_env.app()
    r = app.send_task("no.such.task", args=[1])
    code, out = sqlite_env.run_worker(pool)
    assert code == 0, out
    listed = json.loads(sqlite_env.admin("dlq", "list", "--json").stdout)
    assert [d["task_id"] for d in listed] == [r.id] and listed[0]["task"] == "no.such.task"
    by_task = sqlite_env.admin("dlq", "show", r.id)
    assert by_task.returncode == 0, by_task.stderr
    shown = json.loads(by_task.stdout)
    assert shown["message_id"] == r.id and shown["id"] == listed[0]["id"]
    assert json.loads(sqlite_env.admin("dlq", "show", listed[0]["id"]).stdout) == shown
    missing = sqlite_env.admin("dlq", "show", "nope")
    assert missing.returncode == 1 and "id or task id 'nope'" in missing.stderr
    requeued = sqlite_env.admin("dlq", "requeue", r.id)
    assert requeued.returncode == 0 and "requeued 1" in requeued.stdout


def test_a_closed_pipe_ends_the_admin_tool_without_a_traceback(sqlite_env):
    proc = subprocess.Popen([sys.executable, "-m", "greenq.cli", "config", "show"], cwd=sqlite_env.tmp,
                            env=sqlite_env.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()   # as `| head -0` does before greenq writes
    err = proc.stderr.read().decode()
    proc.wait(timeout=30)
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


def test_queues_watch_redraws_in_place_on_a_terminal(sqlite_env):
    import pty
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "greenq.cli", "queues", "--watch", "--interval", "0.05",
                             "--count", "3"], cwd=sqlite_env.tmp, env=sqlite_env.env, stdout=slave,
                            stderr=subprocess.PIPE)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:   # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    assert proc.wait(timeout=30) == 0, proc.stderr.read()
    screen = b"".join(chunks).decode()
    assert screen.count("\x1b[H\x1b[2J") == 3 and screen.count("queue ") == 3


def test_queues_on_rabbitmq_lists_every_queue_with_its_held_count(amqp_url, tmp_path, management_api, request):
    from greenq import GreenQ
    api, rows, seen = management_api
    names = [f"onb-{uuid.uuid4().hex[:8]}" for _ in range(2)]
    p = AMQP_PREFIX
    app = GreenQ("t", broker=amqp_url, key_prefix=p)
    app.broker.declare(names)
    app.close()
    request.addfinalizer(lambda: delete_queues(amqp_url, names))
    rows += [{"name": f"{p}.{names[0]}", "messages_ready": 4, "messages_unacknowledged": 3},
             {"name": f"{p}.{names[1]}", "messages_ready": 0, "messages_unacknowledged": 0},
             {"name": f"{p}.dlq", "messages_ready": 9}, {"name": "amq.gen-abc", "messages_ready": 1}]
    env = {k: v for k, v in os.environ.items() if not k.startswith("GREENQ_")}
    env.update(GREENQ_BROKER_URL=amqp_url, GREENQ_AMQP_MANAGEMENT_URL=api, GREENQ_WORKER_QUEUES=names[1],
               GREENQ_KEY_PREFIX=p)
    done = subprocess.run([sys.executable, "-m", "greenq.cli", "queues", "--json"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    listed = {q["name"]: q for q in json.loads(done.stdout)["queues"]}
    assert set(listed) == set(names)
    assert listed[names[0]]["ready"] == 4 and listed[names[0]]["held"] == 3
    vhost = amqp_url.rsplit("/", 1)[1]
    assert seen[0][0] == f"/api/queues/{vhost}" and seen[0][1].startswith("Basic ")
    env["GREENQ_AMQP_MANAGEMENT_URL"] = "http://127.0.0.1:1"   # nothing answers: a note, not an error
    done = subprocess.run([sys.executable, "-m", "greenq.cli", "queues"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert names[1] in done.stdout and "management API at http://127.0.0.1:1 did not answer" in done.stdout


def test_queues_watch_json_prints_one_document_per_refresh(sqlite_env):
    done = sqlite_env.admin("queues", "--watch", "--json", "--interval", "0.05", "--count", "2")
    assert done.returncode == 0, done.stderr
    docs = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(docs) == 2 and all("queues" in d for d in docs)
