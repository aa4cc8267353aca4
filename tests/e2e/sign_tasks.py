"""Tasks of tests/e2e/test_signed_records_e2e.py (``-A sign_tasks``): tasks
that end their process's way out (``sys.exit``, ``KeyboardInterrupt``)."""
import os
import sys

from greenq import GreenQ

app = GreenQ.from_config(name="sign")


def _mark(name):
    with open(os.path.join(os.environ["E2E_MARKERS"], name), "a") as fh:
        fh.write(f"{os.getpid()}\n")


@app.task(name="sign.exits")
def exits(code):
    _mark("exits")
    sys.exit(code)


@app.task(name="sign.interrupted")
def interrupted():
    _mark("interrupted")
    raise KeyboardInterrupt("from the task")


@app.task(name="sign.add")
def add(x, y):
    return x + y
