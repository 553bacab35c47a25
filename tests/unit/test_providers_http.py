"""The keep-alive client's resend rules, against a scripted loopback server.

Each accepted connection gets an index; ``script(conn, n, method)`` says what
to do with the n-th request of that connection: "answer", "answer-close"
(answer, then close the idle connection), "drop" (read it, close, no answer),
or a number of seconds to wait before answering.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable

import pytest

from daemon.providers.base import RetryableError
from daemon.providers.http import HttpClient
from daemon.providers.http import _Connection
from tests.helpers import free_port
from tests.helpers import wait_for

pytestmark = pytest.mark.timeout(30)

Script = Callable[[int, int, str], "str | float"]


class ScriptedServer:
    def __init__(self, script: Script) -> None:
        self.script = script
        self.requests: list[tuple[int, str, bytes]] = []  # (conn, method, body)
        self.targets: list[str] = []
        self.connections = 0
        self.closed = 0  # connections the server has closed
        self._lock = threading.Lock()
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._stop.set()
        self._sock.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with self._lock:
                index = self.connections
                self.connections += 1
            threading.Thread(
                target=self._serve, args=(conn, index), daemon=True
            ).start()

    def _serve(self, conn: socket.socket, index: int) -> None:
        try:
            self._talk(conn, index)
        finally:
            conn.close()
            with self._lock:
                self.closed += 1

    def _talk(self, conn: socket.socket, index: int) -> None:
        buf = b""
        n = 0
        while True:
            while b"\r\n\r\n" not in buf:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                buf += chunk
            head, _, buf = buf.partition(b"\r\n\r\n")
            lines = head.decode().split("\r\n")
            method, target, _ = lines[0].split(" ")
            length = 0
            for line in lines[1:]:
                name, _, value = line.partition(":")
                if name.lower() == "content-length":
                    length = int(value)
            while len(buf) < length:
                buf += conn.recv(65536)
            body, buf = buf[:length], buf[length:]
            with self._lock:
                self.requests.append((index, method, body))
                self.targets.append(target)
            action = self.script(index, n, method)
            n += 1
            if action == "drop":
                return
            if isinstance(action, float):
                if self._stop.wait(action):
                    return
            conn.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b'Content-Length: 11\r\n\r\n{"ok":true}'
            )
            if action == "answer-close":
                return


@pytest.fixture
def serve():
    servers: list[ScriptedServer] = []

    def start(script: Script) -> ScriptedServer:
        server = ScriptedServer(script)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


@pytest.fixture
def make_client():
    clients: list[HttpClient] = []

    def build(url: str, **kw) -> HttpClient:
        kw.setdefault("connect_timeout", 2.0)
        kw.setdefault("read_timeout", 5.0)
        clients.append(HttpClient(url, **kw))
        return clients[-1]

    yield build
    for client in clients:
        client.close()


def test_idle_connection_closed_by_server_is_replaced_before_sending(
    serve, make_client
):
    server = serve(lambda conn, n, method: "answer-close")
    client = make_client(server.url)
    assert client.request("POST", "/v1/messages", b"{}").status == 200
    # Wait until the server has closed, as after an idle period.
    wait_for(lambda: server.closed == 1)
    assert client.request("POST", "/v1/messages", b"{}").status == 200
    assert server.connections == 2
    assert [m for _, m, _ in server.requests] == ["POST", "POST"]


def test_post_dropped_after_sending_is_not_resent(serve, make_client):
    server = serve(lambda conn, n, method: "answer" if n == 0 else "drop")
    client = make_client(server.url)
    client.request("POST", "/x", b'{"n":1}')
    with pytest.raises(RetryableError, match="after the request was sent"):
        client.request("POST", "/x", b'{"n":2}')
    # Exactly one copy of the second POST reached the server.
    assert [b for _, _, b in server.requests] == [b'{"n":1}', b'{"n":2}']
    # The next call reconnects.
    assert client.request("POST", "/x", b'{"n":3}').status == 200
    assert server.connections == 2


def test_get_dropped_on_a_reused_connection_is_tried_once_more(serve, make_client):
    server = serve(lambda conn, n, method: "drop" if (conn, n) == (0, 1) else "answer")
    client = make_client(server.url)
    client.request("GET", "/v1/devices")
    assert client.request("GET", "/v1/devices").status == 200
    assert [(c, m) for c, m, _ in server.requests] == [
        (0, "GET"),
        (0, "GET"),
        (1, "GET"),
    ]


def test_get_dropped_on_a_fresh_connection_is_not_retried(serve, make_client):
    server = serve(lambda conn, n, method: "drop")
    client = make_client(server.url)
    with pytest.raises(RetryableError):
        client.request("GET", "/v1/devices")
    assert len(server.requests) == 1


def test_read_timeout_and_per_request_timeout(serve, make_client):
    server = serve(lambda conn, n, method: 0.4)
    client = make_client(server.url, read_timeout=0.1)
    with pytest.raises(RetryableError, match="within 0.1 s"):
        client.request("POST", "/x", b"{}")
    assert client.request("GET", "/slow", timeout=5.0).status == 200
    assert len(server.requests) == 2


def test_connection_refused(make_client):
    client = make_client(f"http://127.0.0.1:{free_port()}")
    with pytest.raises(RetryableError, match="cannot connect"):
        client.request("POST", "/x", b"{}")


def test_on_write_comes_after_the_connect_and_before_the_request_leaves(
    serve, make_client
):
    """What the sender notes as possibly on the wire (runtime.InFlight) starts
    here: a refused connect never calls it, and the server never sees a
    request before it was called."""
    calls: list[int] = []
    seen_at_server: list[int] = []

    def script(conn: int, n: int, method: str) -> str:
        seen_at_server.append(len(calls))
        return "answer-close"

    refused = make_client(f"http://127.0.0.1:{free_port()}")
    with pytest.raises(RetryableError, match="cannot connect"):
        refused.request("POST", "/x", b"{}", on_write=lambda: calls.append(1))
    assert calls == []

    server = serve(script)
    client = make_client(server.url)
    assert client.request("POST", "/x", b"{}", on_write=lambda: calls.append(1))
    assert (calls, seen_at_server) == ([1], [1])
    # The server closed the idle connection: reconnected first, noted once.
    wait_for(lambda: server.closed == 1)
    assert client.request("POST", "/x", b"{}", on_write=lambda: calls.append(1))
    assert (calls, seen_at_server) == ([1, 1], [1, 2])
    assert server.connections == 2


def test_on_write_waits_until_the_request_is_built_and_checked(serve, make_client):
    """A request http.client refuses to build (a header that would split
    the request) never reaches the server, so it is not noted as possibly
    on the wire: the note comes right before the first bytes leave. And the
    thread's connection still serves the next request."""
    calls: list[int] = []
    server = serve(lambda conn, n, method: "answer")
    client = make_client(server.url)
    with pytest.raises(ValueError, match="Invalid header value"):
        client.request(
            "POST",
            "/x",
            b"{}",
            headers={"X-Reference": "a\r\nX-Injected: 1"},
            on_write=lambda: calls.append(1),
        )
    assert calls == []
    assert server.requests == []
    assert client.request("POST", "/x", b"{}", on_write=lambda: calls.append(1))
    assert calls == [1]


class _CountingSocket(socket.socket):
    """A real socket that remembers its writes (and what was noted before)."""

    def sendall(self, data, *args):
        self.writes.append((list(self.notes), bytes(data)))
        return super().sendall(data, *args)


def test_a_request_leaves_in_one_write_right_after_its_note():
    """http.client writes a request's head and body apart: a worker killed
    between the two would leave the provider half a request (dropped) while
    the send is noted as possibly on the wire. Ours go out whole, in one
    write, with the note right before it."""
    ours, theirs = socket.socketpair()
    conn = _Connection("127.0.0.1", 9)
    conn.sock = _CountingSocket(fileno=ours.detach())
    conn.sock.writes, conn.sock.notes = [], []
    body = b'{"phone": "+33612345678", "message": "Bonjour"}'
    try:
        conn.prepare_send(lambda: conn.sock.notes.append("noted"), body_follows=True)
        conn.request("POST", "/v1/messages", body, {"Token": "t"})
        ((noted_before, data),) = conn.sock.writes
        assert noted_before == ["noted"]
        assert data.startswith(b"POST /v1/messages HTTP/1.1\r\n")
        assert data.endswith(b"\r\n\r\n" + body)
        assert theirs.recv(65536) == data
    finally:
        conn.close()
        theirs.close()


def test_one_connection_per_thread_and_close_reaches_all(serve, make_client):
    server = serve(lambda conn, n, method: "answer")
    client = make_client(server.url)
    barrier = threading.Barrier(3)

    def work() -> None:
        for _ in range(10):
            client.request("GET", "/x")
        barrier.wait()

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert server.connections == 3 and len(server.requests) == 30
    client.close()
    # A thread that lost its connection to close() reconnects once.
    client.request("GET", "/x")
    assert server.connections == 4


def test_base_path_and_query_are_kept(serve, make_client):
    server = serve(lambda conn, n, method: "answer")
    client = make_client(server.url + "/hooks/in?token=abc")
    client.request("POST", "", b"{}")
    client.request("GET", "/x?y=1")
    assert server.targets == ["/hooks/in?token=abc", "/hooks/in/x?y=1&token=abc"]


def test_rejects_non_http_urls():
    with pytest.raises(ValueError):
        HttpClient("ftp://example.org", connect_timeout=1, read_timeout=1)


class TricklingServer:
    """Answers every request with a body of `size` bytes, one byte per `every`
    seconds (or its header lines too, when `headers` is true); counts what it
    managed to send before the client hung up."""

    def __init__(self, size: int, every: float, headers: bool = False) -> None:
        self.size = size
        self.every = every
        self.headers = headers
        self.sent_body = 0
        self.done = threading.Event()  # the client hung up, or all was sent
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def close(self) -> None:
        self._sock.close()

    def _trickle(self, conn: socket.socket, data: bytes, body: bool) -> None:
        for i in range(len(data)):
            conn.sendall(data[i : i + 1])
            if body:
                self.sent_body += 1
            time.sleep(self.every)

    def _serve(self) -> None:
        conn, _ = self._sock.accept()
        try:
            conn.recv(65536)
            head = (
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                b"Content-Length: %d\r\n\r\n" % self.size
            )
            if self.headers:
                self._trickle(conn, head, body=False)
            else:
                conn.sendall(head)
            self._trickle(conn, b"x" * self.size, body=True)
        except OSError:
            pass  # the client gave up and closed the connection
        finally:
            conn.close()
            self.done.set()


@pytest.mark.parametrize("headers", [False, True], ids=["body", "headers"])
def test_one_deadline_for_the_whole_call_even_when_bytes_keep_coming(
    make_client, headers
):
    """Each byte arrives well within the timeout (0.2 s < 1 s), but the whole
    answer would take 40 s: the call gives up at its one deadline with the
    timeout error the send path retries, without reading the whole body."""
    server = TricklingServer(size=200, every=0.2, headers=headers)
    try:
        client = make_client(server.url, read_timeout=1.0)
        with pytest.raises(RetryableError, match="within 1 s"):
            client.request("POST", "/x", b"{}")
        assert server.done.wait(5), "the client kept the connection open"
        # Given up before the trickle ended (its bytes are the clock): a
        # per-read timeout would have read all of it.
        assert server.sent_body < server.size
    finally:
        server.close()


def test_connect_and_request_share_the_deadline(serve, make_client):
    """The per-call timeout bounds the connect too: with no time left the call
    fails as a timeout-class RetryableError and nothing is sent."""
    server = serve(lambda conn, n, method: "answer")
    client = make_client(server.url, connect_timeout=5.0)
    with pytest.raises(RetryableError):
        client.request("POST", "/x", b"{}", timeout=0.0)
    assert server.requests == []
