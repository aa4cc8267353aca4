"""Mistakes caught when a worker starts (issue 8, item 7): each is a warning
or an error that names it and the nearest valid name."""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.e2e


def test_start_warns_of_misspelt_variables_low_prefetch_and_unknown_task_sections(pool, sqlite_env):
    (sqlite_env.tmp / "greenq.ini").write_text("[worker]\nconcurrency = 8\nprefetch = 2\n"
                                               "[task:e2e.ad]\nrate_limit = 5/s\n")
    sqlite_env.env["GREENQ_WORKER_CONCURENCY"] = "50"
    code, out = sqlite_env.run_worker(pool, "--config", "greenq.ini")
    assert code == 0, out
    warnings = [line for line in out.splitlines() if " WARNING " in line]
    assert any("GREENQ_WORKER_CONCURENCY" in w and "did you mean 'GREENQ_WORKER_CONCURRENCY'?" in w
               for w in warnings), out
    assert any("[worker] prefetch = 2 is below [worker] concurrency = 8" in w for w in warnings), out
    assert any("[task:e2e.ad] names no task registered" in w and "did you mean [task:e2e.add]?" in w
               for w in warnings), out
    assert len(warnings) == 3, out   # each once


def test_a_soft_limit_above_the_hard_limit_stops_the_start(pool, sqlite_env):
    (sqlite_env.tmp / "greenq.ini").write_text("[task:e2e.hard]\nsoft_time_limit = 2\n")
    code, out = sqlite_env.run_worker(pool, "--config", "greenq.ini")
    assert code == 2, out
    assert "task e2e.hard: soft_time_limit = 2 is above time_limit = 0.5" in out, out
