"""bin/greenq-bench end to end at tiny sizes: greenq only, on the embedded
SQLite broker, in this interpreter.  It checks that every scenario ran to
completion and that nothing was left in the broker; it asserts no timings."""
import json
import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
N = 40
N_COUNTED = 1000     # --instructions: enough that the drain outlasts the ~1 s switching callgrind on

pytestmark = [pytest.mark.bench, pytest.mark.e2e, pytest.mark.timeout(240)]


def test_bench_smoke_greenq_sqlite(tmp_path):
    pytest.importorskip("gevent")
    pytest.importorskip("psutil")
    out_file = tmp_path / "bench.json"
    argv = [sys.executable, os.path.join(REPO, "bin", "greenq-bench"), "--no-venv", "--quiet",
            "--broker", "sqlite", "--systems", "greenq",
            "--only", "noop,sleep,roundtrip,enqueue,issue2", "--pools", "gevent",
            "--n", str(N), "--concurrency", "10", "--sleep", "0.01",
            "--noop-concurrency", "10", "--roundtrips", "5", "--enqueue-n", "20",
            "--issue2-concurrency", "20", "--issue2-sleep", "0.01", "--timeout", "120",
            "--json", str(out_file)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=220, cwd=str(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "| measure | greenq |" in done.stdout

    report = json.loads(out_file.read_text())
    assert report["errors"] == []
    results = report["results"]
    for key, drain in (("noop", results["noop"]["greenq"]), ("sleep", results["sleep"]["greenq"]),
                       ("issue2", results["issue2"]["gevent"])):
        assert drain["done"] == N, key            # every task ran ...
        assert drain["left_in_broker"] == 0, key  # ... and was acknowledged
        assert drain["worker_exit"] == 0, key     # warm shutdown was clean
    assert results["roundtrip"]["greenq"]["n"] == 5
    assert results["enqueue"]["greenq"]["single"] > 0
    assert results["enqueue"]["greenq"]["bulk"] > 0


def test_bench_instructions_counts_the_drain(tmp_path):
    """--instructions: the worker runs under callgrind, which counts the drain only."""
    pytest.importorskip("gevent")
    pytest.importorskip("psutil")
    if not (shutil.which("valgrind") and shutil.which("callgrind_control")):
        pytest.skip("valgrind is not installed")
    out_file = tmp_path / "bench.json"
    argv = [sys.executable, os.path.join(REPO, "bin", "greenq-bench"), "--no-venv", "--quiet",
            "--broker", "sqlite", "--systems", "greenq", "--only", "noop", "--noop-n", str(N_COUNTED),
            "--noop-concurrency", "10", "--instructions", "--timeout", "120", "--json", str(out_file)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=220, cwd=str(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "worker instructions per task (callgrind)" in done.stdout
    noop = json.loads(out_file.read_text())["results"]["noop"]["greenq"]
    assert noop["done"] == N_COUNTED and noop["left_in_broker"] == 0
    assert 1000 < noop["worker_instructions_per_task"] < 1e8


def test_resources_hol_smoke(tmp_path):
    """tests/bench/resources_hol.py at a tiny size (Redis db 10, no PostgreSQL):
    every free task ran in both modes, and with permits the free tasks did
    not wait behind the saturated resource's backlog (300 slow tasks at limit
    2 x 0.05 s take 7.5 s to drain; the free ones finished before that)."""
    pytest.importorskip("gevent")
    redis = pytest.importorskip("redis")
    try:
        redis.Redis.from_url("redis://127.0.0.1:6379/10").ping()
    except redis.RedisError:
        if os.environ.get("GREENQ_TEST_REQUIRE_SERVICES") == "1":
            raise
        pytest.skip("no Redis on 127.0.0.1:6379")
    out_file = tmp_path / "hol.json"
    argv = [sys.executable, os.path.join(REPO, "tests", "bench", "resources_hol.py"),
            "--slow", "300", "--free", "30", "--limit", "2", "--sleep", "0.05", "-c", "20",
            "--modes", "alone,permits", "--timeout", "60", "--json", str(out_file)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=str(tmp_path))
    if "another resource benchmark holds" in done.stderr:
        pytest.skip("a resource benchmark is running on this machine")
    assert done.returncode == 0, done.stdout + done.stderr
    rows = {row["mode"]: row for row in json.loads(out_file.read_text())}
    for mode in ("alone", "permits"):
        assert rows[mode]["free_done"] == 30 and rows[mode]["complete"], rows[mode]
    assert rows["permits"]["slow_run_by_then"] < 300, rows["permits"]


def test_bench_celery_queue_smoke(tmp_path):
    """--only celeryq at a tiny size: a Celery client fills Celery's queue on
    Redis (db 14, the benchmark's), drained by a greenq worker and by a Celery
    -P gevent worker; every task ran on each and nothing was left."""
    pytest.importorskip("gevent")
    pytest.importorskip("psutil")
    pytest.importorskip("celery")
    out_file = tmp_path / "bench.json"
    argv = [sys.executable, os.path.join(REPO, "bin", "greenq-bench"), "--no-venv", "--quiet",
            "--broker", "redis", "--systems", "greenq,celery", "--only", "celeryq",
            "--noop-n", str(N), "--n", str(N), "--concurrency", "10", "--sleep", "0.01",
            "--noop-concurrency", "10", "--timeout", "120", "--json", str(out_file)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=220, cwd=str(tmp_path))
    if "another greenq-bench" in done.stderr:
        pytest.skip("a benchmark is running on this machine")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Celery's queue, sent by a Celery client: no-op drain" in done.stdout
    results = json.loads(out_file.read_text())["results"]
    for key in ("celeryq_noop", "celeryq_sleep"):
        for system in ("greenq", "celery"):
            drain = results[key][system]
            assert drain["done"] == N and drain["left_in_broker"] == 0, (key, system, drain)
            assert drain["worker_exit"] == 0, (key, system)


def test_bench_limit_and_processes_smoke(tmp_path):
    """--only limit,processes at a tiny size on Redis (db 14, the benchmark's):
    the INCR+SETNX body alone (the limit) and greenq's drain of as many such
    tasks, the rate as a percentage of the limit, and greenq's no-op drain with
    --processes 1 and 2 (the tasks counted over both processes)."""
    pytest.importorskip("gevent")
    pytest.importorskip("psutil")
    redis = pytest.importorskip("redis")
    try:
        redis.Redis.from_url("redis://127.0.0.1:6379/14").ping()
    except redis.RedisError:
        if os.environ.get("GREENQ_TEST_REQUIRE_SERVICES") == "1":
            raise
        pytest.skip("no Redis on 127.0.0.1:6379")
    out_file = tmp_path / "bench.json"
    argv = [sys.executable, os.path.join(REPO, "bin", "greenq-bench"), "--no-venv", "--quiet",
            "--broker", "redis", "--systems", "greenq", "--only", "limit,processes",
            "--limit-n", str(N * 5), "--limit-concurrency", "20", "--noop-n", str(N * 5),
            "--noop-concurrency", "10", "--worker-processes", "1,2", "--timeout", "120",
            "--json", str(out_file)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=220, cwd=str(tmp_path))
    if "another greenq-bench" in done.stderr:
        pytest.skip("a benchmark is running on this machine")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Against the limit:" in done.stdout and "| % of the limit |" in done.stdout
    results = json.loads(out_file.read_text())["results"]

    limit, greenq = results["limit"]["limit"], results["limit"]["greenq"]
    assert limit["body_calls"] == N * 5 and limit["concurrency"] == 20   # every call hit Redis
    assert limit["rate"] > 0 and limit["cpu_us_per_call"] > 0
    assert greenq["done"] == N * 5 and greenq["body_calls"] == N * 5
    assert greenq["left_in_broker"] == 0 and greenq["worker_exit"] == 0
    assert greenq["rate"] > 0 and greenq["worker_cpu_us_per_task"] > 0
    assert greenq["limit_rate"] == limit["rate"]
    assert greenq["pct_of_limit"] == pytest.approx(100.0 * greenq["rate"] / limit["rate"])
    assert greenq["loadavg_1min_before"] >= 0
    assert greenq["pct_of_limit_by_cpu"] == pytest.approx(
        100.0 * limit["cpu_us_per_call"] / greenq["worker_cpu_us_per_task"])
    assert len(greenq["pct_of_limit_rounds"]) == 1 and greenq["pct_of_limit_rounds"][0] > 0

    by_count = results["processes"]
    assert set(by_count) == {"1", "2"}
    for count, drain in by_count.items():
        assert drain["processes"] == int(count)
        assert drain["done"] == N * 5 and drain["left_in_broker"] == 0 and drain["worker_exit"] == 0
        assert sum(drain["per_process_done"]) == N * 5
        assert drain["rate"] > 0 and drain["worker_cpu_us_per_task"] > 0
    assert by_count["1"]["processes_with_tasks"] == 1
