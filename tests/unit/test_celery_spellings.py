"""Celery migrants' traps (issue 18, item 7): sizes with units and Celery's
KiB refused with a hint, Celery's worker flags accepted, worker names and
their expansions, ping's JSON shape."""
from __future__ import annotations

import socket

import pytest

from greenq import GreenQ, config
from greenq.cli import worker as worker_cli
from greenq.cli.inspect import _json_reply
from greenq.control.agent import worker_name
from greenq.exceptions import ConfigError
from greenq.worker import launch
from greenq.worker.monitor import HEARTBEAT_ENV


def _memory(value, where: str = "env"):
    if where == "env":
        cfg = config.load(search=False, env={"GREENQ_WORKER_MAX_MEMORY_PER_CHILD": value})
    else:
        cfg = config.load(search=False, env={}, overrides={("worker", "max_memory_per_child"): value})
    return cfg.worker["max_memory_per_child"]


@pytest.mark.parametrize("text, mib", [("200MB", 200), ("200000KiB", 195), ("2GiB", 2048), ("1.5g", 1536),
                                       ("512 mib", 512), ("300", 300), ("65536", 65536), ("0", 0),
                                       ("1k", 1), ("0KiB", 0)])
def test_max_memory_per_child_takes_a_unit(text, mib):
    assert _memory(text) == mib
    assert _memory(text, "cli") == mib


def test_celery_kib_as_a_bare_number_is_refused_with_the_hint():
    with pytest.raises(ConfigError) as err:
        _memory("200000")
    assert "GREENQ_WORKER_MAX_MEMORY_PER_CHILD" in str(err.value)
    assert "did you mean KiB, as Celery counts? write 200000KiB" in str(err.value)
    with pytest.raises(ConfigError, match="write 200000KiB"):
        _memory(200000, "cli")                    # GreenQ(...) or code passing an int


@pytest.mark.parametrize("text", ["12x", "-1", "nanMB", "infGiB", "", "1e9", "MB"])
def test_a_size_that_is_not_one_is_refused(text):
    with pytest.raises(ConfigError, match="expected a size"):
        _memory(text)


def test_a_size_with_a_unit_still_has_its_ceiling():
    assert _memory("1024GiB") == 1024 * 1024
    with pytest.raises(ConfigError, match="above the ceiling of 1048576"):
        _memory("1025GiB")
    with pytest.raises(ConfigError):
        _memory(True, "cli")


def test_the_worker_flag_refuses_celerys_kib(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = worker_cli.main(["--broker", "memory://", "--max-memory-per-child", "200000"])
    assert code == 2 and "write 200000KiB" in capsys.readouterr().err


def test_celerys_worker_spellings_parse():
    args = worker_cli.build_parser().parse_args(
        ["-A", "proj", "-P", "threads", "-B", "-O", "fair", "--without-gossip", "--without-mingle",
         "--without-heartbeat", "--time-limit", "60", "--soft-time-limit", "50", "--hostname", "w1@%h",
         "-l", "info", "--max-memory-per-child", "200000KiB"])
    assert args.beat and args.optimization == "fair" and args.name == "w1@%h"
    assert (args.time_limit, args.soft_time_limit) == (60.0, 50.0)
    notes = worker_cli.celery_notes(args)
    assert len(notes) == 4 and all("accepted for Celery's spelling" in n for n in notes)
    assert worker_cli.celery_notes(worker_cli.build_parser().parse_args([])) == []


def test_the_launcher_reads_celerys_pool_spellings():
    assert launch.choose_pool(["-Pthreads", "-B", "--without-mingle", "-O", "fair"], {})[0] == "threads"
    assert launch.choose_pool(["-P", "solo", "--time-limit", "5"], {})[0] == "solo"
    assert launch.choose_pool(["--pool=eventlet"], {})[0] == "eventlet"
    with pytest.raises(ValueError, match="prefork pool is --processes N"):
        launch.choose_pool(["-P", "prefork"], {})


def test_worker_names_and_celerys_expansions():
    host = socket.gethostname()
    short, _, domain = host.partition(".")
    assert worker_name() == f"greenq@{host}"
    assert worker_name("w%i@%h", 3) == f"w3@{host}"
    assert worker_name("%n.%d") == f"{short}.{domain}"
    assert worker_name("100%%-%p").startswith("100%-") and worker_name("100%%-%p")[5:].isdigit()


def test_each_child_has_a_name_of_its_own(monkeypatch):
    host = socket.gethostname()
    monkeypatch.setenv(HEARTBEAT_ENV, "/tmp/gq-sup-123/child-1")
    assert worker_cli.child_name(None, 2) == f"greenq-1@{host}"
    assert worker_cli.child_name("pw", 2) == "pw-1"                  # as before: NAME-<index>
    assert worker_cli.child_name("w%i@%h", 2) == f"w1@{host}"
    assert worker_cli.child_name(None, 1) == f"greenq@{host}"        # one process: the plain name


def test_time_limit_flags_are_the_default_of_tasks_without_one():
    app = GreenQ("spell", broker="memory://")

    @app.task(name="spell.plain")
    def plain():
        pass

    @app.task(name="spell.own", time_limit=5)
    def own():
        pass

    args = worker_cli.build_parser().parse_args(["--time-limit", "60", "--soft-time-limit", "50"])
    worker_cli.default_time_limits(app, args)
    assert (plain.option("time_limit"), plain.option("soft_time_limit")) == (60.0, 50.0)
    assert (own.option("time_limit"), own.option("soft_time_limit")) == (5, None)   # 50 > 5 never fires
    assert app.config.origin("task:spell.plain", "time_limit") == "option --time-limit"


def test_ping_json_is_celerys_shape():
    assert _json_reply("ping", {"worker": "w", "ok": "pong"}) == {"ok": "pong"}
    assert _json_reply("stats", {"worker": "w", "ok": {"pool": "gevent"}}) == {"pool": "gevent"}
    assert _json_reply("ping", {"worker": "w", "error": "boom"}) == {"error": "boom"}
