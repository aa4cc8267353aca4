"""Routing (issue 11, deliverable 4): ``[routes]`` maps task-name globs to
queues; precedence is call option > task option > route > default queue."""
from __future__ import annotations

import textwrap
import time

import pytest

from greenq import ConfigError, GreenQ


@pytest.fixture
def app(tmp_path):
    ini = tmp_path / "greenq.ini"
    ini.write_text(textwrap.dedent(f"""
        [greenq]
        broker_url = memory://routes-{time.monotonic_ns()}
        default_queue = normal
        [routes]
        shop.tasks.Report* = reports   ; case is kept
        shop.tasks.* = io
        shop.* = shop
        [task:shop.tasks.configured]
        queue = from-ini
    """))
    app = GreenQ.from_config(str(ini))
    for name, options in [("shop.tasks.fetch", {}), ("shop.tasks.pinned", {"queue": "pinned"}),
                          ("shop.tasks.configured", {}), ("shop.mail.send", {}), ("other.job", {}),
                          ("shop.tasks.ReportDaily", {})]:
        app.task(name=name, **options)(lambda: None)
    return app


def queue_of(app, name, **options):
    return app.build_message(name, **options).queue


def test_precedence_call_option_task_option_route_default(app):
    assert queue_of(app, "shop.tasks.pinned", queue="call") == "call"       # call option first
    assert queue_of(app, "shop.tasks.pinned") == "pinned"                    # then the task's option
    assert queue_of(app, "shop.tasks.configured") == "from-ini"              # [task:NAME] is a task option
    assert queue_of(app, "shop.tasks.fetch") == "io"                         # then [routes]
    assert queue_of(app, "other.job") == "normal"                            # then default_queue


def test_first_matching_glob_wins_in_file_order_and_case_is_kept(app):
    assert list(app.config.routes) == ["shop.tasks.Report*", "shop.tasks.*", "shop.*"]
    assert queue_of(app, "shop.tasks.ReportDaily") == "reports"
    assert queue_of(app, "shop.tasks.reportdaily") == "io"
    assert queue_of(app, "shop.mail.send") == "shop"
    assert app.route("unrelated") is None


def test_routes_apply_to_send_task_by_name_and_to_signatures(app):
    r = app.send_task("shop.unregistered")                       # task code not imported here
    sig = app.signature("shop.tasks.fetch").delay()
    stats = {s.name: s.ready for s in app.broker.queue_stats(["shop", "io"])}
    assert stats == {"shop": 1, "io": 1} and r.id != sig.id


def test_a_bad_routes_line_is_a_config_error(tmp_path):
    ini = tmp_path / "bad.ini"
    ini.write_text("[routes]\nshop.* =\n")
    with pytest.raises(ConfigError, match=r"\[routes\] shop\.\*"):
        GreenQ.from_config(str(ini))
