"""Cross-process wake-ups for the SQLite transport: SQLite cannot block, so a
worker waiting for a message and a client waiting for a result would poll.
Instead each waiter binds a Unix datagram socket in a directory beside the
database file (``<file>.wake/``), and a process that writes a message (or a
final result) sends one small datagram to every socket of the matching kind
there: non-blocking, ignored when nobody listens.  The waiter waits on its
socket with ``select``, cooperatively under gevent and eventlet (their own
``select``), in its thread otherwise.

Correctness never depends on a wake-up: a waiter still reads the database
every ``FALLBACK`` seconds (and at the next due time of a delayed message),
so a lost datagram costs latency only.  The order that makes a wake-up
impossible to miss: the socket is bound before the first read, and the
waiter empties it *before* each read, never after, so a datagram sent after
the read is still there when the wait begins.

Socket names: ``<kind>.<prefix hash>.<pid>.<random>.sock``; ``kind`` is
``m`` (message waiters: the datagram names the queues written to) or ``r``
(result waiters).  A sender that finds a socket nobody holds (its process was
killed: ``ECONNREFUSED``) deletes it.  Where the directory cannot be made or
written (read-only), waiters fall back to the old poll, logged once per
process.  Paths too long for a socket address (108 bytes) are reached through
``/proc/self/fd/<directory fd>/``.  After a fork, a child binds sockets of its
own and never deletes its parent's.
"""
from __future__ import annotations

import errno
import hashlib
import logging
import os
import select
import socket
import time
import uuid
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

log = logging.getLogger("greenq.transports.sqlite.wakeup")

FALLBACK = 1.0            # seconds between reads of the database by a waiter that was not woken
MAX_PAYLOAD = 1024        # bytes of queue names in a datagram; more: b"*" (wakes every message waiter)
RACY_NS = 50_000_000      # a directory changed this recently is listed again (coarse mtimes)
SUN_PATH_MAX = 100        # bytes of a socket path used directly (the limit is 108)
ALL = b"*"

_warned: Dict[str, bool] = {}


def _warn_once(directory: str, exc: BaseException) -> None:
    if not _warned.get(directory):
        _warned[directory] = True
        log.warning("sqlite wake-ups are off for %s (%s): waiters poll the database instead", directory, exc)


def _selector(driver: Any) -> Callable[..., Any]:
    """The ``select`` that waits cooperatively under ``driver``."""
    name = getattr(driver, "name", "") if driver is not None and getattr(driver, "green", False) else ""
    if name == "gevent":
        import gevent.select
        return gevent.select.select
    if name == "eventlet":
        import eventlet.green.select
        return eventlet.green.select.select
    return select.select      # threads, solo, no driver (patched, when the process is)


class Channel:
    """The wake-up directory of one database file and key_prefix: the sending
    side (``notify``) and the waiters (``waiter``) of one process."""

    def __init__(self, db_path: str, prefix: str) -> None:
        self.directory = db_path + ".wake"
        self.tag = hashlib.sha1(prefix.encode()).hexdigest()[:8]
        self._pid = 0
        self._sender: Optional[socket.socket] = None
        self._dir_fd = -1
        self._listing: Tuple[int, List[str]] = (-1, [])

    # -- paths ------------------------------------------------------------------
    def _fork_check(self) -> None:
        if self._pid != os.getpid():         # new process: nothing inherited is ours
            self._pid = os.getpid()
            self._sender = None
            self._dir_fd = -1
            self._listing = (-1, [])

    def address(self, name: str) -> str:
        path = os.path.join(self.directory, name)
        if len(os.fsencode(path)) <= SUN_PATH_MAX:
            return path
        if self._dir_fd < 0:
            self._dir_fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        return f"/proc/self/fd/{self._dir_fd}/{name}"

    def _names(self, kind: str) -> List[str]:
        """The socket names of ``kind`` in the directory (listed again when it changed)."""
        try:
            mtime = os.stat(self.directory).st_mtime_ns
        except OSError:
            return []
        cached, names = self._listing
        if cached != mtime or time.time_ns() - mtime < RACY_NS:
            try:
                names = os.listdir(self.directory)
            except OSError:
                return []
            self._listing = (mtime, names)
        start = f"{kind}.{self.tag}."
        return [n for n in names if n.startswith(start)]

    # -- sending ------------------------------------------------------------------
    def sender(self) -> socket.socket:
        """This process's unbound, non-blocking sending socket."""
        self._fork_check()
        if self._sender is None:
            sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sender.setblocking(False)
            self._sender = sender
        return self._sender

    def notify(self, kind: str, payload: bytes = ALL, skip: str = "") -> int:
        """Send ``payload`` to every waiter of ``kind``; returns how many were sent.
        Never raises: a wake-up is an optimisation."""
        try:
            self._fork_check()
            names = self._names(kind)
            if not names:
                return 0
            sender = self.sender()
            sent = 0
            for name in names:
                if name == skip:
                    continue
                try:
                    sender.sendto(payload, self.address(name))
                    sent += 1
                except OSError as exc:
                    if exc.errno in (errno.ECONNREFUSED, errno.ENOTSOCK):   # its process is gone: stale
                        try:
                            os.unlink(os.path.join(self.directory, name))
                        except OSError:
                            pass
                    # EAGAIN (its buffer is full: it has wake-ups waiting), ENOENT (gone
                    # meanwhile), EACCES (another user's): nothing to do
            return sent
        except Exception as exc:  # noqa: BLE001 - never fail a write for a wake-up
            log.debug("wake-up not sent: %s", exc)
            return 0

    def waiter(self, kind: str, driver: Any = None) -> Optional["Waiter"]:
        """A new bound waiter of ``kind``, or None where the directory cannot be used."""
        self._fork_check()
        try:
            os.makedirs(self.directory, exist_ok=True)
        except OSError as exc:
            _warn_once(self.directory, exc)
            return None
        name = f"{kind}.{self.tag}.{os.getpid()}.{uuid.uuid4().hex[:12]}.sock"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.bind(self.address(name))
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            _warn_once(self.directory, exc)
            return None
        return Waiter(self, name, sock, _selector(driver))


class Waiter:
    """One bound socket; used by one waiting greenlet or thread at a time
    (``busy``: a second concurrent waiter polls instead)."""

    def __init__(self, channel: Channel, name: str, sock: socket.socket, select_fn: Callable[..., Any]) -> None:
        self.channel, self.name, self.sock, self._select = channel, name, sock, select_fn
        self.pid = os.getpid()
        self.busy = False

    def drain(self) -> List[bytes]:
        """The datagrams received so far (empties the socket; never blocks)."""
        got: List[bytes] = []
        while True:
            try:
                got.append(self.sock.recv(MAX_PAYLOAD + 16))
            except (BlockingIOError, InterruptedError):
                return got
            except OSError:
                return got

    def wait(self, timeout: float) -> bool:
        """Until a datagram arrives (True) or ``timeout`` seconds pass (False)."""
        if timeout <= 0:
            return False
        try:
            return bool(self._select([self.sock], [], [], timeout)[0])
        except (OSError, ValueError):        # closed meanwhile
            time.sleep(0)
            return False

    def poke(self) -> None:
        """Wake this waiter (from any thread or greenlet of its process)."""
        try:
            self.channel.sender().sendto(ALL, self.channel.address(self.name))
        except OSError:
            pass

    def close(self) -> None:
        if self.pid == os.getpid():          # a forked child never deletes its parent's socket
            try:
                os.unlink(os.path.join(self.channel.directory, self.name))
            except OSError:
                pass
        try:
            self.sock.close()
        except OSError:
            pass


def queues_payload(queues: Sequence[str]) -> bytes:
    """The datagram telling message waiters which queues were written to."""
    payload = "\n".join(sorted(set(queues))).encode("utf-8", "replace")
    return payload if 0 < len(payload) <= MAX_PAYLOAD else ALL


def relevant(datagrams: Sequence[bytes], queues: Sequence[str]) -> bool:
    """True when one of ``datagrams`` concerns one of ``queues``."""
    wanted = None
    for data in datagrams:
        if data == ALL or not data:
            return True
        if wanted is None:
            wanted = set(queues)
        if not wanted.isdisjoint(data.decode("utf-8", "replace").split("\n")):
            return True
    return False
