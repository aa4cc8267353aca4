"""The one backoff schedule every retry loop waits by (issue 9, item 5)."""
from __future__ import annotations

import time

import pytest

from greenq import GreenQ
from greenq.backoff import Backoff, backoff
from greenq.transports.amqp.common import ConnectionState
from greenq.reconnect import reconnect_delay


def test_waits_double_from_the_first_up_to_the_cap():
    waits = [backoff(n, 0.1, 5.0) for n in range(1, 9)]
    assert waits == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0])


def test_attempts_before_the_first_wait_the_first_delay():
    assert backoff(0, 0.5, 30.0) == backoff(-3, 0.5, 30.0) == 0.5


def test_a_cap_below_the_first_delay_wins():
    assert backoff(1, 2.0, 1.0) == 1.0


def test_endless_attempts_stay_at_the_cap():
    # doubling an int exponent this far overflowed a float before (after ~1,000 attempts)
    assert backoff(100_000, 0.5, 30.0) == 30.0


@pytest.mark.parametrize("jitter", [0.5, 1.0])
def test_jitter_takes_off_at_most_its_share(jitter):
    wait = 0.8                                  # attempt 4 of 0.1 s doubling
    samples = [backoff(4, 0.1, 5.0, jitter) for _ in range(500)]
    assert all(wait * (1 - jitter) <= s <= wait for s in samples)
    assert min(samples) < wait * (1 - jitter / 2) < max(samples)   # spread over the range, not fixed


def test_jitter_at_the_cap_stays_below_the_cap():
    samples = [backoff(50, 0.1, 5.0, 0.5) for _ in range(200)]
    assert all(2.5 <= s <= 5.0 for s in samples) and len(set(samples)) > 1


def test_backoff_counts_its_failures_and_resets():
    retry = Backoff(0.5, 2.0)
    assert retry.attempt == 0
    assert [retry.next() for _ in range(4)] == [0.5, 1.0, 2.0, 2.0]
    assert retry.attempt == 4
    retry.reset()
    assert retry.attempt == 0
    assert retry.next() == 0.5


def test_backoff_object_applies_its_jitter():
    retry = Backoff(1.0, 1.0, jitter=0.5)
    samples = [retry.next() for _ in range(200)]
    assert all(0.5 <= s <= 1.0 for s in samples) and len(set(samples)) > 1


def test_the_redis_reconnect_schedule():
    assert all(0.025 <= reconnect_delay(1) <= 0.05 for _ in range(100))
    assert all(2.5 <= reconnect_delay(30) <= 5.0 for _ in range(100))


def test_an_amqp_connection_state_backs_off_until_it_is_up_again():
    state = ConnectionState("test", "amqp://guest:guest@127.0.0.1:1//")
    error = ConnectionRefusedError("refused")
    waits = [state.lost(error) for _ in range(8)]
    for n, wait in enumerate(waits, 1):
        full = min(5.0, 0.1 * 2 ** (n - 1))
        assert full / 2 <= wait <= full
    assert state.lost(error, 0.0) == 0.0 and state.failures == 9   # the caller's own wait
    state.up()
    assert state.failures == 0 and 0.05 <= state.lost(error) <= 0.1


def test_task_retry_backoff_keeps_growing_without_overflow():
    app = GreenQ("t", broker=f"memory://{time.monotonic_ns()}")

    @app.task(retry_backoff=2, retry_backoff_max=10, retry_jitter=False)
    def t():
        pass

    assert [t.backoff(n) for n in (0, 1, 2, 5000)] == [2, 4, 8, 10]
