"""The host scope: permits shared by every worker process of the app on this
machine (``--processes`` children and separately started workers alike).

A resource of limit N is N lock files in a directory of the app's own::

    /dev/shm/greenq-permits-<uid>/<app>-<digest>/<resource>-<digest>/0 ... N-1

and a permit is an exclusive ``flock`` on one of them, taken non-blocking
(``LOCK_NB``) through a file descriptor of the permit's own.  Why flock:

* **It survives kill -9.**  The kernel drops a process's flocks when its
  descriptors close, which it does for a process that dies however it dies:
  a killed holder's permits are free the moment it is gone, with no lease to
  wait out and no sweeper.  (A pid file or a counter in shared memory would
  need one; a POSIX semaphore is not given back by a dying holder.)
* **It never blocks.**  ``LOCK_NB`` answers at once, so a pool is safe in a
  green thread; waiting is the admission step's job.
* **It needs nothing running**: no server, no daemon, only a tmpfs.
* A flock belongs to an open file description, not to the process, so two
  pools of one process (or two permits of one pool) exclude each other like
  two processes do; tests use that.

Lowering the limit (an adaptive limit, ``set_limit``) leaves permits above
it with their holders; only files ``0 .. limit-1`` are tried, so no new
permit is handed out until enough holders below the new limit are gone.

Where: ``/dev/shm`` when the machine has it (Linux: a tmpfs, the same path
for every process, whatever its environment), else ``tempfile.gettempdir()``;
``$GREENQ_PERMITS_DIR``, when set, names the directory instead (``ROOT_ENV``:
the tests give each test one of its own; every worker of an app on the
machine must then be given the same one).
Not ``$XDG_RUNTIME_DIR``: a login shell has it and a systemd service usually
does not, and two workers of one app looking in two directories would each
hand out the whole limit.  The directory is per user (its name holds the uid)
and created 0700, the files 0600; an existing one that is not a directory
of ours, closed to others, is refused (a ConfigError naming it) instead of
being trusted.  The app's directory is named from ``app_key`` (its key
prefix) and the broker it serves (``broker_identity``: two apps of the
default prefix on two brokers are two apps), the resource's from its name,
each with a digest so that two names that differ only in characters a file
name cannot hold stay apart.

Limits, honestly: POSIX only (``fcntl``); processes of one app running as
different users do not share permits (each user has its own directory);
a file system shared between machines (NFS) is not a host, do not point
``TMPDIR`` at one on a machine without ``/dev/shm``.  A pool counts the
permits *it* holds (``in_use``), not those of the machine's other processes.
A process forked while it holds permits would share their locks with its
child: the child forgets them at fork (see ``_forget_in_child``).

Cleaning up: an app or a resource that is gone leaves its files behind, so
a pool that opens first sweeps the root once per process (``sweep``): every
lock file nobody holds (a non-blocking flock on it succeeds) and older than
``STALE_SECONDS`` is removed, then every directory left empty that had not
changed for as long.  Removing a lock file races with a process taking it:
that process may have opened the file just before it was unlinked and lock
it just after, holding a permit on a file no other process can find again
while a new file of that name hands out the same permit once more.  So the
sweep unlinks a file only while it holds that file's lock itself (and only
if the path still names the file it locked), and ``try_acquire``, once it
holds a lock, checks that the path still names the file it locked, else it
drops it and opens the path again: a lock held on a file its path names can
never be swept, and a lock on a swept file is never kept.  A directory is
removed with ``rmdir`` (never when it holds anything), and a pool whose
directory was swept makes it again.
"""
from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import re
import stat
import tempfile
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Set, Tuple
from urllib.parse import urlsplit

from ..exceptions import ConfigError
from .base import PermitPool
from .fair import CONTENDED_POLL, REMOTE_POLL, FileWaiters

if TYPE_CHECKING:   # pragma: no cover
    from ..config import Config

log = logging.getLogger("greenq.resources")

SHM = "/dev/shm"
#: the environment variable that names the permit root instead of the default
ROOT_ENV = "GREENQ_PERMITS_DIR"
#: a lock file nobody holds is swept once it is this old (and a directory left
#: empty once it has not changed for this long): an app that has been gone
#: for ten minutes
STALE_SECONDS = 600.0
#: times one permit is tried when its file keeps being swept under the taker
_TRIES = 8
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")
_OPEN = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC


def default_root() -> str:
    """The permit root when ``$GREENQ_PERMITS_DIR`` is not set."""
    base = SHM if os.path.isdir(SHM) else tempfile.gettempdir()
    return os.path.join(base, f"greenq-permits-{os.getuid()}")


def permit_root() -> str:
    """The directory under which every app's permit files live (see the module docstring)."""
    chosen = os.environ.get(ROOT_ENV, "")
    return os.path.abspath(chosen) if chosen else default_root()


def _file_name(text: str) -> str:
    """``text`` as one path component: readable, and apart from any other text."""
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    return f"{_UNSAFE.sub('_', text)[:40]}-{digest}"


def _private_directory(path: str) -> None:
    """Make ``path`` (0700) unless it exists; refuse one that is not a real
    directory of this user closed to everybody else."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except FileNotFoundError:
        raise ConfigError(f"resource permits (scope = host): cannot make {path}: its parent directory is "
                          f"missing (${ROOT_ENV}?)") from None
    found = os.lstat(path)
    if not stat.S_ISDIR(found.st_mode) or found.st_uid != os.getuid() or found.st_mode & 0o077:
        raise ConfigError(f"resource permits (scope = host): {path} is not a directory of user {os.getuid()} "
                          f"with mode 0700; remove it or fix its owner and mode")


def broker_identity(url: str) -> str:
    """What tells ``url``'s broker from another's, without its credentials
    or options: scheme, hosts and path (vhost, database); an SQLite file by
    its absolute path, as the transport resolves it (workers started in two
    directories with ``sqlite:///greenq.sqlite3`` are two apps); likewise any
    transport whose descriptor says ``file_urls``."""
    from ..transports import lookup
    parts = urlsplit(url)
    desc = lookup(url)
    if desc is not None and desc.file_urls:
        path = parts.path[1:] if parts.path.startswith("/") else parts.path
        return f"{parts.scheme}:{os.path.abspath(path)}"
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"


def pool_directory(app_key: str, broker_url: str, name: str) -> str:
    """The directory of resource ``name``'s lock files for app ``app_key`` on
    ``broker_url``, made if missing."""
    root = permit_root()
    _private_directory(root)
    app = _file_name(f"{app_key} {broker_identity(broker_url)}")
    path = os.path.join(root, app, _file_name(name))
    _make(path)
    return path


def _make(path: str) -> None:
    """Make a resource's directory and its app's (0700; inside the private
    root: nobody else can have made them), again if a sweep removes the app's
    between the two."""
    for _ in range(_TRIES):
        try:
            for directory in (os.path.dirname(path), path):
                try:
                    os.mkdir(directory, 0o700)
                except FileExistsError:
                    pass
            return
        except FileNotFoundError:
            continue
    raise FileNotFoundError(f"resource permits (scope = host): {path} keeps being removed")


def _names(path: str, fd: int) -> bool:
    """Whether ``path`` still names the file open as ``fd`` (not swept, not replaced)."""
    try:
        now = os.lstat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino)


#: every live pool of this process, so that a forked child can forget the permits it inherited
_POOLS: "weakref.WeakSet[HostPool]" = weakref.WeakSet()


class HostPool(PermitPool):
    """Permits as flocks on the app's lock files (see the module docstring)."""

    def __init__(self, name: str, limit: int, *, app_key: str, config: "Config", driver: Any = None) -> None:
        super().__init__(name, limit, app_key=app_key, config=config, driver=driver)
        self.directory = pool_directory(app_key, config.broker_url, name)
        _sweep_once(os.path.dirname(os.path.dirname(self.directory)))
        self._held: Dict[str, Tuple[int, int]] = {}   # holder -> (file index, its descriptor)
        self._lock = threading.Lock()
        #: who else waits for these places (marker files beside the lock files): fair shares
        self.waiters = FileWaiters(self.directory)
        _POOLS.add(self)

    def _path(self, index: int) -> str:
        return os.path.join(self.directory, str(index))

    def try_acquire(self, holder: str) -> bool:
        with self._lock:
            if holder in self._held:
                return True
            if len(self._held) >= self.limit:
                return False                  # this process's share (an adaptive limit) is full
            bound = self.waiters.share(self.shared_limit)
            if bound is not None and len(self._held) >= bound:
                self.waiters.refused()        # others wait: a permit free now is theirs
                return False
            mine = {index for index, _ in self._held.values()}
            for index in range(self.shared_limit):
                if index in mine:
                    continue
                fd = self._take(index)
                if fd is not None:
                    self._held[holder] = (index, fd)
                    self.waiters.granted(len(self._held), self.shared_limit)   # its wait is over (fair.py)
                    return True
            self.waiters.refused()
            return False

    def fair_share(self) -> Optional[int]:
        return self.waiters.share(self.shared_limit)

    def poll_interval(self) -> Optional[float]:
        return CONTENDED_POLL if self.waiters.contended() else REMOTE_POLL

    def _take(self, index: int) -> Optional[int]:
        """A descriptor holding the lock of file ``index``, or None when
        another holds it.  The lock counts only while the path still names
        the file locked: a sweep may have unlinked it between our open and
        our lock (see the module docstring), and then the path is opened again."""
        path = self._path(index)
        for _ in range(_TRIES):
            try:
                fd = os.open(path, _OPEN | os.O_CREAT, 0o600)
            except FileNotFoundError:       # a sweep removed the directory
                _make(self.directory)
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if _names(path, fd):
                    return fd
            except BlockingIOError:
                os.close(fd)
                return None
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)                    # swept under us: that lock is worth nothing
        return None

    def release(self, holder: str) -> None:
        with self._lock:
            found = self._held.pop(holder, None)
        if found is not None:
            _unlock(found[1])

    def in_use(self) -> int:
        return len(self._held)

    def close(self) -> None:
        with self._lock:
            held, self._held = self._held, {}
        for _, fd in held.values():
            _unlock(fd)
        self.waiters.close()

    def _forget_in_child(self) -> None:
        """In a forked child: close the inherited descriptors *without*
        unlocking (the lock belongs to the parent's permit, and closing one
        of two descriptors of a file description leaves its flock in place)."""
        held, self._held = self._held, {}
        self._lock = threading.Lock()
        for _, fd in held.values():
            os.close(fd)
        self.waiters.forget_in_child()


def _unlock(fd: int) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_UN)   # explicitly: a forked copy of fd must not keep the permit
    finally:
        os.close(fd)


#: the roots this process swept (once each: when its first pool there opens)
_SWEPT: Set[str] = set()


def sweep(root: Optional[str] = None, older_than: float = STALE_SECONDS) -> int:
    """Remove the lock files under ``root`` (default: ``permit_root()``)
    that nobody holds and that are older than ``older_than`` seconds, then
    the app and resource directories left empty that had not changed for as
    long; returns how many files went.  Safe beside running workers (see the
    module docstring); what it cannot read or remove it leaves."""
    root = root or permit_root()
    cutoff = time.time() - older_than
    removed = 0
    for app in _subdirectories(root):
        app_idle = _unchanged_since(app, cutoff)
        for resource in _subdirectories(app):
            idle = _unchanged_since(resource, cutoff)
            try:
                names = os.listdir(resource)
            except OSError:
                continue
            removed += sum(_remove_if_free(os.path.join(resource, n), cutoff) for n in names if n.isdigit())
            for n in names:     # waiters' markers (fair.py) of processes long gone
                if n.startswith(FileWaiters.PREFIX) and _unchanged_since(os.path.join(resource, n), cutoff):
                    try:
                        os.unlink(os.path.join(resource, n))
                    except OSError:
                        pass
            if idle:
                _remove_if_empty(resource)
        if app_idle:
            _remove_if_empty(app)
    return removed


def _sweep_once(root: str) -> None:
    if root in _SWEPT:
        return
    _SWEPT.add(root)
    try:
        removed = sweep(root)
    except Exception as exc:   # cleaning up never stops a worker
        log.debug("resource permits: sweeping %s failed: %s", root, exc)
        return
    if removed:
        log.debug("resource permits: swept %d lock files nobody held from %s", removed, root)


def _subdirectories(path: str) -> List[str]:
    try:
        entries = list(os.scandir(path))
    except OSError:
        return []
    return [e.path for e in entries if e.is_dir(follow_symlinks=False)]


def _unchanged_since(path: str, cutoff: float) -> bool:
    try:
        return os.lstat(path).st_mtime <= cutoff
    except OSError:
        return False


def _remove_if_empty(path: str) -> None:
    try:
        os.rmdir(path)          # only an empty one: a file made meanwhile keeps it
    except OSError:
        pass


def _remove_if_free(path: str, cutoff: float) -> bool:
    """Unlink lock file ``path`` if nobody holds it and it is older than
    ``cutoff``: under its lock, and only if ``path`` still names the file locked."""
    try:
        fd = os.open(path, _OPEN)
    except OSError:
        return False
    try:
        found = os.fstat(fd)
        if not stat.S_ISREG(found.st_mode) or found.st_mtime > cutoff:
            return False
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if not _names(path, fd):
            return False
        os.unlink(path)
        return True
    except OSError:             # held (BlockingIOError), or gone meanwhile
        return False
    finally:
        os.close(fd)            # and with it our lock


def _after_fork_in_child() -> None:
    for pool in list(_POOLS):
        pool._forget_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)

__all__ = ["HostPool", "ROOT_ENV", "broker_identity", "default_root", "permit_root", "pool_directory", "sweep"]
