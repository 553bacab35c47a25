"""Wake idle consumers of a SQLite queue when a task is enqueued.

SqliteHuey has no blocking pop: an idle consumer finds work only by polling,
which costs CPU while idle and delays the first task after a quiet spell by
up to one poll interval (a reply waits for two: its webhook event on
`default`, then its Message 2 on `messages`). Redis (BZPOPMIN) and
PostgreSQL (LISTEN/NOTIFY) block instead, and do not use this.

Every waiting consumer thread binds a unix datagram socket in
``<queue file>.wake/<queue name>/`` (named ``<pid>.<n>``). An enqueuer, in
any process that uses the same queue file, sends one byte to every socket
there after its insert is committed; an idle thread waits on its socket, up
to the fallback poll interval, instead of sleeping. The poll stays: a poke
that is lost (a socket removed, no permission to write it) costs at most
one fallback interval, never a task, because the row in the queue table is
what a consumer dequeues and the poke only says "look now".

No lost wake-up between a consumer's empty dequeue and its wait: the socket
is bound, and its pending pokes drained, *before* the dequeue, so a task
committed after that dequeue leaves a byte that ends the wait at once.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import select
import socket
import threading
import time

WAKE_SUFFIX = ".wake"
# sockaddr_un.sun_path holds 108 bytes with the terminating NUL. A longer
# path is reached through /proc/self/fd/<directory fd>/<name> instead.
_SUN_PATH_MAX = 107
# A directory listing is trusted only once its mtime is this old.
_SETTLE_NS = 50_000_000
_names = itertools.count()
_live: set[Waiter] = set()
_live_lock = threading.Lock()


def wake_dir(queue_file: str, queue_name: str) -> str:
    """Where the consumers of `queue_name` in `queue_file` wait: next to the
    file, so every process using the file finds them whatever its
    environment (the CLI, the web role, a standalone worker)."""
    return os.path.join(os.path.abspath(queue_file) + WAKE_SUFFIX, queue_name)


@contextlib.contextmanager
def _address(directory: str, name: str):
    """A socket address for `directory`/`name`, short enough for bind/sendto."""
    path = os.path.join(directory, name)
    if len(os.fsencode(path)) <= _SUN_PATH_MAX:
        yield path
        return
    fd = os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{name}"
    finally:
        os.close(fd)


class Poker:
    """The enqueuer's side: wake every consumer waiting on one queue.

    The listing of the directory is kept while its mtime stays put (a stat
    per poke, not a listdir), except for a listing made within
    `_SETTLE_NS` of that mtime: the kernel stamps directories with a coarse
    clock, so a socket bound a moment later could carry the same mtime.
    """

    def __init__(self, directory: str):
        self.directory = directory
        self._sock: socket.socket | None = None
        self._pid = 0
        self._lock = threading.Lock()
        self._mtime = -1
        self._targets: list[tuple[str, str]] = []  # (name, address)
        self._dir_fd = -1

    def _sender(self) -> socket.socket:
        if self._sock is None or self._pid != os.getpid():
            # Non-blocking: a consumer whose buffer is full already has
            # pokes to read, and an enqueuer must never wait on it.
            self._sock = socket.socket(
                socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK
            )
            self._pid = os.getpid()
        return self._sock

    def _refresh(self, mtime: int) -> None:
        names = os.listdir(self.directory)
        if self._dir_fd >= 0:
            os.close(self._dir_fd)
            self._dir_fd = -1
        targets = []
        for name in names:
            path = os.path.join(self.directory, name)
            if len(os.fsencode(path)) > _SUN_PATH_MAX:
                if self._dir_fd < 0:
                    self._dir_fd = os.open(
                        self.directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
                    )
                path = f"/proc/self/fd/{self._dir_fd}/{name}"
            targets.append((name, path))
        self._targets = targets
        settled = time.time_ns() - mtime > _SETTLE_NS
        self._mtime = mtime if settled else -1

    def poke(self) -> int:
        """Send a byte to each waiting socket; how many were reached."""
        with self._lock:
            try:
                mtime = os.stat(self.directory).st_mtime_ns
                if mtime != self._mtime:
                    self._refresh(mtime)
            except OSError:  # no consumer ever waited here
                return 0
            sender = self._sender()
            reached = 0
            for name, address in self._targets:
                try:
                    sender.sendto(b"!", address)
                    reached += 1
                except BlockingIOError:
                    reached += 1  # a full buffer of unread pokes: it will look
                except ConnectionRefusedError:
                    # Nobody bound: a consumer that died without cleaning up.
                    with contextlib.suppress(OSError):
                        os.unlink(os.path.join(self.directory, name))
                except OSError:
                    pass  # gone meanwhile, or not ours to write: the poll remains
            return reached


class Waiter:
    """One consumer thread's socket: drain, then wait for a poke or a timeout."""

    def __init__(self, directory: str):
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self.directory = directory
        self.pid = os.getpid()
        self.name = f"{self.pid}.{next(_names)}"
        self.path = os.path.join(directory, self.name)
        self._sock = socket.socket(
            socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK
        )
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # a dead process with our pid left it
        with _address(directory, self.name) as address:
            self._sock.bind(address)
        self._inode = os.stat(self.path).st_ino
        # poll, not select: select refuses descriptors above 1023.
        self._poll = select.poll()
        self._poll.register(self._sock.fileno(), select.POLLIN)
        with _live_lock:
            _live.add(self)

    def drain(self) -> None:
        """Forget the pokes received so far (the caller looks at the queue next)."""
        while True:
            try:
                self._sock.recv(64)
            except (BlockingIOError, OSError):
                return

    def wait(self, timeout: float) -> bool:
        """Wait for a poke, at most `timeout` seconds; True if one came."""
        return bool(self._poll.poll(max(timeout, 0.0) * 1000))

    def bound(self) -> bool:
        """Whether pokers can still reach this socket (its file is there)."""
        try:
            return os.stat(self.path).st_ino == self._inode
        except OSError:
            return False

    def wake(self) -> None:
        """End this waiter's wait from another thread of the process."""
        with contextlib.suppress(OSError):
            with _address(self.directory, self.name) as address:
                self._sock.sendto(b"!", address)

    def close(self) -> None:
        with _live_lock:
            _live.discard(self)
        if os.getpid() == self.pid:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
        self._sock.close()


@atexit.register
def _close_all() -> None:
    """Remove this process's sockets (a SIGKILL leaves them: a poker then
    finds nobody bound and removes them)."""
    with _live_lock:
        waiters = list(_live)
    for waiter in waiters:
        waiter.close()
