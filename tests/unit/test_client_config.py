"""The client reads the layers the worker reads (issue 18, item 3), and
``get()`` refuses to wait inside a running task (item 5)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from greenq import GreenQ
from greenq.cli.common import load_app
from greenq.config import load
from greenq.result import AsyncResult
from greenq.task import Request, set_request

ROOT = Path(__file__).resolve().parents[2]
INI = ("[greenq]\nkey_prefix = shop\nbroker_url = memory://from-ini\nlease_seconds = 12\n\n"
       "[worker]\nqueues = high,default\n")


@pytest.fixture
def in_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("GREENQ_KEY_PREFIX", "GREENQ_BROKER_URL", "GREENQ_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "greenq.ini").write_text(INI)
    return tmp_path


def test_constructor_reads_greenq_ini_like_the_worker(in_dir):
    app = GreenQ("shop", broker="memory://from-code")
    assert app.config.key_prefix == "shop" and app.config.worker["queues"] == ["high", "default"]
    assert app.config.broker_url == "memory://from-code"           # explicit keywords win
    assert app.config.file == "./greenq.ini"


def test_environment_beats_the_file_and_keywords_beat_both(in_dir, monkeypatch):
    monkeypatch.setenv("GREENQ_KEY_PREFIX", "from-env")
    monkeypatch.setenv("GREENQ_LEASE_SECONDS", "20")
    app = GreenQ("shop", lease_seconds=40)
    assert app.config.key_prefix == "from-env" and app.config.lease_seconds == 40


def test_greenq_config_names_the_file(in_dir, monkeypatch):
    other = in_dir / "other.ini"
    other.write_text("[greenq]\nkey_prefix = other\n")
    monkeypatch.setenv("GREENQ_CONFIG", str(other))
    assert GreenQ("shop").config.key_prefix == "other"
    assert GreenQ("shop", config_file=str(in_dir / "greenq.ini")).config.key_prefix == "shop"


def test_config_file_false_reads_no_file(in_dir):
    app = GreenQ("shop", broker="memory://x", config_file=False)
    assert app.config.key_prefix == "greenq" and app.config.file is None
    with pytest.raises(TypeError):
        GreenQ("shop", config_file=True)


def test_an_app_imported_under_config_reads_that_file(in_dir, monkeypatch):
    """``greenq-worker --config conf.ini -A mod`` beside another ./greenq.ini:
    a GreenQ(...) built at import reads conf.ini, as the worker does."""
    (in_dir / "conf.ini").write_text("[greenq]\nkey_prefix = conf\n")
    (in_dir / "cc_import_app.py").write_text("from greenq import GreenQ\napp = GreenQ('shop')\n")
    monkeypatch.syspath_prepend(str(in_dir))
    app = load_app("cc_import_app", load(str(in_dir / "conf.ini"), env={}))
    assert app.config.key_prefix == "conf"
    assert app.config.lease_seconds == 30                 # nothing of ./greenq.ini
    import os
    assert "GREENQ_CONFIG" not in os.environ              # restored after the import


def test_config_show_names_the_key_prefix(in_dir):
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "greenq.cli", "config", "show"], cwd=in_dir, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "key_prefix: shop, ./greenq.ini" in done.stdout.splitlines()[0]


def test_get_inside_a_worker_task_raises_at_once():
    app = GreenQ("t", broker="memory://get-in-task", config_file=False)
    set_request(Request("parent", "t.parent", (), {}))
    try:
        with pytest.raises(RuntimeError, match="Never call result.get"):
            AsyncResult("child", app).get(timeout=30)
    finally:
        set_request(None)
    set_request(Request("parent", "t.parent", (), {}, is_eager=True))   # eager: allowed
    try:
        with pytest.raises(TimeoutError):
            AsyncResult("child", app).get(timeout=0.01)
    finally:
        set_request(None)
