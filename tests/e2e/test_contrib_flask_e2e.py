"""greenq.contrib.flask against real Flask (issue 23, item 5): the app
factory of tests/e2e/contrib_projects/flaskshop served by a real gunicorn
(two sync workers) enqueues through the extension; a real greenq-worker
--burst runs the tasks inside the Flask app's context; gunicorn serves the
results."""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from greenq.exceptions import ConfigError

flask = pytest.importorskip("flask")
pytest.importorskip("gunicorn")

PROJECT = Path(__file__).resolve().parent / "contrib_projects" / "flaskshop"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def gunicorn(sqlite_env):
    """gunicorn serving ``shop:create_app()``; its base URL.  The broker URL
    reaches greenq through the Flask config only (SHOP_BROKER)."""
    env = sqlite_env
    env.env["SHOP_BROKER"] = env.env.pop("GREENQ_BROKER_URL")
    env.env["SHOP_LOG"] = str(env.tmp / "shop.log")
    env.env["PYTHONPATH"] = os.pathsep.join([str(PROJECT), env.env["PYTHONPATH"]])
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "--workers", "2", "--bind", f"127.0.0.1:{port}",
                             "shop:create_app()"], cwd=env.tmp, env=env.env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:          # gunicorn says nothing when it is ready: try its port
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise AssertionError(f"gunicorn did not start:\n{proc.communicate()[0]}")
            time.sleep(0.05)
    yield env, base
    proc.send_signal(signal.SIGTERM)
    try:
        proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()


def _call(url: str, method: str = "GET") -> dict:
    with urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=30) as answer:
        return json.loads(answer.read())


def test_gunicorn_enqueues_and_a_worker_runs_the_tasks_in_the_flask_app_context(gunicorn):
    env, base = gunicorn
    sent = [_call(f"{base}/greet/{word}", "POST") for word in ("ann", "bob", "cy")]
    served_by = {s["pid"] for s in sent}
    code, out = env.run_worker("gevent", "-A", "shop.worker")
    assert code == 0, out
    assert "3 succeeded, 0 failed" in out and "queues=web" in out, out
    # results read back through gunicorn; the Flask config's greeting came from the app context
    assert [_call(f"{base}/result/{s['id']}")["result"] for s in sent] == ["hello, ann", "hello, bob", "hello, cy"]
    lines = sorted(line.split() for line in (env.tmp / "shop.log").read_text().splitlines())
    assert [line[:2] for line in lines] == [["ann", "flaskshop"], ["bob", "flaskshop"], ["cy", "flaskshop"]]
    ran_in = {int(line[2]) for line in lines}
    assert len(ran_in) == 1 and not ran_in & served_by      # in the worker, not in gunicorn


def test_init_app_reads_the_flask_config(tmp_path, caplog, monkeypatch):
    from greenq.contrib.flask import GreenQ
    for name in [n for n in os.environ if n.startswith("GREENQ_")]:
        monkeypatch.delenv(name)
    ext = GreenQ("unit", config_file=False)
    app = flask.Flask("unit")
    app.config.update(GREENQ_BROKER_URL=f"sqlite:///{tmp_path / 'b.sqlite3'}", GREENQ_WORKER_CONCURRENCY=7,
                      GREENQ_WORKER_CONCURENCY=8)
    with caplog.at_level(logging.WARNING, logger="greenq.config"):
        ext.init_app(app)
    assert ext.app.config.worker["concurrency"] == 7
    assert ext.app.config.origin("worker", "concurrency") == "Flask config GREENQ_WORKER_CONCURRENCY"
    assert app.extensions["greenq"] is ext
    assert "Flask config GREENQ_WORKER_CONCURENCY is not a greenq setting and is ignored; " \
           "did you mean GREENQ_WORKER_CONCURRENCY?" in caplog.text
    app.config["GREENQ_WORKER_CONCURRENCY"] = "many"
    with pytest.raises(ConfigError, match=r"Flask config GREENQ_WORKER_CONCURRENCY: \[worker\] concurrency = "
                                          r"'many': expected a whole number"):
        ext.init_app(app)
