"""Ceilings and finite numbers (issue 17, items 6, 15 and 20): every number an
operator can raise has a documented ceiling, checked wherever the setting is
set (INI file, environment, CLI flags, GreenQ(...)), and nan and infinities
are refused; ``greenq queues`` never sends an amqps:// broker's password over
plain HTTP."""
from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from greenq import ConfigError, GreenQ, validation
from greenq import config as gq_config
from greenq.transports.amqp.management import management_url, rabbitmq_queues

ROOT = Path(__file__).resolve().parents[2]
CEILINGS = [(section, key, setting) for section, keys in gq_config.SETTINGS.items()
            for key, setting in keys.items() if setting.type in ("int", "float")]


def load(pairs=None, env=None):
    return gq_config.load(search=False, env=env or {}, overrides=pairs or {})


def greenq(tmp_path, ini: str, *args: str, env=None) -> subprocess.CompletedProcess:
    """The real ``greenq`` command in a subprocess, on ``ini``."""
    path = tmp_path / "greenq.ini"
    path.write_text(ini)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("GREENQ_")}
    clean.update(PYTHONPATH=str(ROOT), **(env or {}))
    return subprocess.run([sys.executable, "-m", "greenq.cli", "--config", str(path), *args],
                          capture_output=True, text=True, env=clean, cwd=tmp_path, timeout=60)


def test_every_number_an_operator_can_raise_has_a_ceiling():
    assert [f"[{s}] {k}" for s, k, setting in CEILINGS if setting.high is None] == []
    assert gq_config.SETTINGS["worker"]["concurrency"].high == validation.MAX_CONCURRENCY
    assert gq_config.SETTINGS["worker"]["prefetch"].high == validation.MAX_PREFETCH == 65535


def test_the_ceilings_table_in_the_docs_lists_every_ceiling():
    docs = (ROOT / "docs" / "configuration.md").read_text()
    table = docs[docs.index("### Ceilings"):]
    for section, key, setting in CEILINGS:
        row = re.search(rf"^\| `\[{section}\] {key}` \| ([^|]+) \|", table, re.M)
        assert row, f"[{section}] {key} missing from the ceilings table"
        assert f"{setting.high:.0f}" in row.group(1).replace(",", ""), (key, row.group(1))


@pytest.mark.parametrize("section, key, setting", CEILINGS, ids=[f"{s}.{k}" for s, k, _ in CEILINGS])
def test_each_ceiling_is_accepted_and_one_above_refused(section, key, setting):
    top = int(setting.high) if setting.type == "int" else setting.high
    assert load({(section, key): str(top)}).section(section)[key] == top
    above = top + 1
    with pytest.raises(ConfigError, match=rf"\[{section}\] {key} = '{above}': above the ceiling of {setting.high:.0f}"):
        load({(section, key): str(above)})
    env = {gq_config.env_name(section, key): str(above)}
    with pytest.raises(ConfigError, match=rf"environment {gq_config.env_name(section, key)}: .*above the ceiling"):
        load(env=env)


FLOATS = [(s, k) for s, k, setting in CEILINGS if setting.type == "float"]


@pytest.mark.parametrize("text", ["nan", "NaN", "inf", "-inf", "infinity", "1e309"])
@pytest.mark.parametrize("section, key", FLOATS, ids=[f"{s}.{k}" for s, k in FLOATS])
def test_nan_and_infinities_are_refused_in_every_float_setting(section, key, text):
    with pytest.raises(ConfigError, match="finite number|>= 0"):
        load(env={gq_config.env_name(section, key): text})
    with pytest.raises(ConfigError, match="finite number|>= 0"):
        load({(section, key): float(text)})               # a CLI flag (argparse type=float) or GreenQ(...)


def test_greenq_constructor_refuses_nan():
    with pytest.raises(ConfigError, match=r"lease_seconds.*finite"):
        GreenQ("x", broker="memory://", lease_seconds=float("nan"))


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=30), st.floats(allow_nan=True, allow_infinity=True),
                 st.integers(min_value=-10 ** 30, max_value=10 ** 30)))
def test_the_number_converters_return_a_finite_number_or_refuse(raw):
    for kind in ("int", "float"):
        try:
            value = gq_config.convert(kind, raw if not isinstance(raw, float) or kind == "float" else str(raw))
        except ValueError:
            continue
        assert isinstance(value, int if kind == "int" else float) and math.isfinite(value) and value >= 0


def test_prefetch_above_basic_qos_limit_is_refused_wherever_it_is_read():
    with pytest.raises(ConfigError, match="ceiling of 65535"):
        gq_config.effective_prefetch(100, 70000)
    with pytest.raises(ConfigError, match="ceiling of 10000"):
        gq_config.effective_prefetch(100000, 0)
    assert gq_config.effective_prefetch(validation.MAX_CONCURRENCY, 0) <= validation.MAX_PREFETCH


@pytest.mark.parametrize("line, shown", [
    ("[worker]\nprefetch = 70000\n", "[worker] prefetch = '70000': above the ceiling of 65535"),
    ("[worker]\nconcurrency = 100000\n", "[worker] concurrency = '100000': above the ceiling of 10000"),
    ("[worker]\nprocesses = 100000\n", "[worker] processes = '100000': above the ceiling"),
    ("[worker]\nshutdown_timeout = nan\n", "[worker] shutdown_timeout = 'nan': expected a finite number"),
    ("[greenq]\nlease_seconds = nan\n", "[greenq] lease_seconds = 'nan': expected a finite number"),
    ("[greenq]\nlease_seconds = inf\n", "[greenq] lease_seconds = 'inf': expected a finite number"),
    ("[greenq]\nmax_message_size = 10000000000\n", "[greenq] max_message_size = '10000000000': above"),
    ("[greenq]\nresult_expires = 99999999999\n", "[greenq] result_expires = '99999999999': above"),
    ("[greenq]\nmax_deliveries = 100000\n", "[greenq] max_deliveries = '100000': above"),
    ("[redis]\nmax_connections = 1000000\n", "[redis] max_connections = '1000000': above"),
    ("[redis]\nsocket_timeout = -inf\n", "[redis] socket_timeout = '-inf': expected a finite number"),
    ("[task:t.x]\ntime_limit = nan\n", "[task:t.x] time_limit = 'nan': expected a finite number"),
])
def test_config_check_refuses_each_bad_value_naming_file_section_key_and_value(tmp_path, line, shown):
    done = greenq(tmp_path, "[greenq]\nbroker_url = memory://\n" + line.replace("[greenq]\n", ""), "config", "check")
    assert done.returncode == 2, done.stdout + done.stderr
    assert str(tmp_path / "greenq.ini") in done.stderr and shown in done.stderr, done.stderr
    assert "configuration OK" not in done.stdout


def test_config_check_refuses_a_cli_flag_or_variable_above_its_ceiling(tmp_path):
    done = greenq(tmp_path, "[greenq]\nbroker_url = memory://\n", "config", "check",
                  env={"GREENQ_WORKER_PREFETCH": "65536"})
    assert done.returncode == 2 and "environment GREENQ_WORKER_PREFETCH" in done.stderr, done.stderr
    clean = {k: v for k, v in os.environ.items() if not k.startswith("GREENQ_")}
    worker = subprocess.run([sys.executable, "-m", "greenq.worker", "-P", "threads", "-c", "100000",
                             "--shutdown-timeout", "nan", "--burst"], capture_output=True, text=True,
                            env=dict(clean, PYTHONPATH=str(ROOT), GREENQ_BROKER_URL="memory://"),
                            cwd=tmp_path, timeout=60)
    assert worker.returncode == 2, worker.stderr
    assert "option concurrency: [worker] concurrency = 100000: above the ceiling of 10000" in worker.stderr


# -- greenq queues: the management API ---------------------------------------------------
def test_the_management_url_follows_the_broker_scheme():
    assert management_url("amqp://u:p@rabbit/vh", "") == "http://u:p@rabbit:15672"
    assert management_url("amqps://u:p@rabbit:5671/vh", "") == "https://u:p@rabbit:15671"
    assert management_url("amqps://u:p@h1//;amqps://u:p@h2//", "") == "https://u:p@h1:15671"
    assert management_url("amqps://u:p@rabbit/", "https://mgmt:443") == "https://mgmt:443"
    with pytest.raises(ValueError, match="not https.*will not send the broker's password over plain HTTP"):
        management_url("amqps://u:secret@rabbit/", "http://mgmt:15672")


def test_an_amqps_broker_password_never_crosses_plain_http(management_api):
    url, rows, seen = management_api
    rows.append({"name": "default", "messages_ready": 3, "messages_unacknowledged": 1})
    assert rabbitmq_queues("amqp://u:secret@127.0.0.1/vh", url) == {"default": (3, 1)}
    assert len(seen) == 1 and seen[0][1].startswith("Basic ")        # the server does record requests
    with pytest.raises(ValueError, match="not sent over plain HTTP"):
        rabbitmq_queues("amqps://u:secret@127.0.0.1/vh", url)
    assert len(seen) == 1                                          # nothing was sent
