"""tests/bench/inflight_memory.py at a tiny size: a real gevent worker on
Redis with 50 tasks in flight.  It checks that every run reached its state
(the script fails otherwise: all 50 running and held), that the dumps name
greenq's per-job sites, and that the queue was cleaned up; it asserts no
memory figure (they move with the machine)."""
import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))

pytestmark = [pytest.mark.bench, pytest.mark.e2e, pytest.mark.timeout(240)]


def test_inflight_memory_smoke(redis_url, tmp_path):
    pytest.importorskip("gevent")
    pytest.importorskip("psutil")
    out = tmp_path / "inflight.json"
    done = subprocess.run([sys.executable, os.path.join(HERE, "inflight_memory.py"), "--pools", "gevent",
                           "--tasks", "50", "--redis", redis_url, "--timeout", "120", "--json", str(out)],
                          capture_output=True, text=True, timeout=220, cwd=str(tmp_path),
                          env={**os.environ, "PYTHONPATH": REPO})
    assert done.returncode == 0, done.stdout + done.stderr
    [result] = json.loads(out.read_text())
    assert result["pool"] == "gevent" and result["tasks"] == 50
    assert result["rss_n"] > 0 and result["rss_0"] > 0 and result["rss_idle_c10"] > 0
    assert result["greenlets_n"] >= 50
    sites = {site["site"].split(":")[0] for site in result["top"]}
    assert "greenq/message.py" in sites                      # the decoded message of each running task
    # runners are spawned on demand: the runner of each task shows with the tasks, none at 0 in flight
    assert "greenq/worker/runners.py" in sites
    assert "B per task in flight" in done.stdout
    import redis
    client = redis.Redis.from_url(redis_url)
    try:
        assert not list(client.scan_iter(match="inflight*", count=1000))
    finally:
        client.close()
