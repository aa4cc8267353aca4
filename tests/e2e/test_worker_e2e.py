"""End to end: real greenq-worker processes for each driver, a separate
unpatched client (this pytest process, or a subprocess where it matters)."""
from __future__ import annotations

import signal
import sys
import time

import pytest

from greenq import TaskError, TimeLimitExceeded
from greenq.worker.signals import STOP_SIGNAL_WINDOW

pytestmark = pytest.mark.e2e


def test_results_and_propagate_false(pool, sqlite_env):
    import e2e_tasks
    app = sqlite_env.app()
    ok = e2e_tasks.add.delay(2, 3)
    failed = e2e_tasks.fail.delay("no such key")
    custom = e2e_tasks.custom_fail.delay("custom")
    local = e2e_tasks.unimportable_fail.delay()
    many = app.enqueue_many([e2e_tasks.add.s(i, i) for i in range(50)])
    code, out = sqlite_env.run_worker(pool)
    assert code == 0, out
    assert ok.get(timeout=10) == 5
    assert ok.state == "SUCCESS" and ok.successful() and ok.ready()
    assert [r.get(timeout=10) for r in many] == [2 * i for i in range(50)]
    exc = failed.get(timeout=10, propagate=False)
    assert isinstance(exc, KeyError) and exc.args == ("no such key",)
    assert failed.failed() and "KeyError" in failed.traceback
    with pytest.raises(e2e_tasks.CustomError):
        custom.get(timeout=10)
    with pytest.raises(TaskError) as info:
        local.get(timeout=10)
    assert "LocalError" in info.value.type_name and "defined inside the task" in str(info.value)
    assert info.value.remote_traceback and "unimportable_fail" in info.value.remote_traceback
    ok.forget()
    assert app.AsyncResult(ok.id).state == "PENDING"


def test_client_process_stays_unpatched(pool, sqlite_env):
    code = (
        "import sys, e2e_tasks\n"
        "r = e2e_tasks.add.delay(20, 22)\n"
        "print(r.id)\n"
        "heavy = sorted({'gevent', 'eventlet', 'ssl', 'redis', 'amqp'} & set(sys.modules))\n"
        "print('heavy=' + ','.join(heavy))\n")
    sent = sqlite_env.client(code)
    assert sent.returncode == 0, sent.stderr
    task_id, heavy = sent.stdout.split()
    assert heavy == "heavy="
    rc, out = sqlite_env.run_worker(pool)
    assert rc == 0, out
    got = sqlite_env.client(f"import e2e_tasks\nprint(e2e_tasks.app.AsyncResult({task_id!r}).get(timeout=10))")
    assert got.stdout.strip() == "42", got.stderr


def test_retries(pool, sqlite_env):
    import e2e_tasks
    sqlite_env.app()
    auto = e2e_tasks.flaky.delay(2)
    explicit = e2e_tasks.explicit_retry.delay()
    exhausted = e2e_tasks.always_retry.delay()
    code, out = sqlite_env.run_worker(pool)
    assert code == 0, out
    assert auto.get(timeout=10) == 2
    assert explicit.get(timeout=10) == "done after 2 retries"
    exc = exhausted.get(timeout=10, propagate=False)
    assert isinstance(exc, ValueError) and "still broken" in str(exc)
    assert exhausted.retries == 1


def test_time_limits(pool, sqlite_env):
    import e2e_tasks
    sqlite_env.app()
    soft = e2e_tasks.soft.delay(2)   # threads see a limit only when sleep() returns
    hard = e2e_tasks.hard.delay(2)
    quick = e2e_tasks.soft.delay(0)
    started = time.monotonic()
    code, out = sqlite_env.run_worker(pool)
    assert code == 0, out
    assert time.monotonic() - started < 15, "time limits did not fire"
    assert soft.get(timeout=10) == "soft limit caught"
    assert quick.get(timeout=10) == "finished"
    with pytest.raises(TimeLimitExceeded):
        hard.get(timeout=10)


def test_sigterm_lets_the_running_task_finish(pool, sqlite_env):
    import e2e_tasks
    sqlite_env.app()
    r = e2e_tasks.slow.delay("term", 1.5)
    waiting = e2e_tasks.add.delay(1, 1)  # may or may not start; must not be lost
    proc = sqlite_env.worker(pool, "-c", "1", burst=False)
    sqlite_env.wait_marker("term.started")
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert r.get(timeout=5) == "term"
    assert sqlite_env.marker_count("term.finished") == 1
    if not waiting.ready():  # returned to the queue: the next worker runs it
        code, out = sqlite_env.run_worker(pool)
        assert code == 0, out
    assert waiting.get(timeout=10) == 2


def test_second_signal_is_a_cold_shutdown(pool, sqlite_env):
    import e2e_tasks
    sqlite_env.app()
    r = e2e_tasks.slow.delay("cold", 30)
    proc = sqlite_env.worker(pool, burst=False)
    sqlite_env.wait_marker("cold.started")
    proc.send_signal(signal.SIGTERM)
    time.sleep(STOP_SIGNAL_WINDOW + 0.3)    # a copy of the first within the window is the same stop
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0, out
    assert not r.ready()
    stats = sqlite_env.admin("queues")
    assert stats.returncode == 0, stats.stderr
    row = [line.split() for line in stats.stdout.splitlines() if line.startswith("default")][0]
    assert row[1] == "1", stats.stdout   # back in the queue, ready for the next worker


@pytest.mark.parametrize("ini_pool", ["gevent", "eventlet", "threads"])
def test_pool_chosen_only_in_ini_is_patched(ini_pool, sqlite_env):
    import e2e_tasks
    (sqlite_env.tmp / "greenq.ini").write_text(f"[worker]\npool = {ini_pool}\nconcurrency = 5\n")
    sqlite_env.app()
    r = e2e_tasks.patched.delay()
    proc = subprocess_worker_without_pool_flag(sqlite_env)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    info = r.get(timeout=10)
    if ini_pool == "threads":
        assert info["socket_module"] == "socket" and not info["gevent"] and not info["eventlet"]
    else:
        assert ini_pool in info["socket_module"], info
    assert f"pool={ini_pool}" in out


def subprocess_worker_without_pool_flag(env):
    import subprocess
    return subprocess.Popen([sys.executable, "-m", "greenq.worker", "-A", "e2e_tasks", "--burst"],
                            cwd=env.tmp, env=env.env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


@pytest.mark.parametrize("ini, expected", [
    ("[worker]\nconcurency = 10\n", ["greenq.ini", "[worker]", "concurency", "did you mean 'concurrency'"]),
    ("[worker]\nconcurrency = lots\n", ["greenq.ini", "[worker]", "concurrency", "'lots'"]),
    ("[worker]\npool = greenlets\n", ["greenq.ini", "[worker] pool", "greenlets"]),
    ("[greenq]\nbroker_url = sqlite:///x.db\n[wroker]\npool = gevent\n", ["greenq.ini", "[wroker]",
                                                                         "did you mean 'worker'"]),
])
def test_bad_config_exits_2_with_the_message(ini, expected, sqlite_env):
    (sqlite_env.tmp / "greenq.ini").write_text(ini)
    proc = subprocess_worker_without_pool_flag(sqlite_env)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2, out
    for part in expected:
        assert part in out, (part, out)


def test_bad_flag_exits_2(sqlite_env):
    code, out = sqlite_env.run_worker("gevent", "-c", "many")
    assert code == 2 and "-c" in out and "many" in out


def test_unknown_task_is_dead_lettered_and_requeued(pool, sqlite_env):
    import e2e_tasks
    app = sqlite_env.app()
    ghost = app.send_task("shop.tasks.ghost", args=(1,))
    fine = e2e_tasks.add.delay(1, 2)
    code, out = sqlite_env.run_worker(pool)
    assert code == 0, out
    assert fine.get(timeout=10) == 3          # the worker went on
    listing = sqlite_env.admin("dlq", "list")
    assert listing.returncode == 0, listing.stderr
    assert "shop.tasks.ghost" in listing.stdout and "unknown task" in listing.stdout
    dead_id = listing.stdout.splitlines()[1].split()[0]
    shown = sqlite_env.admin("dlq", "show", dead_id)
    assert ghost.id in shown.stdout
    requeued = sqlite_env.admin("dlq", "requeue", dead_id)
    assert requeued.returncode == 0 and "requeued 1" in requeued.stdout, requeued.stdout
    queues = sqlite_env.admin("queues")
    row = [line.split() for line in queues.stdout.splitlines() if line.startswith("default")][0]
    assert row[1] == "1" and row[4] == "0", queues.stdout
