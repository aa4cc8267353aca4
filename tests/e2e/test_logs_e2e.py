"""What the worker writes (issue 8, item 9): a banner naming the version, the
result backend, the registered tasks and their limits; the task id on every
line written while a task runs, failures and retries included; per-task lines
with their runtime at DEBUG, and no third-party DEBUG noise."""
from __future__ import annotations

import re

import greenq


def test_banner_and_task_ids_in_every_line(pool, sqlite_env):
    import e2e_tasks
    sqlite_env.app()
    sqlite_env.env["GREENQ_WORKER_LOGLEVEL"] = "DEBUG"
    failing = e2e_tasks.fail.delay("broken on purpose")
    retried = e2e_tasks.explicit_retry.delay()
    fine = e2e_tasks.add.delay(1, 2)
    code, out = sqlite_env.run_worker(pool)
    assert code == 0, out
    assert fine.get(timeout=5) == 3
    assert f"greenq {greenq.__version__} worker: app='e2e'" in out
    assert f"backend={sqlite_env.broker_url}" in out
    assert re.search(r"\n +e2e\.hard \[queue=default, max_retries=3, time_limit=0\.5\]", out), out
    assert re.search(rf"WARNING \d+ \[{failing.id}\] greenq.worker: task e2e.fail\[{failing.id}\] failed "
                     rf"after [\d.]+ s: KeyError: .broken on purpose.", out), out
    assert re.search(rf"INFO \d+ \[{retried.id}\] greenq.worker: task e2e.explicit_retry\[{retried.id}\] retry 1",
                     out), out
    assert re.search(rf"DEBUG \d+ \[{fine.id}\] greenq.worker: task e2e.add\[{fine.id}\] success in [\d.]+ s",
                     out), out
    assert not re.search(r"DEBUG \d+ \[[^]]*\] (amqp|redis|urllib3|asyncio)", out), out
