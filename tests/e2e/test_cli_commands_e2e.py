"""Production day one (issue 18, items 7, 10 and 14) with real processes:
``greenq worker`` runs the patched worker, the default worker name, Celery's
``inspect ping --json`` shape and exit 69, ``dlq purge``/``purge`` asking
alike, a ``dlq list`` cut by its --limit saying so, ``cancel-consumer``
dropping the queue from what the worker reports, ``greenq events`` ending 0
on Ctrl-C, retry log lines with their cause."""
from __future__ import annotations

import json
import os
import pty
import signal
import socket
import subprocess
import sys
import time
import uuid

import pytest

pytestmark = pytest.mark.e2e


def _json(env, *args: str, timeout: str = "1") -> dict:
    done = env.admin(*args, "--json", "--timeout", timeout)
    assert done.stdout.strip(), done.stderr
    return json.loads(done.stdout)


def _wait_for(env, names) -> dict:
    """Ping until every worker in ``names`` answers (they are starting)."""
    deadline = time.monotonic() + 30
    while True:
        replies = _json(env, "inspect", "ping")
        if set(names) <= set(replies):
            return replies
        if time.monotonic() > deadline:
            raise AssertionError(f"workers {names} never answered: {replies}\n{env.dump()}")


def _stop(env, proc) -> str:
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    return out


def test_greenq_worker_runs_the_patched_worker_under_its_default_name(sqlite_env, pool):
    """``greenq -A APP worker ARGS`` is ``greenq-worker -A APP ARGS``: the
    same process (exec), patched, named greenq@<hostname>; ping --json as
    Celery prints it."""
    env = sqlite_env
    proc = subprocess.Popen([sys.executable, "-m", "greenq.cli", "-A", "e2e_tasks", "worker", "-P", pool,
                             "-c", "2", "-l", "info"], cwd=env.tmp, env=env.env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    env.procs.append(proc)
    name = f"greenq@{socket.gethostname()}"
    assert _wait_for(env, [name]) == {name: {"ok": "pong"}}
    stats = _json(env, "inspect", "stats", "-d", name)[name]
    assert stats["pid"] == proc.pid and stats["pool"] == pool and stats["concurrency"] == 2
    import e2e_tasks
    env.app()
    where = e2e_tasks.patched.delay().get(timeout=20)["socket_module"]
    assert where.startswith(pool) if pool in ("gevent", "eventlet") else where == "socket", where
    out = _stop(env, proc)
    assert f"pool={pool} (--pool)" in out and "listening as " + name in out


def test_default_names_under_processes_are_one_per_child(sqlite_env, pool):
    host = socket.gethostname()
    proc = sqlite_env.worker(pool, "--processes", "2", "-c", "1", burst=False)
    names = [f"greenq-0@{host}", f"greenq-1@{host}"]
    assert set(_wait_for(sqlite_env, names)) == set(names)
    _stop(sqlite_env, proc)


def test_dash_n_expansions(sqlite_env, pool):
    host = socket.gethostname()
    proc = sqlite_env.worker(pool, "-n", "w%i@%n", "--processes", "2", "-c", "1", burst=False)
    short = host.split(".")[0]
    names = [f"w0@{short}", f"w1@{short}"]
    assert set(_wait_for(sqlite_env, names)) == set(names)
    _stop(sqlite_env, proc)


def test_no_reply_exits_69_like_celery(sqlite_env):
    done = sqlite_env.admin("inspect", "ping", "--json", "--timeout", "0.2")
    assert done.returncode == 69 and json.loads(done.stdout) == {}, done
    done = sqlite_env.admin("control", "pool-grow", "1", "--timeout", "0.2")
    assert done.returncode == 69 and "no worker replied" in done.stderr


def test_cancel_consumer_drops_the_queue_from_stats_and_heartbeats(any_env, pool):
    env = any_env
    queue = env.env.get("GREENQ_DEFAULT_QUEUE", "default")
    extra = f"extra-{uuid.uuid4().hex[:6]}"
    proc = env.worker(pool, "-n", "cc", "-c", "1", "-Q", f"{queue},{extra}", burst=False)
    _wait_for(env, ["cc"])
    assert _json(env, "inspect", "stats", "-d", "cc")["cc"]["queues"] == [queue, extra]
    assert _json(env, "control", "cancel-consumer", extra, "-d", "cc") == {"cc": f"no longer consuming {extra}"}
    assert _json(env, "inspect", "stats", "-d", "cc")["cc"]["queues"] == [queue]
    import e2e_tasks
    env.app()
    stranded = e2e_tasks.add.apply_async((1, 1), queue=extra)
    assert e2e_tasks.add.apply_async((2, 2), queue=queue).get(timeout=20) == 4
    assert e2e_tasks.add.apply_async((3, 3), queue=queue).get(timeout=20) == 6
    assert stranded.state == "PENDING"              # no longer consumed
    events = subprocess.run([sys.executable, "-m", "greenq.cli", "events", "--json", "--timeout", "3"],
                            cwd=env.tmp, env=env.env, capture_output=True, text=True, timeout=30)
    beats = [e for e in map(json.loads, events.stdout.splitlines())
             if e["type"] == "worker-heartbeat" and e["worker"] == "cc"]
    assert beats and all(b["queues"] == [queue] for b in beats), events.stdout
    _stop(env, proc)


def test_events_exits_0_on_ctrl_c(sqlite_env, pool):
    worker = sqlite_env.worker(pool, "-n", "ev", burst=False)
    # Ctrl-C as at a terminal (a background process inherits SIGINT ignored)
    proc = subprocess.Popen([sys.executable, "-m", "greenq.cli", "events", "--timeout", "60"],
                            cwd=sqlite_env.tmp, env=sqlite_env.env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    sqlite_env.procs.append(proc)
    assert " ev: " in proc.stdout.readline()        # a heartbeat: the stream is being read
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0 and "Traceback" not in err, err
    _stop(sqlite_env, worker)


def _answered(env, answer: str, *args: str) -> subprocess.CompletedProcess:
    """``greenq ARGS`` with a terminal on stdin, answering ``answer``."""
    controller, terminal = pty.openpty()
    try:
        os.write(controller, answer.encode() + b"\n")
        return subprocess.run([sys.executable, "-m", "greenq.cli", *args], cwd=env.tmp, env=env.env,
                              stdin=terminal, capture_output=True, text=True, timeout=60)
    finally:
        os.close(controller)
        os.close(terminal)


def test_dlq_purge_asks_like_purge_and_dlq_list_says_it_was_cut(sqlite_env, pool):
    env = sqlite_env
    code = ("import e2e_tasks\n"
            "[e2e_tasks.app.send_task('no.such.task', (i,), queue='dq') for i in range(5)]\n")
    assert env.client(code).returncode == 0, env.client(code).stderr
    assert env.run_worker(pool, "-Q", "dq")[0] == 0
    listed = env.admin("dlq", "list", "--limit", "3")
    assert listed.returncode == 0 and listed.stdout.rstrip().endswith(
        "3 of 5 dead letters (--limit 3; raise it to list more)"), listed.stdout
    as_json = env.admin("dlq", "list", "--limit", "3", "--json")
    assert len(json.loads(as_json.stdout)) == 3 and "3 of 5 dead letters" in as_json.stderr
    whole = env.admin("dlq", "list")
    assert whole.stdout.rstrip().endswith("\n5 dead letter(s)"), whole.stdout

    refused = env.admin("dlq", "purge")                 # no terminal, no --yes: nothing deleted
    assert refused.returncode == 2 and "pass --yes" in refused.stderr, refused
    declined = _answered(env, "n", "dlq", "purge")      # a terminal: asked, and declined
    assert declined.returncode == 1 and "Delete every dead letter? [y/N]" in declined.stdout, declined
    assert len(json.loads(env.admin("dlq", "list", "--json").stdout)) == 5
    queued = _answered(env, "n", "purge", "default")    # purge Q asks the same way
    assert queued.returncode == 1 and "Delete every waiting message of 'default'? [y/N]" in queued.stdout
    done = env.admin("dlq", "purge", "--yes")
    assert done.returncode == 0 and "purged 5 dead letter(s)" in done.stdout, done
    assert json.loads(env.admin("dlq", "list", "--json").stdout) == []


def test_retry_log_lines_carry_the_cause(sqlite_env, pool):
    import e2e_tasks
    sqlite_env.app()
    r = e2e_tasks.always_retry.delay()
    code, out = sqlite_env.run_worker(pool)
    assert code == 0, out
    retry_lines = [line for line in out.splitlines() if f"[{r.id}] retry 1" in line]
    assert retry_lines and "ValueError: still broken" in retry_lines[0], out
