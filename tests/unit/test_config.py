import pytest

from greenq import config
from greenq.exceptions import ConfigError


def test_defaults_match_the_contract():
    cfg = config.load(search=False, env={})
    assert cfg.broker_url == "sqlite:///greenq.sqlite3"
    assert cfg.worker["pool"] == "gevent" and cfg.worker["concurrency"] == 100
    assert cfg.lease_seconds == 30 and cfg.max_deliveries == 10
    assert cfg.origin("worker", "pool") == "default"


def test_layering_defaults_ini_env_cli(tmp_path):
    ini = tmp_path / "g.ini"
    ini.write_text("[greenq]\nbroker_url = redis://:pw@h:6379/1 ; inline comment\n"
                   "[worker]\nconcurrency = 10\nprefetch = 20\nqueues = a, b\n")
    env = {"GREENQ_WORKER_CONCURRENCY": "30", "GREENQ_DEFAULT_QUEUE": "jobs"}
    cfg = config.load(str(ini), env=env, overrides={("worker", "prefetch"): 40})
    assert cfg.broker_url == "redis://:pw@h:6379/1"
    assert cfg.worker["concurrency"] == 30 and cfg.origin("worker", "concurrency").startswith("environment")
    assert cfg.worker["prefetch"] == 40 and cfg.worker["queues"] == ["a", "b"]
    assert cfg.default_queue == "jobs"
    shown = {(s, k): v for s, k, v, _ in cfg.items()}
    assert shown[("greenq", "broker_url")] == "redis://:***@h:6379/1"


def test_file_search_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "greenq.ini").write_text("[worker]\nconcurrency = 7\n")
    assert config.load(env={}).worker["concurrency"] == 7
    other = tmp_path / "other.ini"
    other.write_text("[worker]\nconcurrency = 8\n")
    assert config.load(env={"GREENQ_CONFIG": str(other)}).worker["concurrency"] == 8
    with pytest.raises(ConfigError, match="no such file"):
        config.load(str(tmp_path / "missing.ini"), env={})


@pytest.mark.parametrize("text, parts", [
    ("[worker]\nconcurency = 3\n", ["[worker]", "concurency", "did you mean 'concurrency'"]),
    ("[wroker]\npool = gevent\n", ["[wroker]", "did you mean 'worker'"]),
    ("[worker]\nconcurrency = -1\n", ["[worker] concurrency = '-1'", ">= 0"]),
    ("[worker]\npool = greenlet\n", ["pool = 'greenlet'", "gevent, eventlet, threads, solo"]),
    ("[greenq]\neager = maybe\n", ["eager = 'maybe'", "true or false"]),
    ("[worker]\nhttp = nowhere\n", ["http = 'nowhere'", "HOST:PORT"]),
    ("[task:shop.fetch]\nrate_limit = fast\n", ["[task:shop.fetch] rate_limit", "N/s"]),
    ("[greenq]\naccept_content = json, yaml\n", ["accept_content", "yaml"]),
    ("no section here\n", ["cannot parse"]),
])
def test_errors_name_file_section_key_value(tmp_path, text, parts):
    ini = tmp_path / "bad.ini"
    ini.write_text(text)
    with pytest.raises(ConfigError) as info:
        config.load(str(ini), env={})
    message = str(info.value)
    assert str(ini) in message
    for part in parts:
        assert part in message, (part, message)


def test_env_errors_name_the_variable():
    with pytest.raises(ConfigError, match="GREENQ_WORKER_CONCURRENCY.*'x'"):
        config.load(search=False, env={"GREENQ_WORKER_CONCURRENCY": "x"})


def test_task_sections_and_rates(tmp_path):
    ini = tmp_path / "t.ini"
    ini.write_text("[task:shop.fetch]\nrate_limit = 100/s\ntime_limit = 30\nmax_retries = 5\n")
    cfg = config.load(str(ini), env={})
    assert cfg.task_options("shop.fetch") == {"rate_limit": "100/s", "time_limit": 30.0, "max_retries": 5}
    assert config.parse_rate("6/m") == pytest.approx(0.1)


def test_signing_key_is_masked():
    cfg = config.load(search=False, env={}, overrides={("greenq", "signing_key"): "s3cret"})
    assert "s3cret" not in repr(list(cfg.items()))


def test_shipped_example_config_is_valid():
    from pathlib import Path
    root = Path(__file__).resolve().parents[2]
    for name in ("greenq.ini", "redis.ini", "rabbitmq.ini"):
        config.load(str(root / "conf" / name), env={})


def test_every_setting_is_documented():
    from pathlib import Path
    root = Path(__file__).resolve().parents[2]
    example = (root / "conf" / "greenq.ini").read_text()
    reference = (root / "docs" / "configuration.md").read_text()
    for section, keys in config.SETTINGS.items():
        assert f"[{section}]" in example and f"[{section}]" in reference
        for key in keys:
            assert f"\n{key} =" in example, f"conf/greenq.ini lacks [{section}] {key}"
            assert f"`{key}`" in reference, f"docs/configuration.md lacks [{section}] {key}"


def test_misspelt_environment_variable_is_a_warning_naming_the_right_one():
    cfg = config.load(search=False, env={"GREENQ_WORKER_CONCURENCY": "5", "GREENQ_BROKR_URL": "x",
                                         "GREENQ_CONFIG_UNUSED": "", "GREENQ_TEST_ANYTHING": "1"},
                      quiet=True)
    assert cfg.worker["concurrency"] == 100
    text = "\n".join(cfg.warnings)
    assert "GREENQ_WORKER_CONCURENCY" in text and "did you mean 'GREENQ_WORKER_CONCURRENCY'" in text
    assert "did you mean 'GREENQ_BROKER_URL'" in text
    assert "GREENQ_TEST_ANYTHING" not in text


def test_warnings_are_logged_once_per_process(caplog):
    env = {"GREENQ_WORKER_QUEUS": "a"}
    with caplog.at_level("WARNING", logger="greenq.config"):
        config.load(search=False, env=env)
        config.load(search=False, env=env)
    assert [r.getMessage() for r in caplog.records].count(
        "environment GREENQ_WORKER_QUEUS is not a greenq setting and is ignored; "
        "did you mean 'GREENQ_WORKER_QUEUES'?") == 1


def test_prefetch_below_concurrency_is_a_warning(tmp_path):
    ini = tmp_path / "g.ini"
    ini.write_text("[worker]\nconcurrency = 50\nprefetch = 10\n")
    cfg = config.load(str(ini), env={}, quiet=True)
    assert len(cfg.warnings) == 1
    assert "[worker] prefetch = 10 is below [worker] concurrency = 50" in cfg.warnings[0]
    assert str(ini) in cfg.warnings[0]
    assert not config.load(search=False, env={}, overrides={("worker", "prefetch"): 100},
                           quiet=True).warnings


def test_soft_limit_above_hard_limit_in_a_task_section_is_an_error(tmp_path):
    ini = tmp_path / "g.ini"
    ini.write_text("[task:shop.tasks.fetch]\nsoft_time_limit = 30\ntime_limit = 10\n")
    with pytest.raises(ConfigError) as info:
        config.load(str(ini), env={})
    message = str(info.value)
    assert "[task:shop.tasks.fetch] soft_time_limit = 30 is above time_limit = 10" in message
    assert str(ini) in message


def test_broker_connect_timeout_defaults_to_forever():
    assert config.load(search=False, env={}).broker_connect_timeout == 0
    cfg = config.load(search=False, env={"GREENQ_BROKER_CONNECT_TIMEOUT": "2.5"})
    assert cfg.broker_connect_timeout == 2.5


def test_celery_visibility_timeout_defaults_to_kombus_and_must_be_positive():
    from greenq.config import ConfigError, load
    assert load(search=False, env={}).celery_visibility_timeout == 3600
    assert load(search=False, env={"GREENQ_CELERY_VISIBILITY_TIMEOUT": "10"}).celery_visibility_timeout == 10
    with pytest.raises(ConfigError, match="celery_visibility_timeout = 0.5: must be >= 1"):
        load(search=False, env={"GREENQ_CELERY_VISIBILITY_TIMEOUT": "0.5"})
