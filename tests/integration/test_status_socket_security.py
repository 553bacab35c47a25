"""The status socket against strangers and garbage (a real supervisor).

Only the owner and the socket's group may connect (mode 0660); any other uid
is refused by the kernel. Whatever a client sends (garbage, invalid UTF-8,
64 KiB without a newline, the wrong JSON shape, an unknown command, nothing
at all), it gets one JSON error line or is dropped after the client timeout,
and the supervisor keeps serving everybody else.

The supervisor runs over fixture children (tests/process/fixture_roles.py),
so only the socket and the loop are under test here.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import time

import psutil
import pytest

from daemon import status as status_mod
from daemon.supervision.status import CLIENT_TIMEOUT_S
from tests.helpers import require
from tests.helpers import wait_for
from tests.process.fixture_roles import FixtureDaemon

ROOT_ONLY = pytest.mark.usefixtures("as_root")
NOBODY = 65534
NOGROUP = 65534


@pytest.fixture
def as_root():
    # CI runs as root (.ci/run starts PostgreSQL and Redis itself), so there
    # a missing root is a broken machine: fail rather than skip.
    require(os.geteuid() == 0, "needs root to switch uid")


@pytest.fixture
def daemon(tmp_path, make_config):
    made = []

    def start(extra: dict | None = None, roles: str = "worker:default"):
        d = FixtureDaemon(tmp_path, make_config, extra=extra, roles=roles)
        made.append(d)
        # The socket's own directory is 0700 (mkdtemp); open it up so that
        # only the socket's mode decides who may connect.
        os.chmod(d.socket_path.parent, 0o711)
        return d.start()

    yield start
    for d in made:
        d.close()


def connect_as(path, uid: int, gid: int) -> int:
    """Try to connect from a forked child running as uid:gid; 0 or its errno."""
    pid = os.fork()
    if pid == 0:  # the child: no Python-level cleanup, just an exit code
        code = 1
        try:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(5)
                sock.connect(str(path))
            code = 0
        except OSError as exc:
            code = exc.errno or 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def open_client(path, timeout: float = 10.0) -> socket.socket:
    """Connect, waiting while the listen backlog is full.

    A Unix socket with a timeout is non-blocking underneath, and connect()
    then fails at once with EAGAIN when the backlog is full instead of
    waiting; status.request retries the same way.
    """
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.connect(str(path))
        except BlockingIOError:
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)
            continue
        sock.settimeout(timeout)
        return sock


def raw_exchange(path, data: bytes, shutdown: bool = True, timeout=10.0) -> bytes:
    with open_client(path, timeout) as sock:
        sock.sendall(data)
        if shutdown:
            sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def error_of(answer: bytes) -> str:
    assert answer.endswith(b"\n") and answer.count(b"\n") == 1, answer[:200]
    return json.loads(answer)["error"]


@ROOT_ONLY
@pytest.mark.timeout(60)
def test_only_owner_and_group_may_connect(daemon):
    d = daemon({"status": {"group": "nogroup"}})
    st = os.stat(d.socket_path)
    assert stat.S_IMODE(st.st_mode) == 0o660
    assert st.st_gid == NOGROUP
    # Another uid outside the group: refused by the kernel.
    assert connect_as(d.socket_path, NOBODY, 1) == 13  # EACCES
    # The same uid, now in the socket's group: let in.
    assert connect_as(d.socket_path, NOBODY, NOGROUP) == 0
    assert d.status()["daemon"]["state"] == "running"


@ROOT_ONLY
@pytest.mark.timeout(60)
def test_without_a_group_only_the_owner_may_connect(daemon):
    d = daemon()
    assert stat.S_IMODE(os.stat(d.socket_path).st_mode) == 0o660
    assert connect_as(d.socket_path, NOBODY, NOGROUP) == 13
    assert "roles" in d.status()


@pytest.mark.timeout(60)
def test_bad_requests_get_an_error_and_the_supervisor_keeps_serving(daemon):
    d = daemon()
    path = d.socket_path
    assert "bad JSON" in error_of(raw_exchange(path, b"\x00\xff garbage \xfe\n"))
    assert "bad JSON" in error_of(raw_exchange(path, b'{"cmd": "st'))
    assert "bad JSON" in error_of(raw_exchange(path, b"\xc3\x28\n"))
    for shape in (b"[]", b"42", b"null", b'"status"', b'{"cmd": 5}', b"{}"):
        assert "expected an object" in error_of(raw_exchange(path, shape + b"\n"))
    assert "unknown cmd" in error_of(raw_exchange(path, b'{"cmd": "rm -rf /"}\n'))
    assert "unknown cmd" in error_of(
        raw_exchange(path, b'{"cmd": "' + b"x" * 60000 + b'"}\n')
    )
    for role in (None, 5, ["web"], {"a": 1}, "nope"):
        answer = d.request({"cmd": "restart", "role": role})
        assert "unknown role" in answer["error"]
    # A request larger than the limit, with or without a newline at the end.
    huge = b'{"cmd": "status", "pad": "' + b"x" * 200_000 + b'"}\n'
    try:
        assert error_of(raw_exchange(path, huge)) == "request too large"
    except (ConnectionResetError, BrokenPipeError):
        # Known: the server closes with the rest of the request unread, so
        # the kernel resets the connection and the answer can be lost.
        pass
    assert error_of(raw_exchange(path, b"y" * 70_000, shutdown=False)) == (
        "request too large"
    )
    assert d.proc.poll() is None
    assert d.status()["daemon"]["state"] == "running"


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_silent_and_slow_clients_do_not_block_others(daemon):
    d = daemon()
    path = d.socket_path
    idle = []
    try:
        # Clients that connect and say nothing, or half a request.
        for i in range(40):
            sock = open_client(path)
            if i % 2:
                sock.sendall(b'{"cmd": "sta')
            idle.append(sock)
        answer = json.loads(raw_exchange(path, b'{"cmd": "status"}\n'))
        assert answer["daemon"]["state"] == "running"
        # Answered while the idle clients are still connected: the answer did
        # not wait for them to be dropped.
        idle[0].setblocking(False)
        with pytest.raises(BlockingIOError):
            idle[0].recv(100)
        # ...and they are dropped after the client timeout, without an answer.
        idle[0].settimeout(CLIENT_TIMEOUT_S + 5)
        assert idle[0].recv(100) == b""
    finally:
        for sock in idle:
            sock.close()
    assert d.proc.poll() is None


@pytest.mark.timeout(60)
def test_a_burst_of_clients_is_answered(daemon):
    d = daemon()
    socks = []
    for _ in range(100):
        sock = open_client(d.socket_path, 15)
        sock.sendall(b'{"cmd": "dance"}\n')
        socks.append(sock)
    answers = []
    for sock in socks:
        with sock:
            answers.append(sock.makefile("rb").readline())
    assert all(b"unknown cmd" in a for a in answers)
    assert d.proc.poll() is None


@pytest.mark.timeout(60)
def test_campaignd_status_client_waits_for_a_busy_socket(daemon):
    import threading

    d = daemon()
    errors = []

    def ask():
        try:
            status_mod.request(d.socket_path, {"cmd": "dance"})
        except OSError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=ask) for _ in range(60)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    if errors:
        raise errors[0]


@pytest.mark.timeout(60)
def _closed_by_server(sock) -> bool:
    sock.setblocking(False)
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def test_running_out_of_file_descriptors_does_not_kill_the_supervisor(daemon):
    """A local client holding many connections must not take the daemon down.

    The supervisor's fd limit is lowered, then more idle clients connect
    than it can accept; once they go, the daemon must still answer.
    """
    d = daemon()
    supervisor = psutil.Process(d.proc.pid)
    supervisor.rlimit(psutil.RLIMIT_NOFILE, (64, 64))
    idle = []
    try:
        for _ in range(80):
            try:
                idle.append(open_client(d.socket_path, timeout=2))
            except OSError:
                break  # backlog full and nobody accepting: the limit is hit
        # Wait until the loop has run accept() into the limit, or refused
        # the clients past its cap (or died).
        wait_for(
            lambda: (
                d.proc.poll() is not None
                or supervisor.num_fds() >= 60
                or any(_closed_by_server(sock) for sock in idle)
            ),
            timeout=10,
            what="the supervisor at its descriptor limit",
        )
    finally:
        for sock in idle:
            sock.close()
    alive = d.proc.poll() is None
    answer = (
        wait_for(d.try_status, timeout=10, what="status after EMFILE")
        if alive
        else None
    )
    assert alive, "the supervisor died when accept() ran out of descriptors"
    assert answer["daemon"]["state"] == "running"
