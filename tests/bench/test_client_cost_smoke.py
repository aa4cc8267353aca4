"""tests/bench/client_cost.py at a tiny size against the test Redis: the
client's instructions per ``delay()`` (callgrind), the figure tracked for
the caller's cost (issue 22, item 1; docs/performance.md, "The caller's
cost"), as test_bench_smoke.py tracks the worker's per task."""
import json
import os
import shutil
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))

pytestmark = [pytest.mark.bench, pytest.mark.redis, pytest.mark.timeout(300)]

#: what one delay() may execute beyond redis-py's own XADD of the same bytes:
#: 94k before the client's pool and packing were made cheaper, -18k after
#: (docs/performance.md); past this the caller's cost has regressed
DELAY_OVER_RAW_MAX = 40_000


def test_client_cost_counts_the_instructions_of_one_delay(tmp_path, redis_url, redis_prefix):
    if not (shutil.which("valgrind") and shutil.which("callgrind_control")):
        pytest.skip("valgrind is not installed")
    out_file = tmp_path / "cost.json"
    argv = [sys.executable, os.path.join(HERE, "client_cost.py"), "--broker", redis_url,
            "--prefix", redis_prefix, "--n", "200", "--batches", "2", "--instructions",
            "--instr-calls", "40", "--json", str(out_file)]
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run(argv, capture_output=True, text=True, timeout=280, cwd=str(tmp_path), env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "client: instructions per delay() (callgrind)" in done.stdout
    ins = json.loads(out_file.read_text())["instructions_per_call"]
    assert 10_000 < ins["raw"] < 1e7 and 10_000 < ins["delay"] < 1e7
    assert ins["delay_over_raw"] == ins["delay"] - ins["raw"] < DELAY_OVER_RAW_MAX, ins
