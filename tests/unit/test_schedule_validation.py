"""Schedules valid at the source (issue 17, items 11 and 12): bad entries are
refused by ``greenq config check`` and ``add_periodic``; at run time one
failing entry is logged and skipped while the others keep firing and the
lease holds; ``greenq beat --list`` never crashes."""
from __future__ import annotations

import logging
import os
import re
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from greenq import ConfigError, GreenQ
from greenq.beat import Entry, Scheduler, scheduled
from greenq.transports.memory.leadership import MemoryLeadership

ROOT = Path(__file__).resolve().parents[2]


def greenq(tmp_path, ini: str, *args: str) -> subprocess.CompletedProcess:
    path = tmp_path / "greenq.ini"
    path.write_text(ini)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GREENQ_")}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-m", "greenq.cli", "--config", str(path), *args],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)


BAD_ENTRIES = [
    ("cron = 0 0 30 2 *", "[schedule:bad] cron = '0 0 30 2 *'"),
    ("every = inf", "[schedule:bad] every = 'inf': expected a finite number"),
    ("every = nan", "[schedule:bad] every = 'nan': expected a finite number"),
    ("every = 1e-300", "[schedule:bad] every = 1e-300: every must be 1 to 31622400 seconds"),
    ("every = 1e12", "[schedule:bad] every = '1e12': above the ceiling of 31622400"),
    ("cron = * * * * *\ntimezone = ../../etc/passwd", "timezone = '../../etc/passwd'"),
    ("cron = * * * * *\ntimezone = /etc/localtime", "timezone = '/etc/localtime'"),
    ("cron = * * * * *\ntimezone = Europe", "no such IANA time zone"),
    ("every = 30\npriority = 99", "[schedule:bad] priority = '99': above the ceiling of 9"),
    ("every = 30\nqueue = " + "q" * 300, "[schedule:bad] queue = 'qqq"),
    ("every = 30\ntime_limit = 5\nsoft_time_limit = 10", "soft_time_limit"),
]


@pytest.mark.parametrize("lines, shown", BAD_ENTRIES, ids=[b[0].split("\n")[-1] for b in BAD_ENTRIES])
def test_config_check_refuses_a_bad_schedule_entry(tmp_path, lines, shown):
    done = greenq(tmp_path, "[greenq]\nbroker_url = memory://\n[schedule:ok]\ntask = t.ok\nevery = 5\n"
                            f"[schedule:bad]\ntask = t.bad\n{lines}\n", "config", "check")
    assert done.returncode == 2, done.stdout + done.stderr
    assert str(tmp_path / "greenq.ini") in done.stderr and shown in done.stderr, done.stderr


@pytest.mark.parametrize("kwargs, shown", [
    ({"every": float("inf")}, "every = inf"),
    ({"every": float("nan")}, "every = nan"),
    ({"every": 1e-300}, "every = 1e-300"),
    ({"cron": "0 0 30 2 *"}, "cron = '0 0 30 2 *'"),
    ({"cron": "* * * * *", "timezone": "../../etc/passwd"}, "timezone = '../../etc/passwd'"),
    ({"every": 5, "priority": 99}, "priority = 99: priority must be 0-9"),
    ({"every": 5, "expires": float("nan")}, "expires = nan"),
])
def test_add_periodic_applies_the_same_rules(kwargs, shown):
    app = GreenQ("s", broker="memory://")
    with pytest.raises(ConfigError, match=re.escape(f"schedule entry 'bad': {shown}")):
        app.add_periodic("bad", "t.bad", **kwargs)


def test_a_valid_zone_and_cron_still_work():
    e = Entry("ok", "t", cron="0 0 29 2 *", timezone="America/Argentina/Buenos_Aires")   # leap days only
    assert e.next_after(time.time()) > time.time()


@pytest.fixture
def app():
    """An app on a memory broker with real send_task; three entries, the middle
    one's arguments cannot be serialized, so send_task refuses it at run time."""
    app = GreenQ("beat-iso", broker=f"memory://beat-iso-{time.monotonic_ns()}")
    app.add_periodic("a", "t.a", every=10)
    app.add_periodic("b", "t.b", every=10, args=(object(),))
    app.add_periodic("c", "t.c", every=10)
    yield app
    app.close()


def test_one_entry_send_task_refuses_never_stops_the_others_nor_flaps_the_lease(app, caplog):
    s = Scheduler(app, leadership=MemoryLeadership(app.config.broker_url, app.config, 30.0))
    caplog.set_level(logging.INFO, "greenq.beat")
    s.tick(now=1005.0)                                   # new entries: slot 1000 recorded
    for now in (1010.0, 1011.0, 1020.0):
        s.tick(now=now)
        assert s.leading
    sent = {e: s.leadership.last_runs()[e] for e in "abc"}
    assert sent == {"a": 1020.0, "b": 1000.0, "c": 1020.0}     # b's slots are never recorded as sent
    assert s.sent == 4
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "entry 'b' (t.b) failed" in errors[0], errors
    assert not [r for r in caplog.records if "lost the lease" in r.getMessage()
                or "took the lease" in r.getMessage()][1:]       # taken once, never lost


def test_a_future_last_run_does_not_hold_an_entry_back(app):
    lease = MemoryLeadership(app.config.broker_url, app.config, 30.0)
    s = Scheduler(app, leadership=lease)
    s.tick(now=1005.0)
    lease.record(s.holder, "a", 1005.0 + 3600)           # a scheduler an hour fast wrote this
    s.tick(now=1010.0)                                   # ignored: a starts again at its next slot
    s.tick(now=1020.0)
    assert lease.last_runs()["a"] == 1020.0


def test_beat_list_never_crashes_on_malformed_records(tmp_path):
    db = tmp_path / "b.sqlite3"
    ini = (f"[greenq]\nbroker_url = sqlite:///{db}\n[schedule:good]\ntask = t.good\nevery = 30\n"
           "[schedule:other]\ntask = t.other\nevery = 60\n[schedule:third]\ntask = t.third\nevery = 90\n")
    assert greenq(tmp_path, ini, "beat", "--list").returncode == 0      # creates the tables
    with sqlite3.connect(db) as conn:
        conn.execute("INSERT OR REPLACE INTO records VALUES ('beat:runs', 'good', 'garbage', 1e300)")
        conn.execute("INSERT OR REPLACE INTO records VALUES ('beat:runs', 'other', 1e308, 1e300)")
        conn.execute("INSERT OR REPLACE INTO records VALUES ('beat:runs', 'third', 1e9, 1e300)")
    done = greenq(tmp_path, ini, "beat", "--list")
    assert done.returncode == 0, done.stderr
    lines = sorted(done.stdout.splitlines())
    assert [line.split()[0] for line in lines] == ["good", "other", "third"]
    assert "last=-" in lines[0] and "last=-" in lines[1] and "last=2001-09-09" in lines[2]
    assert "not a time" in done.stderr


def test_scheduled_leaves_a_bad_entry_out(app):
    app.config.schedules["broken"] = {"task": "t.x", "every": float("inf")}   # set behind the loader's back
    names = [row["name"] for row in scheduled(app, now=1000.0)]
    assert names == ["a", "b", "c"]
