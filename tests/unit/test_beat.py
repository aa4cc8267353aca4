"""Periodic tasks (issue 11, deliverable 3): slots of ``every`` and ``cron``
entries, the INI sections, and the scheduler's rules (a new entry starts at
its next slot, missed runs are sent once, only the lease holder sends, a
dead holder's lease passes on).  Leases in each broker:
tests/integration/test_leadership.py; real processes: tests/e2e/test_beat_e2e.py."""
from __future__ import annotations

import datetime
import textwrap
import time

import pytest

from greenq import ConfigError, GreenQ
from greenq.beat import Entry, Scheduler, entries, scheduled
from greenq.transports.memory.leadership import MemoryLeadership

UTC = datetime.timezone.utc


def at(*parts: int) -> float:
    return datetime.datetime(*parts, tzinfo=UTC).timestamp()


def test_every_slots_are_multiples_of_the_period():
    e = Entry("e", "t", every=30)
    assert e.next_after(at(2026, 1, 1, 0, 0, 10)) == at(2026, 1, 1, 0, 0, 30)
    assert e.next_after(at(2026, 1, 1, 0, 0, 30)) == at(2026, 1, 1, 0, 1, 0)     # strictly after
    assert e.latest_at(at(2026, 1, 1, 0, 0, 30)) == at(2026, 1, 1, 0, 0, 30)    # at or before


def test_cron_in_a_timezone():
    paris = Entry("c", "t", cron="0 9 * * 1-5", timezone="Europe/Paris")
    friday_noon = at(2026, 1, 16, 12, 0)
    assert paris.next_after(friday_noon) == at(2026, 1, 19, 8, 0)   # Monday 09:00 CET is 08:00 UTC
    assert paris.latest_at(friday_noon) == at(2026, 1, 16, 8, 0)
    assert paris.latest_at(at(2026, 1, 16, 8, 0)) == at(2026, 1, 16, 8, 0)
    summer = Entry("s", "t", cron="0 9 * * *", timezone="Europe/Paris")
    assert summer.next_after(at(2026, 7, 1, 0, 0)) == at(2026, 7, 1, 7, 0)     # CEST: UTC+2


@pytest.mark.parametrize("kwargs, message", [
    ({}, "exactly one of every"),
    ({"every": 5, "cron": "* * * * *"}, "exactly one of every"),
    ({"every": 0}, "every = 0: every must be 1 to"),
    ({"cron": "61 * * * *"}, "cron = '61"),
    ({"cron": "* * * * *", "timezone": "Mars/Olympus"}, "Mars/Olympus"),
    ({"every": 5, "options": {"countdown": 3}}, "unknown option"),
])
def test_bad_entries_are_config_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        Entry("bad", "t", **kwargs)


def test_schedule_sections_and_add_periodic(tmp_path):
    ini = tmp_path / "greenq.ini"
    ini.write_text(textwrap.dedent("""
        [greenq]
        broker_url = memory://beat-ini
        [schedule:cleanup]
        task = shop.tasks.cleanup
        every = 30
        args = [1, 2]
        kwargs = {"deep": true}
        queue = maintenance
        [schedule:report]
        task = shop.tasks.report
        cron = */5 * * * *
        timezone = Europe/Paris
    """))
    app = GreenQ.from_config(str(ini))
    app.add_periodic("report", "shop.tasks.report2", cron="0 * * * *")      # the code's wins
    found = {e.name: e for e in entries(app)}
    assert found["cleanup"].every == 30 and found["cleanup"].args == [1, 2]
    assert found["cleanup"].kwargs == {"deep": True} and found["cleanup"].options == {"queue": "maintenance"}
    assert found["report"].task == "shop.tasks.report2"
    bad = tmp_path / "bad.ini"
    bad.write_text("[schedule:x]\ntask = t\nevery = 5\nargs = {}\n")
    with pytest.raises(ConfigError, match="args.*expected a JSON list"):
        GreenQ.from_config(str(bad))
    bad.write_text("[schedule:x]\ntask = t\nevry = 5\n")
    with pytest.raises(ConfigError, match="did you mean 'every'"):
        GreenQ.from_config(str(bad))


@pytest.fixture
def app():
    app = GreenQ("beat", broker=f"memory://beat-{time.monotonic_ns()}")
    app.sent = []
    app.send_task = lambda name, args=(), kwargs=None, **options: app.sent.append((name, options["task_id"]))
    app.add_periodic("tick", "t.tick", every=10)
    return app


def scheduler(app, ttl: float = 30.0) -> Scheduler:
    return Scheduler(app, leadership=MemoryLeadership(app.config.broker_url, app.config, ttl))


def test_a_new_entry_starts_at_its_next_slot_and_each_slot_is_sent_once(app):
    s = scheduler(app)
    s.tick(now=1005.0)
    assert app.sent == []                       # new: slot 1000 is recorded, not sent
    s.tick(now=1009.9)
    s.tick(now=1010.0)
    s.tick(now=1015.0)
    assert app.sent == [("t.tick", "beat-tick-1010")]
    s.tick(now=1020.5)
    assert app.sent[-1] == ("t.tick", "beat-tick-1020") and len(app.sent) == 2


def test_missed_runs_are_sent_once(app):
    s = scheduler(app)
    s.tick(now=1000.0)
    s.tick(now=1100.0)                          # ten slots passed while no scheduler ran
    assert app.sent == [("t.tick", "beat-tick-1100")]


def test_only_the_lease_holder_sends_and_a_dead_holder_hands_over(app):
    first, second = scheduler(app, ttl=0.2), scheduler(app, ttl=0.2)
    first.tick(now=1000.0)
    for now in (1010.0, 1020.0):
        first.tick(now=now)
        second.tick(now=now)
    assert [i for _, i in app.sent] == ["beat-tick-1010", "beat-tick-1020"]
    assert first.leading and not second.leading
    time.sleep(0.25)                            # the first dies: its lease runs out
    second.tick(now=1030.0)
    first_again = first.leadership.record(first.holder, "tick", 9999.0)
    assert second.leading and not first_again   # a dead holder's write is refused
    assert [i for _, i in app.sent][-1] == "beat-tick-1030" and len(app.sent) == 3


def test_scheduled_lists_each_entry_with_its_next_run(app):
    app.add_periodic("hourly", "t.report", cron="0 * * * *")
    s = scheduler(app)
    s.tick(now=at(2026, 1, 1, 10, 0, 5))
    rows = scheduled(app, now=at(2026, 1, 1, 10, 0, 7), leadership=s.leadership)
    assert [(r["name"], r["next_run"]) for r in rows] == [("tick", at(2026, 1, 1, 10, 0, 10)),
                                                         ("hourly", at(2026, 1, 1, 11, 0))]
    assert rows[0]["last_run"] == at(2026, 1, 1, 10, 0, 0)
    overdue = scheduled(app, now=at(2026, 1, 1, 12, 0, 1), leadership=s.leadership)
    assert overdue[0]["next_run"] == at(2026, 1, 1, 12, 0, 1)      # missed: due now


def test_greenq_beat_list_prints_each_entry_with_its_next_run(tmp_path):
    import subprocess
    import sys
    ini = tmp_path / "greenq.ini"
    ini.write_text(f"[greenq]\nbroker_url = sqlite:///{tmp_path}/b.sqlite3\n"
                   "[schedule:cleanup]\ntask = shop.tasks.cleanup\nevery = 30\n"
                   "[schedule:report]\ntask = shop.tasks.report\ncron = 0 9 * * *\ntimezone = Europe/Paris\n")
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("GREENQ_")}
    done = subprocess.run([sys.executable, "-m", "greenq.cli", "--config", str(ini), "beat", "--list"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("cleanup  shop.tasks.cleanup  every 30 s  last=-  next=")
    assert lines[1].startswith("report  shop.tasks.report  cron 0 9 * * * Europe/Paris  last=-  next=")
