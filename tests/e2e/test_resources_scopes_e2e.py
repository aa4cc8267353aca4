"""Resource permits shared between real worker processes (issue 20, scopes):
a ``scope = host`` limit holds across ``--processes`` children and across
workers started apart, a ``scope = cluster`` limit across two workers on every
broker, and a worker killed with kill -9 while holding cluster permits gives
them back within ``lease_seconds``: the other worker then finishes everything.

The tasks (tests/e2e/resource_tasks.py) log when they start and end inside
their permit; ``most_at_once`` rebuilds from that log how many held the
resource at once across every process."""
from __future__ import annotations

import os
import signal
import sys
import time

import pytest

from tests.e2e.conftest import HERE, Env

pytestmark = pytest.mark.e2e

TASKS = ["-A", "resource_tasks"]
OTHER = {"db": "[resource:api]\nlimit = 1\n", "api": "[resource:db]\nlimit = 1\n"}   # every name needs a section


def rows(env) -> "list[tuple[str, int, int, float]]":
    path = env.markers / "permits.log"
    if not path.exists():
        return []
    found = []
    for line in path.read_text().splitlines():
        event, pid, n, at = line.split()
        found.append((event, int(pid), int(n), float(at)))
    return found


def most_at_once(log, killed: "dict[int, float]" = None) -> int:
    """The most tasks that held the permit at once.  A task that started and
    never ended must belong to a killed process (pid -> when it was killed),
    and held its permit until then."""
    killed = killed or {}
    opened, events = {}, []
    for event, pid, n, at in log:
        if event == "start":
            assert (pid, n) not in opened, log
            opened[(pid, n)] = at
        else:
            events += [(opened.pop((pid, n)), 1), (at, -1)]
    for (pid, n), at in opened.items():
        assert pid in killed, f"task {n} started in {pid} and never ended: {log}"
        events += [(at, 1), (killed[pid], -1)]
    held = most = 0
    for _, step in sorted(events):      # at one instant an end (-1) sorts before a start
        held += step
        most = max(most, held)
    return most


def send(env, task: str, count: int, *args, queues: "tuple[str, ...]" = ()) -> list:
    """``count`` calls of ``task``; with ``queues``, spread over them in turn."""
    app = env.app("resource_tasks")
    sender = app.tasks[task]
    if not queues:
        return [sender.delay(n, *args) for n in range(count)]
    return [sender.apply_async((n, *args), queue=queues[n % len(queues)]) for n in range(count)]


def results(results_, said, timeout: float = 60) -> list:
    """Every task's value; on a timeout, what the workers printed (``said``,
    or a callable that stops them and returns it)."""
    try:
        return [r.get(timeout=timeout) for r in results_]
    except Exception as exc:
        raise AssertionError(f"{exc}; the workers said:\n{said() if callable(said) else said}") from exc


def finish(proc, timeout: float = 120) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out
    return out


def ready_workers(env, procs, count: int) -> None:
    """Wait until ``count`` worker processes said they consume (resource_tasks
    writes ``ready-<pid>`` from worker_process_init)."""
    deadline = time.monotonic() + 60
    while len(list(env.markers.glob("ready-*"))) < count:
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), env.dump()
        time.sleep(0.02)


def run_on_ready_workers(env, procs, count: int, task: str, n: int, seconds: float,
                         queues: "tuple[str, ...]" = ()) -> "list[str]":
    """Send ``n`` tasks once ``count`` worker processes are ready, wait for
    every value, stop the workers warm and return what they printed.  Not
    --burst: a burst worker that started late under load would find the
    queue empty and leave, and the test could not tell that both shared."""
    ready_workers(env, procs, count)
    sent = send(env, task, n, seconds, queues=queues)
    values = results(sent, env.dump)
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    outs = [finish(p) for p in procs]
    assert values == list(range(n)), outs
    return outs


def fair_parts(log, n: int, limit: int = 2) -> "dict[int, int]":
    """Tasks run per process; each must have run at least a quarter of the ``n``
    (permits are handed out fairly between the processes that wait:
    greenq/resources/fair.py), a fifth with a limit of 1: its one permit
    goes to the process that has waited longest, in turns of 0.1 s from its
    first grant, so a process stalled on a loaded machine keeps its place in
    line (with the clock turns of before, a CI run saw 7 of 40, and runs here
    8 and 9).  Not a quarter: at a limit of 1 a split also follows which
    process fetched the tasks (11 of 40 seen once in 16 runs, when they
    reached the processes in batches a second apart).  Over
    the run, not over each stretch of it: a process that does not poll for
    over half a second stops counting as waiting, and the other takes every
    place meanwhile (the shares themselves:
    tests/integration/test_fair_permits.py).  Without the shares one process
    ran all of them.

    And the permits must be held at least 40 % of the time, from the first
    start to the last end: they were held 6 to 28 % while a refused waiter
    was asked again after the admission loop's idle second instead of its
    poll, and the tasks deferred over the bound on waiters came back a fixed
    second later (77 to 95 % since, on a loaded machine)."""
    starts = [pid for event, pid, _, _ in log if event == "start"]
    runs = {pid: starts.count(pid) for pid in set(starts)}
    times = [at for _, _, _, at in log]
    held = sum(at for event, _, _, at in log if event == "end") - sum(at for event, _, _, at in log if event == "start")
    print(f"{os.environ.get('PYTEST_CURRENT_TEST', '').split(' ')[0]}: tasks run per process "
          f"{sorted(runs.values())}; the permits held {held / (limit * (max(times) - min(times))):.0%} of the time")
    assert len(runs) == 2 and min(runs.values()) >= n / (5 if limit == 1 else 4), runs
    assert held / (limit * (max(times) - min(times))) >= 0.4, (held, limit, max(times) - min(times))
    return runs


@pytest.mark.parametrize("layout", ["processes", "two workers"])
@pytest.mark.parametrize("limit", [1, 2])
def test_a_host_limit_holds_across_worker_processes_and_is_shared_fairly(pool, sqlite_env, layout, limit):
    if pool != "gevent":
        pytest.skip("one green driver is enough: the permits are the same lock files under every driver")
    env = sqlite_env
    (env.tmp / "greenq.ini").write_text(f"[resource:db]\nlimit = {limit}\nscope = host\n\n" + OTHER["db"])
    opts = [*TASKS, "-c", "4", "--prefetch", "4"]
    if layout == "processes":
        procs = [env.worker(pool, *opts, "--processes", "2", burst=False)]
    else:
        procs = [env.worker(pool, *opts, burst=False) for _ in range(2)]
    # one queue: whichever process fetched a task, each runs a fair part of them
    run_on_ready_workers(env, procs, 2, "res.db", 40, 0.05 * limit)
    log = rows(env)
    assert most_at_once(log) == limit, log      # never above the machine's limit, and reached
    fair_parts(log, 40, limit)


def test_a_cluster_limit_holds_across_two_workers(pool, any_env):
    env = any_env
    (env.tmp / "greenq.ini").write_text("[resource:api]\nlimit = 3\nscope = cluster\n\n" + OTHER["api"])
    procs = [env.worker(pool, *TASKS, "-c", "5", "--prefetch", "2", burst=False) for _ in range(2)]
    outs = run_on_ready_workers(env, procs, 2, "res.api", 40, 0.1)
    log = rows(env)
    assert most_at_once(log) == 3, log          # never above the fleet's limit, and reached
    assert len({pid for event, pid, _, _ in log if event == "start"}) == 2, (log, outs)
    fair_parts(log, 40, 3)


@pytest.mark.redis
def test_a_cluster_limit_of_two_is_shared_fairly_on_redis(pool, redis_url, redis_prefix, tmp_path):
    if pool != "gevent":
        pytest.skip("one green driver is enough: the lease and the waiters' record are the broker's")
    sys.path.insert(0, str(HERE))
    env = Env(tmp_path, redis_url, {"GREENQ_KEY_PREFIX": redis_prefix})
    try:
        (env.tmp / "greenq.ini").write_text("[resource:api]\nlimit = 2\nscope = cluster\n\n" + OTHER["api"])
        procs = [env.worker(pool, *TASKS, "-c", "4", "--prefetch", "4", burst=False) for _ in range(2)]
        run_on_ready_workers(env, procs, 2, "res.api", 40, 0.1)
        log = rows(env)
        assert most_at_once(log) == 2, log
        fair_parts(log, 40)
    finally:
        env.cleanup()


LEASE = 3.0


def test_a_killed_holders_cluster_permits_come_back_to_the_other_worker(pool, any_env):
    env = any_env
    (env.tmp / "greenq.ini").write_text(f"[greenq]\nlease_seconds = {LEASE:g}\n\n"
                                        "[resource:api]\nlimit = 3\nscope = cluster\n\n" + OTHER["api"])
    sent = send(env, "res.api", 12, 0.1, True)       # gated: the first holders wait for "go"
    # a small prefetch: the victim holds 3 running and at most 3 waiting, so
    # the survivor has messages it could run at once but for the permits
    victim = env.worker(pool, *TASKS, "-c", "3", "--prefetch", "3", burst=False)
    deadline = time.monotonic() + 60
    while sum(event == "start" for event, *_ in rows(env)) < 3:   # the victim holds all 3 permits
        assert time.monotonic() < deadline and victim.poll() is None, env.dump()
        time.sleep(0.02)
    # not --burst: on RabbitMQ a burst worker cannot see another consumer's
    # unacknowledged messages; the results say when everything is done
    survivor = env.worker(pool, *TASKS, "-c", "6", burst=False)
    victim.kill()
    victim.wait()
    killed_at = time.monotonic()
    (env.markers / "go").write_text("")
    values = results(sent, env.dump, timeout=60) if survivor.poll() is None else None
    survivor.send_signal(signal.SIGTERM)
    out = finish(survivor)
    assert values == list(range(12)), out
    log = rows(env)
    assert {pid for event, pid, _, _ in log if event == "start"} == {victim.pid, survivor.pid}, log
    assert sum(event == "start" and pid == victim.pid for event, pid, _, _ in log) == 3, log
    assert sorted(n for event, pid, n, _ in log if event == "end" and pid == survivor.pid) == list(range(12)), log
    assert most_at_once(log, killed={victim.pid: killed_at}) == 3, log
    first = min(at for event, pid, _, at in log if event == "start" and pid == survivor.pid)
    # the permits came back within lease_seconds (slack for a loaded machine) ...
    assert first - killed_at < LEASE + 5, (first - killed_at, out)
    if env.kind != "amqp":
        # ... and not before the victim's lease ran out: its last renewal was at
        # most lease/3 before the kill.  (On RabbitMQ the kernel closes a killed
        # process's connection, so its exclusive queues go at once.)
        assert first - killed_at > LEASE / 2, (first - killed_at, out)
