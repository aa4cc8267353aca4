"""A real ``greenq beat`` process on Redis whose lease and last-run records
were left by a scheduler with a fast clock and by garbage writes (issue 17,
item 18): it takes the lease at once and sends every second."""
from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from tests.e2e.test_beat_e2e import wait_for_slots

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("any_env", ["redis"], indirect=True)
def test_beat_runs_despite_a_fast_clock_lease_and_malformed_records(pool, any_env):
    import redis
    prefix = any_env.env["GREENQ_KEY_PREFIX"]
    client = redis.Redis.from_url(any_env.env["GREENQ_BROKER_URL"])
    client.set(f"{prefix}:beat:lease", "fast-clock-holder", px=3600 * 1000)
    client.hset(f"{prefix}:beat:runs", mapping={"tick": "garbage", "other": "1e308"})
    client.close()
    (any_env.tmp / "greenq.ini").write_text("[schedule:other]\ntask = e2e.beat_tick\nevery = 3600\n"
                                            "[schedule:tick]\ntask = e2e.beat_tick\nevery = 1\n")
    worker = any_env.worker(pool, burst=False)
    beat = subprocess.Popen([sys.executable, "-m", "greenq.cli", "-A", "e2e_tasks", "beat"], cwd=any_env.tmp,
                            env=any_env.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    any_env.procs.append(beat)
    wait_for_slots(any_env, 2, 20)             # an hour-long lease would have held it back
    beat.send_signal(signal.SIGTERM)
    out, _ = beat.communicate(timeout=30)
    worker.send_signal(signal.SIGTERM)
    worker.communicate(timeout=30)
    assert beat.returncode == 0, out
    assert "last-run record of 'tick' is not a time" in out and "took the lease" in out, out
    assert "lost the lease" not in out, out
