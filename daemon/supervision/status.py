"""The status socket: one JSON request, one JSON answer, per connection.

Wire format (a Unix stream socket, mode 0660, at cfg.status_socket)::

    client                                   supervisor
      connect ─────────────────────────────────>
      {"cmd": "status"}\\n  (or shut down the write side) ──>
      <────────── {"daemon": {...}, "roles": [...], ...}\\n
      <────────── close

Commands: ``status`` (``"figures": false`` skips queue depths and counters
and is answered at once); ``restart`` with ``"role": "web"`` (a base name such as
``worker:messages`` restarts every instance); ``reload`` (same as SIGHUP).
Anything else, or bad JSON, answers ``{"error": "..."}``. The server side runs
inside the supervisor's selector loop, non-blocking and without threads; an
answer may be deferred (the supervisor parks a status request for at most a
second while fresh queue depths are gathered off the loop).
"""

from __future__ import annotations

import fcntl
import grp
import json
import logging
import os
import resource
import selectors
import shutil
import socket
import time
from pathlib import Path

from daemon.errors import ConfigError
from daemon.errors import DaemonError

MAX_REQUEST_BYTES = 65_536
# A client that neither sends its request nor reads its answer in this time
# is dropped, so it cannot hold a file descriptor forever.
CLIENT_TIMEOUT_S = 5.0
# Clients served at once (at most a quarter of the descriptor limit); more
# are refused at once.
MAX_CLIENTS = 64
# How long the listener rests after accept() fails (e.g. out of descriptors).
ACCEPT_PAUSE_S = 1.0
# In the data dir, locked by the running supervisor (hold_data_dir).
LOCK_FILE = "campaignd.lock"
# sockaddr_un.sun_path is 108 bytes including the final NUL.
MAX_SOCKET_PATH = 107

log = logging.getLogger(__name__)


def _max_clients() -> int:
    soft_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return max(4, min(MAX_CLIENTS, soft_limit // 4))


class AlreadyRunning(DaemonError):
    """Another supervisor holds this data dir or answers on the status socket."""


def hold_data_dir(data_path) -> int:
    """Lock ``<data_dir>/campaignd.lock`` for this supervisor's life; its fd.

    Taken before anything else at start: a second `campaignd run` on the
    same data dir must not release the leases of "dead" workers (the first
    daemon's, reaped a moment ago) before it finds out it is not alone. The
    status socket cannot tell that early: it is bound after the database
    opens. flock is dropped by the kernel when the process dies, however it
    dies; the fd is close-on-exec, so no child holds it.
    """
    path = Path(data_path) / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise AlreadyRunning(
            f"another campaignd (pid {holder}) runs on the data dir {path.parent}"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


class Connection:
    """One client: its request bytes in, its answer bytes out."""

    def __init__(self, sock: socket.socket, deadline: float):
        self.sock = sock
        self.deadline = deadline
        self.inbuf = bytearray()
        self.outbuf = b""
        self.answered = False


class StatusServer:
    """Accepts, reads and answers clients from the caller's selector."""

    def __init__(self, path: Path, group: str, on_request):
        self.path = Path(path)
        # on_request(request: dict, conn: Connection): answer with respond(),
        # now or later.
        self.on_request = on_request
        self.sock = bind(self.path, group)
        self.selector: selectors.BaseSelector | None = None
        self.conns: set[Connection] = set()
        self._paused_until: float | None = None

    def register(self, selector: selectors.BaseSelector) -> None:
        self.selector = selector
        selector.register(self.sock, selectors.EVENT_READ, self._accept)

    def _accept(self, _mask: int) -> None:
        for _ in range(32):  # a burst of clients must not starve the loop
            try:
                sock, _addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # Out of file descriptors (EMFILE/ENFILE) or the like: the
                # listener would stay readable and spin the loop, so it rests
                # for a moment; the supervisor itself carries on.
                log.warning("status socket: cannot accept (%s); pausing 1 s", exc)
                self.selector.unregister(self.sock)
                self._paused_until = time.monotonic() + ACCEPT_PAUSE_S
                return
            if len(self.conns) >= _max_clients():
                # Idle clients must not use up the supervisor's descriptors
                # (it needs them for heartbeats and children).
                log.warning("status socket: %d clients open; refusing", len(self.conns))
                sock.close()
                continue
            sock.setblocking(False)
            conn = Connection(sock, time.monotonic() + CLIENT_TIMEOUT_S)
            self.conns.add(conn)
            self.selector.register(
                sock, selectors.EVENT_READ, lambda mask, c=conn: self._read(c)
            )

    def _read(self, conn: Connection) -> None:
        try:
            data = conn.sock.recv(MAX_REQUEST_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)
            return
        conn.inbuf += data
        complete = not data or b"\n" in conn.inbuf
        if len(conn.inbuf) > MAX_REQUEST_BYTES:
            self.selector.unregister(conn.sock)
            self.respond(conn, {"error": "request too large"})
            return
        if not complete:
            return
        self.selector.unregister(conn.sock)
        line = bytes(conn.inbuf).split(b"\n", 1)[0].strip()
        try:
            request = json.loads(line)
        except ValueError as exc:
            self.respond(conn, {"error": f"bad JSON: {exc}"})
            return
        if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
            self.respond(conn, {"error": 'expected an object like {"cmd": "status"}'})
            return
        self.on_request(request, conn)

    def respond(self, conn: Connection, answer: dict) -> None:
        """Send the answer (what does not fit now goes out on EVENT_WRITE)."""
        if conn.answered or conn not in self.conns:
            return
        conn.answered = True
        conn.outbuf = json.dumps(answer, default=str).encode() + b"\n"
        conn.deadline = time.monotonic() + CLIENT_TIMEOUT_S
        self._write(conn)

    def _write(self, conn: Connection) -> None:
        try:
            sent = conn.sock.send(conn.outbuf)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._close(conn)
            return
        conn.outbuf = conn.outbuf[sent:]
        if not conn.outbuf:
            self._close(conn)
            return
        try:
            self.selector.register(
                conn.sock, selectors.EVENT_WRITE, lambda mask, c=conn: self._write(c)
            )
        except KeyError:  # registered for writing already
            pass

    def _close(self, conn: Connection) -> None:
        self.conns.discard(conn)
        try:
            self.selector.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()

    def expire(self, now: float) -> None:
        """Drop clients past their deadline; resume accepting after a pause."""
        for conn in [c for c in self.conns if c.deadline <= now]:
            log.debug("status client timed out")
            self._close(conn)
        if self._paused_until is not None and now >= self._paused_until:
            self._paused_until = None
            self.selector.register(self.sock, selectors.EVENT_READ, self._accept)

    def next_deadline(self) -> float | None:
        deadlines = [c.deadline for c in self.conns]
        if self._paused_until is not None:
            deadlines.append(self._paused_until)
        return min(deadlines, default=None)

    def close(self) -> None:
        for conn in list(self.conns):
            self._close(conn)
        if self.selector is not None:
            try:
                self.selector.unregister(self.sock)
            except (KeyError, ValueError):
                pass
        self.sock.close()
        self.path.unlink(missing_ok=True)


def bind(path: Path, group: str = "") -> socket.socket:
    """Bind the listening socket (0660), refusing if a daemon already answers."""
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise ConfigError(
            f"status.socket: path longer than {MAX_SOCKET_PATH} bytes: {path}"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() or path.is_symlink():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.settimeout(1.0)
            probe.connect(str(path))
        except OSError:
            path.unlink()  # stale: left by a daemon that was killed
        else:
            raise AlreadyRunning(f"another campaignd answers on {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # The umask makes the socket 0660 from birth: no window where others
    # could connect (we are still single-threaded here).
    old_umask = os.umask(0o117)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old_umask)
    if group:
        try:
            # Under systemd the socket is born in the unit's Group= already,
            # and its system call filter (~@privileged) forbids chown: only
            # change what differs.
            if grp.getgrnam(group).gr_gid != path.stat().st_gid:
                shutil.chown(path, group=group)
        except (LookupError, PermissionError) as exc:
            sock.close()
            path.unlink(missing_ok=True)
            raise ConfigError(
                f"status.group: cannot use group {group!r}: {exc}"
            ) from None
    sock.listen(16)
    sock.setblocking(False)
    return sock


# ------------------------------------------------------------------- figures


class FigureGatherer:
    """Queue depths and counters for the status socket (runs in a pool thread)."""

    def __init__(self, cfg):
        self.cfg = cfg
        self._queues = None

    def gather(self) -> dict:
        figures: dict = {}
        try:
            if self._queues is None:
                from daemon.store.queue import make_queues

                self._queues = make_queues(self.cfg)
            figures["queues"] = self._queues.depths()
        except Exception as exc:  # noqa: BLE001 - shown to the operator
            figures["queues_error"] = f"{type(exc).__name__}: {exc}"
        try:
            figures.update(_db_figures())
        except Exception as exc:  # noqa: BLE001
            figures["db_error"] = f"{type(exc).__name__}: {exc}"
        figures.update(_leader_figures(self.cfg))
        return figures


def _leader_figures(cfg) -> dict:
    """The cluster's scheduler leader (Redis key or lease row) and our role."""
    from daemon.roles import leader

    figures: dict = {}
    try:
        figures["leader"] = leader.current_holder(cfg)
    except Exception as exc:  # noqa: BLE001 - shown to the operator
        figures["leader_error"] = f"{type(exc).__name__}: {exc}"
    state = leader.read_state(
        leader.state_path(cfg), max_age_s=2 * cfg.scheduler.leader_lease_s
    )
    figures["this_host_leads"] = bool(state and state.get("leader"))
    return figures


def _db_figures() -> dict:
    import peewee as pw

    from daemon.domain.alerts import active_alerts
    from daemon.domain.alerts import db_session
    from daemon.domain.events import dead_count
    from daemon.domain.monitoring import last_health_check
    from daemon.store.models import Campaign
    from daemon.store.models import Message

    with db_session():
        campaigns = dict(
            Campaign.select(Campaign.status, pw.fn.COUNT(Campaign.id))
            .group_by(Campaign.status)
            .tuples()
        )
        messages = dict(
            Message.select(Message.status, pw.fn.COUNT(Message.id))
            .group_by(Message.status)
            .tuples()
        )
        check = last_health_check()
        active = active_alerts()
        dead_letters = dead_count()
    return {
        "campaigns": campaigns,
        "messages": messages,
        "dead_letters": dead_letters,
        "last_health_check": check,
        "alerts": active,
    }
