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
for every process, whatever its environment), else ``tempfile.gettempdir()``.
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
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import re
import stat
import tempfile
import threading
import weakref
from typing import TYPE_CHECKING, Any, Dict, Tuple
from urllib.parse import urlsplit

from ..exceptions import ConfigError
from .base import PermitPool

if TYPE_CHECKING:   # pragma: no cover
    from ..config import Config

SHM = "/dev/shm"
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


def permit_root() -> str:
    """The directory under which every app's permit files live (see the module docstring)."""
    base = SHM if os.path.isdir(SHM) else tempfile.gettempdir()
    return os.path.join(base, f"greenq-permits-{os.getuid()}")


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
    found = os.lstat(path)
    if not stat.S_ISDIR(found.st_mode) or found.st_uid != os.getuid() or found.st_mode & 0o077:
        raise ConfigError(f"resource permits (scope = host): {path} is not a directory of user {os.getuid()} "
                          f"with mode 0700; remove it or fix its owner and mode")


def broker_identity(url: str) -> str:
    """What tells ``url``'s broker from another's, without its credentials
    or options: scheme, hosts and path (vhost, database); an SQLite file by
    its absolute path, as the transport resolves it (workers started in two
    directories with ``sqlite:///greenq.sqlite3`` are two apps)."""
    parts = urlsplit(url)
    if parts.scheme == "sqlite":
        path = parts.path[1:] if parts.path.startswith("/") else parts.path
        return f"sqlite:{os.path.abspath(path)}"
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"


def pool_directory(app_key: str, broker_url: str, name: str) -> str:
    """The directory of resource ``name``'s lock files for app ``app_key`` on
    ``broker_url``, made if missing."""
    root = permit_root()
    _private_directory(root)
    app = _file_name(f"{app_key} {broker_identity(broker_url)}")
    path = os.path.join(root, app, _file_name(name))
    os.makedirs(path, 0o700, exist_ok=True)   # inside ours: nobody else can have made them
    return path


#: every live pool of this process, so that a forked child can forget the permits it inherited
_POOLS: "weakref.WeakSet[HostPool]" = weakref.WeakSet()


class HostPool(PermitPool):
    """Permits as flocks on the app's lock files (see the module docstring)."""

    def __init__(self, name: str, limit: int, *, app_key: str, config: "Config", driver: Any = None) -> None:
        super().__init__(name, limit, app_key=app_key, config=config, driver=driver)
        self.directory = pool_directory(app_key, config.broker_url, name)
        self._held: Dict[str, Tuple[int, int]] = {}   # holder -> (file index, its descriptor)
        self._lock = threading.Lock()
        _POOLS.add(self)

    def _path(self, index: int) -> str:
        return os.path.join(self.directory, str(index))

    def try_acquire(self, holder: str) -> bool:
        with self._lock:
            if holder in self._held:
                return True
            if len(self._held) >= self.limit:
                return False                  # this process's share (an adaptive limit) is full
            mine = {index for index, _ in self._held.values()}
            for index in range(self.shared_limit):
                if index in mine:
                    continue
                fd = os.open(self._path(index), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    continue
                except BaseException:
                    os.close(fd)
                    raise
                self._held[holder] = (index, fd)
                return True
            return False

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

    def _forget_in_child(self) -> None:
        """In a forked child: close the inherited descriptors *without*
        unlocking (the lock belongs to the parent's permit, and closing one
        of two descriptors of a file description leaves its flock in place)."""
        held, self._held = self._held, {}
        self._lock = threading.Lock()
        for _, fd in held.values():
            os.close(fd)


def _unlock(fd: int) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_UN)   # explicitly: a forked copy of fd must not keep the permit
    finally:
        os.close(fd)


def _after_fork_in_child() -> None:
    for pool in list(_POOLS):
        pool._forget_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)

__all__ = ["HostPool", "broker_identity", "permit_root", "pool_directory"]
