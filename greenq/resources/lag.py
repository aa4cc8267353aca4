"""The worker's own delay in each adaptive sample: how long the sample's green
thread was *ready* (its I/O had answered) but not yet running, because the
hub was running other green threads.  An adaptive limit takes it off the
sample's latency (``AdaptiveLimit.on_sample(lag=)``, docs/resources.md "The
worker's own delays").

Only for the gevent driver on its libev loop (gevent's default), and only in
a process with an adaptive resource: ``loop_lag(driver)`` makes the meter
then, and returns None otherwise (other drivers and loops: no lag, as
before).  Nothing of it runs in a worker without an adaptive resource.

How it measures.  A green thread waiting for a socket is resumed by the hub
in the pass over the events that follows the poll (``epoll_wait``) that
reported the socket ready.  Two facts bound when the answer came:

* it was not there yet when the *previous* poll returned (that poll would
  have reported it: the thread waited since before that poll began), nor
  before the thread began waiting;
* it was there when the poll that reported it returned; and if that poll
  *blocked* (the process had nothing to run), it came while it blocked:
  then its arrival is taken as the poll's return.

So the sample's thread, switched out to the hub at ``S`` and switched back
in at ``R`` while the hub runs the events of poll ``k`` (returned at
``T_k``, previous poll at ``T_k-1``, poll ``k`` began at ``B_k``), met

    lag = R - T_k                                   if poll k blocked
    lag = R - (max(S, T_k-1) + B_k) / 2             otherwise

the second being the middle of the interval in which the answer came (the
hub ran other threads all that time; the answer came anywhere in it).  A
resume from gevent's callbacks (``sleep(0)``, an event set by another thread)
counts from the middle of ``S`` and the start of the callbacks' pass.  A
sample's lag is the sum over every resume of its thread between the
sample's start and end.

The times come from three libev watchers that run no green thread: a check
watcher at the highest priority (the first thing run after a poll:
``T_k``), a prepare watcher at the highest priority (before gevent's own
prepare runs its callbacks: the callbacks' pass begins) and one at the
lowest (after them, just before the poll: ``B_k``); and the switches of the
sampled threads from a ``greenlet.settrace`` hook (chained to any tracer
set before), which looks up two identities per switch and does more only for
a thread being sampled.  Cost: three Python calls per turn of the loop and
one per switch, only with an adaptive resource.  Validated against a
server's own send times: tests/integration/test_loop_lag.py.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Dict, Optional, Tuple

__all__ = ["LoopLag", "loop_lag", "BLOCKED"]

#: a poll that took longer than this blocked (the process had nothing to run): an
#: answer it reported came while it blocked.  A poll that did not block returns in
#: a few microseconds
BLOCKED = 0.0002
#: the least time between two peeks at the sockets sampled threads wait for (one
#: poll(2) of a few descriptors, made when the hub takes over from a green thread)
PEEK_EVERY = 0.0002
#: poll(2) flags
POLLIN, POLLOUT = 0x001, 0x004


class _Track:
    """One sampled green thread: its lag so far, when it last left for the hub."""
    __slots__ = ("lag", "low", "high", "out", "refs", "fd", "seen", "unseen")

    def __init__(self) -> None:
        self.lag = 0.0
        self.low = 0.0          # the least and the most it can have been
        self.high = 0.0
        self.out = 0.0          # when it switched out to the hub (0: running)
        self.refs = 0
        self.fd = -1            # the socket it waits for, when it waits for one (peeked)
        self.seen = 0.0         # when a peek first saw that socket ready (0: not yet)
        self.unseen = 0.0       # the last peek that saw it not ready


Mark = Tuple[Any, _Track, float, float, float]    # (green thread, its track, lag, low, high at begin)


class LoopLag:
    """The lag each sampled green thread meets on ``hub``'s loop (gevent, libev).

    ``mark = begin()`` in the green thread a sample runs in, at its start;
    ``end(mark)`` at its end returns the seconds that thread waited, ready, for
    the hub (0.0 when called from another thread); ``bounds(mark)`` the least
    and the most it can have been.  ``close()`` stops it."""

    def __init__(self, hub: Any, clock: Callable[[], float] = time.monotonic) -> None:
        import greenlet
        from gevent.monkey import get_original
        from gevent.socket import socket as green_socket
        self._greenlet = greenlet
        self._socket_type = green_socket
        # the OS thread's id (threading.get_ident is the green thread's once patched)
        self._ident: Callable[[], int] = get_original("_thread", "get_ident")
        # the real poll(2) (gevent patches select.poll): peeks never switch
        self._poller = get_original("select", "poll")()
        self.hub = hub
        self.clock = clock
        self._thread = self._ident()
        self._tracked: Dict[Any, _Track] = {}
        self._waiting: Dict[int, _Track] = {}       # fd -> the sampled thread waiting for it
        now = clock()
        self._t_prev = self._t_cur = self._b = self._p = self._peeked = now
        self._blocked = False
        self._callbacks = False     # in the callbacks' pass (after the first prepare, before the poll)
        loop = hub.loop
        self._check = loop.check(ref=False, priority=2)
        self._prepare_first = loop.prepare(ref=False, priority=2)
        self._prepare_last = loop.prepare(ref=False, priority=-2)
        self._check.start(self._polled)
        self._prepare_first.start(self._callbacks_begin)
        self._prepare_last.start(self._polling)
        self._previous = greenlet.settrace(self._trace)
        self._closed = False
        #: resumes measured, and their lag in all (seconds): the estimate, the least
        #: and the most it can have been; peeks made (for traces and tests)
        self.resumes = 0
        self.total = 0.0
        self.total_low = 0.0
        self.total_high = 0.0
        self.peeks = 0

    # -- the loop's watchers ----------------------------------------------------------
    def _polled(self) -> None:
        now = self.clock()
        self._blocked = now - self._b > BLOCKED
        self._t_prev, self._t_cur = self._t_cur, now
        self._callbacks = False

    def _callbacks_begin(self) -> None:
        self._p = self.clock()
        self._callbacks = True

    def _polling(self) -> None:
        self._b = self.clock()

    # -- the switches ------------------------------------------------------------------
    def _trace(self, event: str, args: Any) -> None:
        if event == "switch" or event == "throw":
            origin, target = args
            hub = self.hub
            if target is hub:
                if self._waiting:
                    self._peek()
                track = self._tracked.get(origin)
                if track is not None:
                    self._left(origin, track)
            elif origin is hub:
                track = self._tracked.get(target)
                if track is not None and track.out:
                    self._resumed(track)
        previous = self._previous
        if previous is not None:
            previous(event, args)

    def _left(self, glet: Any, track: _Track) -> None:
        """A sampled thread switched out to the hub: if it waits for a socket
        (its innermost frame is a method of a gevent socket), watch that socket."""
        now = track.out = track.unseen = self.clock()
        track.seen = 0.0
        frame = glet.gr_frame
        if frame is None or track.fd >= 0:
            return
        sock = frame.f_locals.get("self")
        if not isinstance(sock, self._socket_type):
            return
        try:
            fd = sock.fileno()
            name = frame.f_code.co_name
            self._poller.register(fd, POLLOUT if ("send" in name or "connect" in name) else POLLIN)
        except (OSError, ValueError):
            return
        if fd in self._waiting:             # (not ours: another thread's socket of the same fd)
            self._waiting[fd].fd = -1
        track.fd = fd
        self._waiting[fd] = track
        self._peeked = now

    def _peek(self) -> None:
        """Between two green threads: which watched sockets are ready now (at most every PEEK_EVERY)."""
        now = self.clock()
        if now - self._peeked < PEEK_EVERY:
            return
        self._peeked = now
        self.peeks += 1
        waiting = self._waiting
        try:
            ready = self._poller.poll(0)
        except (OSError, ValueError):
            return
        for fd, _ in ready:
            track = waiting.get(fd)
            if track is not None and not track.seen:
                track.seen = now
        for track in waiting.values():
            if not track.seen:
                track.unseen = now

    def _unwatch(self, track: _Track) -> None:
        fd = track.fd
        if fd >= 0:
            track.fd = -1
            if self._waiting.get(fd) is track:
                del self._waiting[fd]
                try:
                    self._poller.unregister(fd)
                except (KeyError, OSError, ValueError):
                    pass

    def _resumed(self, track: _Track) -> None:
        now = self.clock()
        out = track.out
        track.out = 0.0
        peeked = track.fd >= 0
        self._unwatch(track)
        if self._callbacks:         # resumed by a callback: sleep(0), an event set, a lock released
            first, last = out, now
            ready = out if out >= self._p else (out + self._p) / 2.0
        else:
            if out >= self._t_cur:
                first = last = out  # left and came back within one pass: ready when it left
            elif self._blocked:     # the poll that reported it waited: it came then
                first, last = max(out, self._b), self._t_cur
            else:                   # it came while the hub ran others, since the last poll
                first, last = max(out, self._t_prev), min(self._b, self._t_cur)
            if peeked:              # what the peeks saw narrows it
                first = max(first, track.unseen)
                if track.seen:
                    last = min(last, track.seen)
                last = max(first, last)
            ready = last if self._blocked else (first + last) / 2.0
        lag = now - ready
        if lag > 0.0:
            low, high = max(0.0, now - last), max(0.0, now - first)
            track.lag += lag
            track.low += low
            track.high += high
            self.resumes += 1
            self.total += lag
            self.total_low += low
            self.total_high += high

    # -- samples -----------------------------------------------------------------------
    def begin(self) -> Optional[Mark]:
        """Start measuring the current green thread (for one sample)."""
        if self._closed or self._ident() != self._thread:
            return None
        current = self._greenlet.getcurrent()
        if current is self.hub:
            return None
        track = self._tracked.get(current)
        if track is None:
            track = self._tracked[current] = _Track()
        track.refs += 1
        return (current, track, track.lag, track.low, track.high)

    def end(self, mark: Optional[Mark]) -> float:
        """The lag the green thread of ``mark`` met since ``begin``; it stops
        being measured when its last mark ends.  0.0 for None, or when called
        from another green thread than ``begin`` (its lag is not this one's)."""
        if mark is None:
            return 0.0
        glet, track, start = mark[0], mark[1], mark[2]
        track.refs -= 1
        if track.refs <= 0 and self._tracked.get(glet) is track:
            del self._tracked[glet]
            self._unwatch(track)
        if self._greenlet.getcurrent() is not glet:
            return 0.0
        return max(0.0, track.lag - start)

    def end_bounds(self, mark: Optional[Mark]) -> Tuple[float, float, float]:
        """``end``, with the least and the most the lag can have been: (estimate, least, most)."""
        if mark is None or self._greenlet.getcurrent() is not mark[0]:
            self.end(mark)
            return (0.0, 0.0, 0.0)
        track = mark[1]
        low, high = max(0.0, track.low - mark[3]), max(0.0, track.high - mark[4])
        return (self.end(mark), low, high)

    def close(self) -> None:
        """Stop the watchers and the switch hook (given back to the tracer before it)."""
        if self._closed:
            return
        self._closed = True
        for watcher in (self._check, self._prepare_first, self._prepare_last):
            try:
                watcher.stop()
                watcher.close()
            except Exception:       # noqa: S110 - a loop already destroyed: nothing left to stop
                pass
        if self._ident() == self._thread and self._greenlet.gettrace() == self._trace:
            self._greenlet.settrace(self._previous)
        self._tracked.clear()
        for track in list(self._waiting.values()):
            self._unwatch(track)


def loop_lag(driver: Any) -> Optional[LoopLag]:
    """A meter for ``driver``'s hub, or None when it has none (not gevent, a
    loop other than libev, not the hub's thread)."""
    if driver is None or getattr(driver, "name", None) != "gevent":
        return None
    try:
        import gevent
        from gevent._hub_local import get_hub_if_exists
        from gevent.monkey import get_original
        hub = get_hub_if_exists()
        if hub is None and get_original("threading", "current_thread")() is \
                get_original("threading", "main_thread")():
            hub = gevent.get_hub()      # the worker's hub, in its main thread, made a little early
        if hub is None or "libev" not in type(hub.loop).__module__:
            return None
        return LoopLag(hub)
    except Exception:               # never let the meter keep a worker from starting
        return None
