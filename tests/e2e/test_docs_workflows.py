"""docs/workflows.md, run as written (issue 11, deliverable 6): its
``# tasks.py`` block becomes tasks.py for a real worker, and each
``# example:`` block runs in a plain Python process against it."""
from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ["signatures", "chain", "chain failure", "group", "chord", "callbacks", "progress",
            "routing", "periodic"]


def blocks() -> "dict[str, str]":
    text = (ROOT / "docs" / "workflows.md").read_text()
    found = {}
    for block in re.findall(r"```python\n(.*?)```", text, re.S):
        first = block.splitlines()[0]
        if first == "# tasks.py":
            found["tasks"] = block
        elif first.startswith("# example: "):
            found[first[len("# example: "):]] = block
    return found


def test_every_example_is_found():
    assert list(blocks()) == ["tasks"] + EXAMPLES


@pytest.fixture(scope="module")
def docs_worker(tmp_path_factory):
    """One worker for every example: the page's tasks.py on a SQLite broker."""
    import os
    tmp = tmp_path_factory.mktemp("docs")
    (tmp / "tasks.py").write_text(blocks()["tasks"])
    env = {k: v for k, v in os.environ.items() if not k.startswith("GREENQ_")}
    env.update(GREENQ_BROKER_URL=f"sqlite:///{tmp / 'broker.sqlite3'}", PYTHONPATH=f"{tmp}{os.pathsep}{ROOT}",
               GREENQ_WORKER_BLOCKING_THRESHOLD="0")
    proc = subprocess.Popen([sys.executable, "-m", "greenq.worker", "-A", "tasks", "-P", "threads", "-c", "20"],
                            cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    yield tmp, env, proc
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_runs_as_written(docs_worker, name):
    tmp, env, worker = docs_worker
    done = subprocess.run([sys.executable, "-c", blocks()[name]], cwd=tmp, env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    assert worker.poll() is None
