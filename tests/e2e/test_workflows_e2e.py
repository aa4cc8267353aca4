"""Workflows with real worker processes (issue 11): the canvas on every
broker, and chords that count right when a worker is killed mid-way."""
from __future__ import annotations

import signal
import time

import pytest

from greenq import ChordError, ConfigError, chain, chord, group

pytestmark = pytest.mark.e2e


def test_canvas_on_every_broker(pool, any_env):
    import e2e_tasks as t
    app = any_env.app()
    c = chain(t.add.s(1, 2), t.add.s(3), t.record.s()).delay()
    g = group(t.add.s(i, i) for i in range(20)).delay()
    linked = t.add.apply_async((2, 2), link=t.record.s("ok"), link_error=t.record.s("error"))
    failed = t.fail.apply_async(("k",), link_error=t.record.si("errback"))
    stopped = chain(t.fail.s("stop"), t.record.s()).delay()
    if any_env.kind == "amqp":
        with pytest.raises(ConfigError):
            chord([t.add.s(1, 1)], t.chord_callback.s()).delay()
        ch = None
    else:
        ch = chord((t.chord_member.s(i, 0) for i in range(30)), t.chord_callback.s()).delay()
        bad = chord([t.add.s(1, 1), t.fail.s("member")], t.chord_callback.s()).delay()
    proc = any_env.worker(pool, "-c", "10", burst=False)
    try:
        args, parent, root = c.get(timeout=30)
        assert args == [6] and parent == c.parent.id and root == c.parent.parent.id
        assert g.get(timeout=30) == [2 * i for i in range(20)]
        assert linked.get(timeout=30) == 4
        with pytest.raises(KeyError):
            failed.get(timeout=30)
        with pytest.raises(KeyError):
            stopped.get(timeout=30)
        if ch is not None:
            assert ch.get(timeout=30) == [30, sum(range(30))]
            with pytest.raises(ChordError, match="member 1 e2e.fail"):
                bad.get(timeout=30)
            assert app.GroupResult(ch.parent.id).get(timeout=5) == list(range(30))
        any_env.wait_marker("record")
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    # c's last step, the link and the errback: the chain stopped by a failure sent nothing
    assert any_env.marker_count("record") == 3, out
    assert any_env.marker_count("chord_callback") == (1 if ch is not None else 0)


@pytest.mark.parametrize("any_env", ["sqlite", "redis"], indirect=True)
def test_chord_counts_right_when_a_worker_is_killed(pool, any_env):
    """200 members on two workers, one killed with SIGKILL mid-way: the
    members it held run again elsewhere, each is counted once, and the
    callback runs exactly once with every member's result."""
    import e2e_tasks as t
    any_env.env["GREENQ_LEASE_SECONDS"] = "2"
    any_env.app()
    size = 200
    r = chord((t.chord_member.s(i, 0.02) for i in range(size)), t.chord_callback.s()).delay()
    victim = any_env.worker(pool, "-c", "8", burst=False)
    survivor = any_env.worker(pool, "-c", "8", burst=False)
    try:
        deadline = time.monotonic() + 30
        while any_env.marker_count("chord_member") < size // 3 and time.monotonic() < deadline:
            time.sleep(0.01)                    # watching the workers' progress, not synchronising
        assert not r.ready(), "the chord finished before the kill: make the members slower"
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        assert r.get(timeout=60) == [size, sum(range(size))]
    finally:
        survivor.send_signal(signal.SIGTERM)
        out, _ = survivor.communicate(timeout=30)
    assert survivor.returncode == 0, out
    assert any_env.marker_count("chord_callback") == 1
    assert any_env.marker_count("chord_member") >= size


def test_progress_on_every_backend(pool, any_env):
    """update_state in a worker, read by the caller as state and info (rpc:// too)."""
    import e2e_tasks as t
    any_env.app()
    r = t.progress.delay("p")
    proc = any_env.worker(pool, burst=False)
    try:
        deadline = time.monotonic() + 20
        while r.state != "PROGRESS" and time.monotonic() < deadline:
            time.sleep(0.02)                    # the caller polls, as a progress bar does
        assert r.state == "PROGRESS" and r.info == {"done": 1, "total": 2} and not r.ready()
        (any_env.markers / "p.go").touch()
        assert r.get(timeout=20) == "finished" and r.info == "finished"
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out


@pytest.mark.parametrize("any_env", ["sqlite", "redis"], indirect=True)
def test_completer_killed_before_sending_the_callback(pool, any_env):
    """The worker that counted the chord's last member dies before sending
    the callback: the member's message comes back, runs again, is told again
    that it completed the chord, and the callback is sent once."""
    import e2e_tasks as t
    any_env.env["GREENQ_LEASE_SECONDS"] = "1"
    any_env.app()
    r = chord((t.chord_member.s(i, 0) for i in range(20)), t.chord_callback.s()).delay()
    any_env.env["E2E_DIE_BEFORE_CHORD_CALLBACK"] = "1"
    dying = any_env.worker(pool, "-c", "4", burst=False)
    out, _ = dying.communicate(timeout=60)
    assert dying.returncode == 9, out
    assert (any_env.markers / "died_before_callback").exists() and not r.ready()
    assert any_env.marker_count("chord_callback") == 0
    del any_env.env["E2E_DIE_BEFORE_CHORD_CALLBACK"]
    second = any_env.worker(pool, burst=False)
    try:
        assert r.get(timeout=30) == [20, sum(range(20))]
    finally:
        second.send_signal(signal.SIGTERM)
        out, _ = second.communicate(timeout=30)
    assert second.returncode == 0, out
    assert any_env.marker_count("chord_callback") == 1
    assert any_env.marker_count("chord_member") >= 21       # the completer's member (and its batch) ran again
