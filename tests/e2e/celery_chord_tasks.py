"""Tasks a greenq worker runs under the Celery names of
tests/e2e/transport_redis/test_celery_chords_e2e.py: chord members and
bodies.  Each run is written to a marker file (the test counts how often a
body ran)."""
import json
import os

from greenq import GreenQ

app = GreenQ.from_config(name="celery-chords")


def _record(name, value):
    marker_dir = os.environ.get("E2E_MARKERS")
    if marker_dir:
        with open(os.path.join(marker_dir, name), "a") as fh:
            fh.write(json.dumps(value) + "\n")


@app.task(name="chords.add")
def add(x, y):
    _record("add", [x, y])
    return x + y


@app.task(name="chords.tsum")
def tsum(values):
    _record("tsum", values)
    return sum(values)


@app.task(name="chords.boom")
def boom(x):
    raise ValueError(f"boom {x}")


@app.task(name="chords.errback", bind=True)
def errback(self, task_id):
    _record("errback", [task_id, self.request.id])
    return task_id


@app.task(name="chords.held", track_started=True)
def held(release):
    """Runs until the file ``release`` exists (at most 20 s): its STARTED is read meanwhile."""
    import time
    _record("held", release)
    deadline = time.monotonic() + 20
    while not os.path.exists(release) and time.monotonic() < deadline:
        time.sleep(0.02)
    return "released"
