"""Exponential backoff: the one schedule every retry loop of greenq waits by.

A wait starts at ``first`` seconds and doubles with each failed attempt up to
``cap``.  ``jitter`` (0 to 1) takes a random part of it off, so that many
clients that lost the same server do not all come back at the same moment:
0.5 waits between half and all of the wait, 1.0 between nothing and all.

``backoff(attempt, ...)`` is the wait itself, for loops that count their
attempts anyway; a :class:`Backoff` counts them for a loop that does not.
"""
from __future__ import annotations

import random

#: doublings beyond this change nothing (the cap is reached) and would overflow a float
_MAX_DOUBLINGS = 64


def backoff(attempt: int, first: float, cap: float, jitter: float = 0.0) -> float:
    """Seconds to wait after failed attempt ``attempt`` (1, 2, ...): ``first``
    doubled ``attempt - 1`` times, at most ``cap``, less up to ``jitter`` of it."""
    wait = min(cap, first * 2.0 ** min(max(attempt - 1, 0), _MAX_DOUBLINGS))
    return random.uniform(wait * (1.0 - jitter), wait) if jitter else wait


class Backoff:
    """The waits of one retry loop: ``next()`` after each failure, ``reset()``
    after a success.  ``attempt`` is the number of failures in a row."""

    __slots__ = ("first", "cap", "jitter", "attempt")

    def __init__(self, first: float, cap: float, jitter: float = 0.0) -> None:
        self.first = first
        self.cap = cap
        self.jitter = jitter
        self.attempt = 0

    def next(self) -> float:
        """Count a failure; the seconds to wait before trying again."""
        self.attempt += 1
        return backoff(self.attempt, self.first, self.cap, self.jitter)

    def reset(self) -> None:
        """The last attempt worked: the next failure waits ``first`` again."""
        self.attempt = 0
