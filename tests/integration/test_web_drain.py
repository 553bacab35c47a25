"""The web server's graceful stop: every request it has read is answered.

A real waitress server (WebServer, the role's settings) on loopback, with a
WSGI app whose /slow route waits for the test: requests in flight and
requests read but not yet started when the drain begins get their answers;
idle keep-alive connections are closed; nothing new is taken.
"""

from __future__ import annotations

import logging
import socket
import threading

import pytest

from daemon import config as config_mod
from daemon.roles.web.app import WebServer
from tests.helpers import wait_for

pytestmark = pytest.mark.timeout(60)


class SlowApp:
    """/slow answers once `release` is set; anything else at once."""

    def __init__(self):
        self.release = threading.Event()
        self.entered = threading.Semaphore(0)

    def __call__(self, environ, start_response):
        if environ["PATH_INFO"] == "/slow":
            self.entered.release()
            self.release.wait(30)
        body = environ["PATH_INFO"].encode()
        start_response(
            "200 OK",
            [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))],
        )
        return [body]


def serve(tmp_path, app, threads=4):
    cfg = config_mod.from_dict(
        {"daemon": {"data_dir": str(tmp_path)}, "web": {"threads": threads}}
    )
    server = WebServer(app, cfg, host="127.0.0.1", port=0)
    return server, server.serve_in_thread()


def connect(server) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=20)
    return sock


def send_get(sock, path: str, version: str = "1.1") -> None:
    keep_alive = "Connection: keep-alive\r\n" if version == "1.0" else ""
    sock.sendall(f"GET {path} HTTP/{version}\r\nHost: x\r\n{keep_alive}\r\n".encode())


def read_answer(sock) -> bytes:
    """One whole answer (the test's bodies are the path, with a length)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(
        next(
            line.split(b":")[1]
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
    )
    while len(body) < length:
        chunk = sock.recv(4096)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


def closed_by_server(sock) -> bool:
    sock.settimeout(0.05)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except ConnectionError:
        return True


def test_a_drain_answers_what_it_read_and_takes_nothing_new(tmp_path):
    app = SlowApp()
    # One request thread: the second /slow is read and queued, not started.
    server, loop = serve(tmp_path, app, threads=1)
    idle = connect(server)
    send_get(idle, "/fast")
    assert read_answer(idle).endswith(b"/fast")
    in_flight, queued = connect(server), connect(server)
    send_get(in_flight, "/slow")
    assert app.entered.acquire(timeout=20)
    # An HTTP/1.0 keep-alive client is told to close as well.
    send_get(queued, "/slow", version="1.0")
    wait_for(
        lambda: server.server.task_dispatcher.queue,
        timeout=20,
        what="the second request read and queued",
    )

    server.drain(30)

    # The idle keep-alive connection is closed, and no new one is taken.
    wait_for(lambda: closed_by_server(idle), timeout=20, what="idle connection closed")
    wait_for(lambda: _refused(server.port), timeout=20, what="the listener closed")
    assert loop.is_alive(), "serve() returned with requests still in flight"

    app.release.set()
    for sock in (in_flight, queued):
        sock.settimeout(20)
        answer = read_answer(sock)
        assert answer.split(b" ", 1)[1].startswith(b"200 OK"), answer
        head = answer.partition(b"\r\n\r\n")[0].lower()
        assert [x for x in head.split(b"\r\n") if x.startswith(b"connection:")] == [
            b"connection: close"
        ], answer
        assert answer.endswith(b"/slow")
        wait_for(lambda s=sock: closed_by_server(s), timeout=20, what="closed after")
    loop.join(timeout=20)
    assert not loop.is_alive(), "serve() did not return once drained"


def test_a_drain_ends_at_its_deadline_whatever_is_stuck(tmp_path, caplog):
    app = SlowApp()
    server, loop = serve(tmp_path, app)
    stuck = connect(server)
    send_get(stuck, "/slow")
    assert app.entered.acquire(timeout=20)
    try:
        with caplog.at_level(logging.WARNING, logger="daemon.roles.web.server"):
            server.drain(0.3)
            loop.join(timeout=20)
            assert not loop.is_alive(), "serve() outlived the drain's deadline"
        assert "still in flight after the drain's time" in caplog.text
        # The stuck request's connection was cut, not answered.
        stuck.settimeout(20)
        assert stuck.recv(4096) == b""
    finally:
        app.release.set()


def test_without_a_drain_the_server_answers_keep_alive_as_before(tmp_path):
    server, loop = serve(tmp_path, SlowApp())
    sock = connect(server)
    for _ in range(3):
        send_get(sock, "/again")
        answer = read_answer(sock)
        assert answer.endswith(b"/again")
        assert b"Connection: close" not in answer
    server.stop()
    loop.join(timeout=20)
    assert not loop.is_alive()


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except OSError:
        return True
    return False
