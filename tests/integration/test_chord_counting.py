"""Chord counting and group records in every result backend (issue 11,
deliverable 2): a member counted twice counts once, exactly one member
completes the chord, the completer is told again until the chord is sent."""
from __future__ import annotations

import threading

import pytest


def test_rpc_keeps_no_groups(backend_env):
    backend = backend_env.backend()
    if backend_env.kind != "rpc":
        assert backend.stores_groups
        return
    assert not backend.stores_groups
    with pytest.raises(NotImplementedError):
        backend.chord_member_done("g", "m", 1)


@pytest.fixture
def backend(backend_env):
    if backend_env.kind == "rpc":
        pytest.skip("rpc:// keeps no groups (test_rpc_keeps_no_groups)")
    return backend_env.backend()


def test_a_member_counted_twice_counts_once(backend):
    assert backend.chord_member_done("g1", "a", 3) is False
    assert backend.chord_member_done("g1", "a", 3) is False      # run again: still 1 of 3
    assert backend.chord_member_done("g1", "b", 3) is False
    assert backend.chord_member_done("g1", "b", 3) is False
    assert backend.chord_member_done("g1", "c", 3) is True       # the completer
    assert backend.chord_member_done("g1", "a", 3) is False      # a duplicate of another member
    assert backend.chord_member_done("g1", "c", 3) is True       # the completer again: not sent yet
    backend.chord_sent("g1")
    assert backend.chord_member_done("g1", "c", 3) is False      # sent: never again
    assert backend.chord_member_done("g2", "a", 1) is True       # chords are counted apart


def test_exactly_one_completer_among_racing_workers(backend_env, backend):
    """Many members finishing at once from separate backend instances (one
    per worker), each reported twice: one True in all."""
    size, instances = 40, [backend_env.backend() for _ in range(4)]
    answers, start = [], threading.Barrier(len(instances))

    def report(n: int) -> None:
        start.wait()
        mine = [f"m{i}" for i in range(size) if i % len(instances) == n]
        for member in mine + mine:
            answers.append((member, instances[n].chord_member_done("race", member, size)))
    threads = [threading.Thread(target=report, args=(n,)) for n in range(len(instances))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    winners = [m for m, won in answers if won]
    assert len(answers) == 2 * size
    assert 1 <= len(winners) <= 2 and len(set(winners)) == 1   # the completer may ask twice


def test_group_records_and_get_many(backend):
    backend.save_group("grp", b"json:{}")
    assert backend.load_group("grp") == b"json:{}"
    assert backend.load_group("nope") is None
    backend.store("t1", b"one")
    backend.store("t3", b"three")
    assert backend.get_many(["t1", "t2", "t3"]) == [b"one", None, b"three"]
    assert backend.get_many([]) == []
    backend.chord_member_done("grp", "a", 1)
    backend.forget_group("grp")
    assert backend.load_group("grp") is None
    assert backend.chord_member_done("grp", "a", 1) is True       # forgotten: counted afresh
