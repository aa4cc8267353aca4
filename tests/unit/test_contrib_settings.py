"""greenq/contrib/_settings.py: a framework's GREENQ_* settings as greenq
settings, under the INI file and the environment (docs/frameworks.md)."""
from __future__ import annotations

import pytest

from greenq.contrib import _settings
from greenq.exceptions import ConfigError


def test_framework_settings_are_the_lowest_layer(tmp_path):
    ini = tmp_path / "greenq.ini"
    ini.write_text("[worker]\nprefetch = 50\n")
    values = {"GREENQ_BROKER_URL": "redis://h/1", "GREENQ_WORKER_CONCURRENCY": 20, "GREENQ_WORKER_PREFETCH": 30,
              "GREENQ_WORKER_QUEUES": ["a", "b"], "GREENQ_EAGER": True, "GREENQ_WORKER_LOGLEVEL": "debug",
              "GREENQ_CONFIG": str(ini)}
    cfg = _settings.load(values, "Django setting", env={"GREENQ_WORKER_CONCURRENCY": "40"}, quiet=True)
    assert cfg.broker_url == "redis://h/1" and cfg.eager is True
    assert cfg.origin("greenq", "broker_url") == "Django setting GREENQ_BROKER_URL"
    assert cfg.worker["queues"] == ["a", "b"] and cfg.worker["loglevel"] == "DEBUG"
    assert (cfg.worker["concurrency"], cfg.origin("worker", "concurrency")) \
        == (40, "environment GREENQ_WORKER_CONCURRENCY")
    assert (cfg.worker["prefetch"], cfg.origin("worker", "prefetch")) == (50, str(ini))
    assert cfg.file == str(ini)


def test_config_file_false_reads_no_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "greenq.ini").write_text("[greenq]\nbroker_url = redis://from-file/0\n")
    assert _settings.load({}, "Flask config", env={}, quiet=True).broker_url == "redis://from-file/0"
    cfg = _settings.load({}, "Flask config", config_file=False, env={}, quiet=True)
    assert cfg.file is None and cfg.origin("greenq", "broker_url") == "default"


def test_unknown_names_get_the_nearest_and_bad_values_the_name():
    assert _settings.unknown(["GREENQ_BROKER_URL", "GREENQ_BROKR_URL", "GREENQ_CONFIG", "GREENQ_ZZZZZZZZZZZZZZZ"]) \
        == [("GREENQ_BROKR_URL", "GREENQ_BROKER_URL"), ("GREENQ_ZZZZZZZZZZZZZZZ", "")]
    cfg = _settings.load({"GREENQ_BROKR_URL": "x"}, "Flask config", env={}, config_file=False, quiet=True)
    assert cfg.warnings == ["Flask config GREENQ_BROKR_URL is not a greenq setting and is ignored; "
                            "did you mean GREENQ_BROKER_URL?"]
    with pytest.raises(ConfigError, match=r"^Django setting GREENQ_WORKER_CONCURRENCY: \[worker\] concurrency "
                                          r"= -1: must be >= 0"):
        _settings.load({"GREENQ_WORKER_CONCURRENCY": -1}, "Django setting", env={}, config_file=False)
