"""How the worker and the admin tool find the app: ``-A`` and ``[greenq] app``
resolve the same way (CONTRACT.md §2), and start-up checks on its tasks."""
from __future__ import annotations

import sys
import textwrap
import uuid

import pytest

from greenq import config
from greenq.cli.common import check_app, load_app
from greenq.exceptions import ConfigError


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A directory holding a package with two apps; the current directory."""
    name = f"shop_{uuid.uuid4().hex[:8]}"
    pkg = tmp_path / name
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "tasks.py").write_text(textwrap.dedent("""
        from greenq import GreenQ
        app = GreenQ("shop", broker="memory://shop-own", key_prefix="own")
        other = GreenQ("other", broker="memory://other")

        @app.task
        def add(x, y):
            return x + y

        @other.task
        def mul(x, y):
            return x * y
        """))
    (pkg / "single.py").write_text("from greenq import GreenQ\nmine = GreenQ('single')\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    yield name
    for mod in [m for m in sys.modules if m.startswith(name)]:
        del sys.modules[mod]


def ini(tmp_path, text):
    path = tmp_path / "greenq.ini"
    path.write_text(text)
    return config.load(str(path), env={})


def test_ini_app_names_the_app_as_dash_a_does(project, tmp_path):
    cfg = ini(tmp_path, f"[greenq]\napp = {project}.tasks\n")
    app = load_app(None, cfg)
    assert app.name == "shop" and f"{project}.tasks.add" in app.tasks
    assert app.config.broker_url == "memory://shop-own"   # the app's own, the INI sets none
    assert app.config.key_prefix == "own"


def test_ini_app_module_colon_attribute(project, tmp_path):
    cfg = ini(tmp_path, f"[greenq]\napp = {project}.tasks:other\nbroker_url = memory://from-ini\n")
    app = load_app(None, cfg)
    assert app.name == "other" and f"{project}.tasks.mul" in app.tasks
    assert app.config.broker_url == "memory://from-ini"   # what the INI sets wins
    assert app.config.file == str(tmp_path / "greenq.ini")


def test_dash_a_wins_over_ini_app_and_only_instance_is_found(project, tmp_path):
    cfg = ini(tmp_path, f"[greenq]\napp = {project}.tasks\n")
    assert load_app(f"{project}.single", cfg).name == "single"


def test_ini_app_errors_name_the_file_and_key(project, tmp_path):
    cfg = ini(tmp_path, f"[greenq]\napp = {project}.nowhere\n")
    with pytest.raises(ConfigError) as info:
        load_app(None, cfg)
    assert "greenq.ini: [greenq] app" in str(info.value) and "cannot import" in str(info.value)
    cfg = ini(tmp_path, f"[greenq]\napp = {project}.tasks:missing\n")
    with pytest.raises(ConfigError, match="is not a GreenQ app"):
        load_app(None, cfg)


def test_without_any_app_a_plain_app_is_built_from_the_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    app = load_app(None, config.load(search=False, env={}))
    assert app.name == "greenq" and app.tasks == {}


def test_task_section_naming_no_task_is_a_warning_with_the_nearest_name(project, tmp_path):
    cfg = ini(tmp_path, f"[greenq]\napp = {project}.tasks\n[task:{project}.tasks.ad]\nrate_limit = 5/s\n")
    warnings = check_app(load_app(None, cfg))
    assert len(warnings) == 1
    assert f"[task:{project}.tasks.ad] names no task registered" in warnings[0]
    assert f"did you mean [task:{project}.tasks.add]?" in warnings[0]


def test_soft_limit_above_hard_limit_of_a_task_is_an_error(project, tmp_path):
    cfg = ini(tmp_path, f"[greenq]\napp = {project}.tasks\n[task:{project}.tasks.add]\nsoft_time_limit = 9\n")
    app = load_app(None, cfg)
    assert check_app(app) == []
    app.tasks[f"{project}.tasks.add"]._options["time_limit"] = 3
    with pytest.raises(ConfigError, match=f"task {project}.tasks.add: soft_time_limit = 9 is above time_limit = 3"):
        check_app(app)
