"""The hook recipes of docs/worker.md, run as written with real workers under
every driver and with --processes 2 (issue 9, deliverable 1), and the rules for
hooks that fail."""
from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sqlalchemy")
pytest.importorskip("django")

ROOT = Path(__file__).resolve().parents[2]

PRELUDE = '''
import os

import django
from django.conf import settings

settings.configure(DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3",
                                          "NAME": os.environ["DJANGO_DB"]}})
django.setup()

from greenq import GreenQ

app = GreenQ.from_config(name="recipes")
'''

TEST_PARTS = '''

@app.task(name="recipes.boom")
def boom(n):
    raise ValueError(f"boom {n}")


@app.on("worker_process_init")
def mark_init(worker):   # test only: one marker per process that opened its engine
    if os.environ.get("RECIPES_FAIL_INIT"):
        raise RuntimeError("cannot reach the database")
    with open(os.path.join(os.environ["E2E_MARKERS"], f"init.{os.getpid()}"), "w") as fh:
        fh.write(type(engine).__name__)


@app.on("task_prerun")
def buggy_hook(task, request):   # test only: a failing hook changes nothing else
    if request.args and request.args[0] == 13:
        raise RuntimeError("bug in a hook")
'''


def recipes() -> str:
    """The python blocks marked ``# recipe:`` in docs/worker.md, in order."""
    text = (ROOT / "docs" / "worker.md").read_text()
    blocks = re.findall(r"```python\n(# recipe: .*?)```", text, re.S)
    assert [b.splitlines()[0] for b in blocks] == ["# recipe: sqlalchemy", "# recipe: django",
                                                     "# recipe: error tracker"]
    return "\n\n".join(blocks)


@pytest.fixture
def recipes_env(sqlite_env):
    tmp = sqlite_env.tmp
    (tmp / "recipes_app.py").write_text(PRELUDE + recipes() + TEST_PARTS)
    db = tmp / "shop.db"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY)")
    conn.executemany("INSERT INTO orders VALUES (?)", [(1,), (2,), (3,)])
    conn.commit()
    conn.close()
    sqlite_env.env.update({"DATABASE_URL": f"sqlite:///{db}", "DJANGO_DB": str(tmp / "django.db"),
                           "TRACKER_FILE": str(tmp / "tracker.jsonl"),
                           "PYTHONPATH": os.pathsep.join([str(tmp), sqlite_env.env["PYTHONPATH"]])})
    return sqlite_env


def run_recipes_worker(env, pool, *args, timeout=120):
    cmd = [sys.executable, "-m", "greenq.worker", "-A", "recipes_app", "--pool", pool, "--burst", *args]
    proc = subprocess.run(cmd, cwd=env.tmp, env=env.env, capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.mark.parametrize("processes", ["1", "2"])
def test_recipes_end_to_end(pool, recipes_env, processes):
    app = recipes_env.app()
    counts = [app.send_task("recipes.count_orders") for _ in range(6)]
    booms = [app.send_task("recipes.boom", args=(n,)) for n in (1, 2, 13)]
    code, out = run_recipes_worker(recipes_env, pool, "--processes", processes, "-c", "4")
    assert code == 0, out
    assert [r.get(timeout=10) for r in counts] == [3] * 6
    assert all(r.state == "FAILURE" for r in booms), out
    # the error tracker saw each failure with its task id and arguments
    lines = [json.loads(x) for x in (recipes_env.tmp / "tracker.jsonl").read_text().splitlines()]
    assert sorted(x["task_id"] for x in lines) == sorted(r.id for r in booms)
    assert sorted(x["args"][0] for x in lines) == [1, 2, 13]
    # an engine per worker process, opened after the fork
    inits = list(recipes_env.markers.glob("init.*"))
    assert inits and all(p.read_text() == "Engine" for p in inits), out
    if processes == "2":
        assert len(inits) >= 2, out
    # the failing hook was logged with the task id and changed nothing else
    thirteen = booms[2]
    assert re.search(rf"\[{thirteen.id}\] greenq.hooks: hook task_prerun .*buggy_hook.* failed", out), out
    exc = thirteen.get(timeout=1, propagate=False)
    assert isinstance(exc, ValueError) and str(exc) == "boom 13"
    assert out.count("greenq.hooks: hook") == 1, out       # the recipes' own hooks never failed


def test_failing_worker_process_init_stops_before_taking_a_message(pool, recipes_env):
    recipes_env.env["RECIPES_FAIL_INIT"] = "1"
    app = recipes_env.app()
    waiting = app.send_task("recipes.count_orders")
    code, out = run_recipes_worker(recipes_env, pool)
    assert code == 1, out
    assert "worker_process_init hook failed: RuntimeError: cannot reach the database" in out
    assert waiting.state == "PENDING"
    [stats] = app.broker.queue_stats(["default"])
    assert (stats.ready, stats.held) == (1, 0)
