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
