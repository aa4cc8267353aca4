"""Chord counting and group records in every result backend (issue 11,
deliverable 2): a member counted twice counts once, exactly one member
completes the chord, the completer is told again until the chord is sent."""
from __future__ import annotations

import threading
import uuid

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
    for instance in instances:     # opened one by one: the race under test is the count, not a
        instance.load_group("-")   # fresh SQLite file's first open (PRAGMA journal_mode=WAL)
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


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_any_order_of_reports_has_one_completer(kind, tmp_path_factory):
    """Hypothesis: members reported in any order, each any number of times
    (runs again after a lost ack): the completer is the member whose first
    report completed the set, it alone is told (again until sent), and no
    one after the mark."""
    from hypothesis import given, settings, strategies as st

    from greenq.backends import make_backend
    from tests.conftest import make_config
    url = (f"memory://chord-prop-{uuid.uuid4().hex}" if kind == "memory"
           else f"sqlite:///{tmp_path_factory.mktemp('prop')}/c.sqlite3")
    backend = make_backend(url, make_config(broker_url=url))

    @settings(max_examples=60, deadline=None)
    @given(st.integers(1, 6).flatmap(lambda n: st.tuples(
        st.just(n), st.lists(st.integers(0, n - 1), max_size=15),
        st.permutations(range(n)), st.integers(0, 5))))
    def check(case):
        size, extra, order, sent_after = case
        group = uuid.uuid4().hex
        reports = list(order) + extra             # every member at least once, then duplicates
        answers = [backend.chord_member_done(group, f"m{i}", size) for i in reports]
        completer = order[-1]                     # the last new member completes the set
        assert answers[size - 1] is True
        assert all(answer == (member == completer) for member, answer in zip(reports[size:], answers[size:]))
        assert not any(answers[:size - 1])
        backend.chord_sent(group)
        assert not backend.chord_member_done(group, f"m{completer}", size)
    try:
        check()
    finally:
        backend.close()


# -- chord_members_done: each member's record stored and counted in one call
# (on Redis one script, one round trip: scripts/chord_done.lua) -----------------

def _counts(group, ids, size, store=True):
    from greenq.backends.base import ChordCount, Record
    return [ChordCount(group, i, size, Record(i, f"result of {i}".encode()) if store else None) for i in ids]


def test_members_done_stores_each_record_before_counting_it(backend):
    g = f"g-{uuid.uuid4().hex[:6]}"
    assert backend.chord_members_done(_counts(g, ["a", "b"], 3)) == [False, False]
    assert backend.get_many(["a", "b", "c"]) == [b"result of a", b"result of b", None]
    assert backend.chord_members_done(_counts(g, ["a"], 3)) == [False]          # run again: 2 of 3
    assert backend.chord_members_done(_counts(g, ["c", "a", "c"], 3)) == [True, False, True]
    assert backend.get("c") == b"result of c"                                    # stored with its count
    assert backend.chord_member_done(g, "c", 3) is True                          # both paths agree
    backend.chord_sent(g)
    assert backend.chord_members_done(_counts(g, ["c"], 3)) == [False]           # sent: never again
    assert backend.chord_members_done(_counts(g, ["x"], 3, store=False)) == [False]
    assert backend.get("x") is None                                              # no record: none stored


@pytest.mark.parametrize("signing_key", ["", "race-key"])
def test_members_done_has_one_completer_among_racing_workers(backend_env, backend, signing_key):
    """As test_exactly_one_completer_among_racing_workers, through
    chord_members_done (members reported in batches of two, each twice);
    signed too (members tagged, the set checked by whoever finds it full)."""
    size, instances = 40, [backend_env.backend(signing_key=signing_key) for _ in range(4)]
    for instance in instances:
        instance.load_group("-")
    answers, start = [], threading.Barrier(len(instances))
    group = f"race-{uuid.uuid4().hex[:6]}"

    def report(n: int) -> None:
        start.wait()
        mine = [f"m{i}" for i in range(size) if i % len(instances) == n]
        mine = mine + mine
        for k in range(0, len(mine), 2):
            batch = mine[k:k + 2]
            answers.extend(zip(batch, instances[n].chord_members_done(_counts(group, batch, size))))
    threads = [threading.Thread(target=report, args=(n,)) for n in range(len(instances))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    winners = [m for m, won in answers if won]
    assert len(answers) == 2 * size
    assert 1 <= len(winners) <= 2 and len(set(winners)) == 1
    assert None not in backend.get_many([f"m{i}" for i in range(size)])


def test_redis_counts_a_member_in_one_round_trip(backend_env, backend):
    """On Redis a member's completion (store its result, count it, decide
    whether it completes the chord) is one round trip: counted as the
    commands the backend's connections send (a pipeline or a script is one)."""
    if backend_env.kind != "redis" or not backend.counts_with_store:
        pytest.skip("the round trips of the Redis backend (on Cluster a result and its chord are in two slots)")
    from tests.integration.redis_round_trips import RoundTrips
    g = f"g-{uuid.uuid4().hex[:6]}"
    backend.chord_members_done(_counts(g + "-warm", ["w"], 1))       # scripts loaded (EVALSHA, not EVAL)
    with RoundTrips(backend.client) as trips:
        assert backend.chord_members_done(_counts(g, ["a"], 2)) == [False]
    assert trips.count == 1
    with RoundTrips(backend.client) as trips:
        assert backend.chord_members_done(_counts(g, ["b"], 2)) == [True]    # the completer
    assert trips.count == 1
    with RoundTrips(backend.client) as trips:
        assert backend.chord_members_done(_counts(g, ["c", "d", "e"], 5)) == [False, False, False]
    assert trips.count == 1                                                  # a batch: one in all
    assert backend.get_many(["a", "b"]) == [b"result of a", b"result of b"]


@pytest.mark.parametrize("path", ["member_done", "members_done"])
def test_forged_members_never_complete_a_chord_when_signed(backend_env, path):
    """signing_key set: members planted in the chord's set by someone without
    the key (straight into the store, by the transport's own primitives) are
    not counted, and a forged completer in its state record is ignored: the
    chord completes with its last real member, once.  Without a key the same
    forged members are counted (the store is trusted then)."""
    if backend_env.kind == "rpc":
        pytest.skip("rpc:// keeps no groups")
    from greenq.coordination import unsigned_coordination
    from greenq.exceptions import ConfigError
    try:
        backend_env.backend().coordination
    except ConfigError:
        pytest.skip("this backend counts chords by its own means, not on the coordination interface")

    def report(backend, group, member):
        if path == "member_done":
            return backend.chord_member_done(group, member, 3)
        return backend.chord_members_done(_counts(group, [member], 3))[0]

    for key in ("", "chord-key"):
        backend = backend_env.backend(signing_key=key)
        group = f"g-{uuid.uuid4().hex[:6]}"
        members, state = backend._chord_names(group)
        raw = unsigned_coordination(backend.coordination)
        for forged in ("f1", "f2~" + "0" * 64):
            raw.add_once(members, forged)
        if not key:
            assert report(backend, group, "a") is True              # 3 of 3 with the forged two: trusted
            continue
        raw.compare_and_set(state, {}, {"completer": b"f1"})        # a forged completer: ignored
        assert report(backend, group, "a") is False
        assert report(backend, group, "b") is False
        assert report(backend, group, "a") is False
        assert report(backend, group, "c") is True                  # the last real member
        assert report(backend, group, "b") is False
        assert report(backend, group, "c") is True                  # told again until sent
        backend.chord_sent(group)
        assert report(backend, group, "c") is False
