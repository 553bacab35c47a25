"""A small keep-alive HTTP client: one persistent http.client connection per thread.

Why not ``requests``: the send pipeline measured ~1 ms of CPU per send with it,
and 2-3x less with a plain per-thread ``http.client`` connection.

Resend rules (a send must never reach the provider twice because of us):

- An idle kept-alive connection that the server has closed is noticed before
  the request is written (the socket polls readable) and replaced silently.
- If writing the request fails on a reused connection, the server cannot have
  received the whole request, so it is written once more on a new connection.
- A failure before the request is written whole (connect, write) is a
  RetryableError: the provider cannot have taken it.
- Once the request is written, any failure is an UnconfirmedError (a
  RetryableError): the provider may have taken it, so a send is not repeated
  on this alone. Only GETs are repeated once when a reused connection drops
  without an answer.

One deadline covers the whole call: connecting, writing the request and
reading every byte of the answer take at most `read_timeout` (or `timeout`)
together, so an answer trickling in byte by byte cannot outlive the send's
lease. Each socket operation gets the time that is left, not a fresh timeout.

Proxies come from the environment, as curl and requests read them:
HTTPS_PROXY for https:// origins (a CONNECT tunnel; TLS stays end to end),
HTTP_PROXY for http:// ones (absolute-form requests), ALL_PROXY for both,
NO_PROXY for the hosts that bypass them (loopback always does); lower-case
names too. Only http:// proxies are supported; `user:password@` in the
proxy URL is sent as Proxy-Authorization. They are read once, when the
client is made.
"""

from __future__ import annotations

import http.client
import io
import json
import select
import socket
import ssl
import threading
import time
import urllib.parse
import urllib.request
from base64 import b64encode
from collections.abc import Callable
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from daemon.config_senders import is_loopback
from daemon.errors import ConfigError
from daemon.providers.base import RetryableError
from daemon.providers.base import UnconfirmedError

_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS"})


@dataclass(frozen=True)
class Response:
    status: int
    headers: dict[str, str]  # lower-cased names
    body: bytes

    def json(self) -> Any:
        """The body as JSON, or None when it is empty or not JSON."""
        if not self.body:
            return None
        try:
            return json.loads(self.body)
        except ValueError:
            return None


class HttpClient:
    """Thread-safe client of one origin; each thread keeps its own connection."""

    def __init__(
        self,
        base_url: str,
        *,
        connect_timeout: float,
        read_timeout: float,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        parts = urllib.parse.urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port or (443 if self._https else 80)
        self._prefix = parts.path.rstrip("/")
        self._query = parts.query
        self.origin = f"{parts.scheme}://{parts.netloc}"
        self._proxy = _proxy_for(parts.scheme, self._host)
        # Through an HTTP proxy a plain-http request names its origin; a
        # tunnelled https one does not (the proxy only sees CONNECT).
        self._absolute = self._proxy is not None and not self._https
        self._via = f" through the proxy {self._proxy.address}" if self._proxy else ""
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._headers = dict(headers or {})
        self._ssl = ssl.create_default_context() if self._https else None
        self._local = threading.local()
        # Each thread's connection, so close() reaches other threads' sockets
        # and a finished thread's socket is closed, not left to the GC.
        self._conns: list[tuple[threading.Thread, http.client.HTTPConnection]] = []
        self._lock = threading.Lock()

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        *,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
        on_write: Callable[[], None] | None = None,
    ) -> Response:
        """Send one request and read the whole answer; raise RetryableError on I/O.

        `on_write()` is called once the connection is up (TCP, TLS, a proxy's
        CONNECT) and the request is built and checked, right before each
        write of its first bytes: from then on it may reach the server. A
        send noted there as possibly on the wire includes neither a handshake
        nor the building of the request, which cannot have sent anything.
        """
        target, all_headers = self._target(path, headers)
        read_timeout = self._read_timeout if timeout is None else timeout
        deadline = time.monotonic() + read_timeout
        conn, reused = self._thread_connection()
        while True:
            if conn.sock is None:
                self._connect(conn, deadline)
            try:
                conn.sock.settimeout(_remaining(deadline))
                conn.prepare_send(on_write, body_follows=bool(body))
                conn.request(method, target, body, all_headers)
            except TimeoutError as exc:
                conn.close()
                raise RetryableError(
                    f"timed out after {read_timeout:g} s sending to {self.origin}"
                ) from exc
            except OSError as exc:
                conn.close()
                if reused:
                    # The request did not get out whole: safe to write again.
                    reused = False
                    continue
                raise RetryableError(f"sending to {self.origin} failed: {exc}") from exc
            except BaseException:
                # A request refused while being built (a bad header) leaves
                # the connection "Request-started": every later request of
                # this thread would fail on it with CannotSendRequest.
                conn.close()
                raise
            try:
                conn.response_class = _deadline_response(deadline)
                resp = conn.getresponse()
                data = resp.read()
            except TimeoutError as exc:
                conn.close()
                raise UnconfirmedError(
                    f"no response from {self.origin} within {read_timeout:g} s"
                ) from exc
            except (http.client.HTTPException, OSError) as exc:
                conn.close()
                if reused and method in _IDEMPOTENT:
                    reused = False
                    continue
                raise UnconfirmedError(
                    f"connection to {self.origin} lost after the request was sent:"
                    f" {exc!r}"
                ) from exc
            if resp.will_close:
                conn.close()
            names = {k.lower(): v for k, v in resp.getheaders()}
            return Response(resp.status, names, data)

    def _target(
        self, path: str, headers: Mapping[str, str] | None
    ) -> tuple[str, Mapping[str, str]]:
        """The request target and headers (absolute, with the proxy's
        headers, through a plain HTTP proxy)."""
        target = (self._prefix + path) or "/"
        if self._query:
            target += ("&" if "?" in path else "?") + self._query
        all_headers = {**self._headers, **headers} if headers else self._headers
        if self._absolute:
            target = self.origin + target
            all_headers = {**all_headers, **self._proxy.headers}
        return target, all_headers

    def _thread_connection(self) -> tuple[_Connection | _TlsConnection, bool]:
        """This thread's connection, and whether it is an open one reused."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            return self._new_connection(), False
        if conn.sock is None:
            return conn, False
        if _peer_closed(conn.sock):
            # Server closed the idle connection: nothing sent yet, reconnect.
            conn.close()
            return conn, False
        return conn, True

    def close(self) -> None:
        """Close every thread's connection; later requests reconnect."""
        with self._lock:
            conns = [conn for _, conn in self._conns]
            self._conns = [(t, c) for t, c in self._conns if t.is_alive()]
        for conn in conns:
            conn.close()

    def _new_connection(self) -> _Connection | _TlsConnection:
        conn: _Connection | _TlsConnection
        host, port = self._host, self._port
        if self._proxy:
            host, port = self._proxy.host, self._proxy.port
        if self._https:
            conn = _TlsConnection(
                host, port, timeout=self._connect_timeout, context=self._ssl
            )
            if self._proxy:
                # connect() sends CONNECT, then TLS with the origin's name.
                conn.set_tunnel(self._host, self._port, self._proxy.headers)
        else:
            conn = _Connection(host, port, timeout=self._connect_timeout)
        self._local.conn = conn
        with self._lock:
            for thread, old in self._conns:
                if not thread.is_alive():
                    old.close()
            live = [(t, c) for t, c in self._conns if t.is_alive()]
            self._conns = [*live, (threading.current_thread(), conn)]
        return conn

    def _connect(self, conn: http.client.HTTPConnection, deadline: float) -> None:
        # The connection timeout covers TCP (and TLS) setup, within the
        # call's deadline.
        conn.timeout = min(self._connect_timeout, max(deadline - time.monotonic(), 0))
        try:
            if conn.timeout <= 0:
                raise TimeoutError("the call's deadline passed before connecting")
            conn.connect()
        except OSError as exc:
            conn.close()
            raise RetryableError(
                f"cannot connect to {self.origin}{self._via}: {exc}"
            ) from exc


class _WholeRequestAfterNote:
    """Writes a request whole, in one `sendall`, and calls `before_send`
    (then forgets it) right before.

    http.client sends the head and the body in two writes: a worker killed
    between them (the second waits for the GIL, which the process's other
    sending thread may hold) leaves the provider half a request, which it
    drops, while the send is noted as possibly on the wire: that row is
    re-sent only after the confirm window. So the head is held until the
    body comes (`prepare_send(..., body_follows=True)`). By the time of the
    write http.client has built the request and checked its headers (a bad
    header raises before this). A proxy's CONNECT, sent while connecting,
    goes out at once.
    """

    before_send: Callable[[], None] | None = None
    body_follows = False
    _head: bytes | None = None

    def prepare_send(
        self, before_send: Callable[[], None] | None, body_follows: bool
    ) -> None:
        self.before_send = before_send
        self.body_follows = body_follows
        self._head = None

    def connect(self) -> None:
        self.prepare_send(None, False)
        super().connect()

    def send(self, data) -> None:
        if self.body_follows and self._head is None:
            self._head = bytes(data)
            return
        if self._head is not None:
            data, self._head, self.body_follows = self._head + bytes(data), None, False
        hook, self.before_send = self.before_send, None
        if hook is not None:
            hook()
        super().send(data)


class _Connection(_WholeRequestAfterNote, http.client.HTTPConnection):
    pass


class _TlsConnection(_WholeRequestAfterNote, http.client.HTTPSConnection):
    pass


@dataclass(frozen=True)
class _Proxy:
    host: str
    port: int
    headers: dict[str, str]  # Proxy-Authorization, when the URL has a user

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def _proxy_for(scheme: str, host: str) -> _Proxy | None:
    """The proxy the environment gives for `scheme`://`host`, if any."""
    proxies = urllib.request.getproxies_environment()
    name = scheme if proxies.get(scheme) else "all"
    url = proxies.get(name)
    # A proxy cannot reach our loopback (Go's net/http decides the same):
    # the local fake provider keeps working on a machine with a proxy set.
    if not url or is_loopback(host):
        return None
    if urllib.request.proxy_bypass_environment(host, proxies):
        return None
    parts = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme != "http" or not parts.hostname:
        # Never echo the URL: it may hold the proxy's password.
        raise ConfigError(
            f"{name.upper()}_PROXY: must be an http://host:port proxy URL"
            " (https:// and socks proxies are not supported)"
        )
    headers = {}
    if parts.username is not None:
        user = urllib.parse.unquote(parts.username)
        password = urllib.parse.unquote(parts.password or "")
        token = b64encode(f"{user}:{password}".encode()).decode()
        headers["Proxy-Authorization"] = f"Basic {token}"
    return _Proxy(parts.hostname, parts.port or 80, headers)


def _remaining(deadline: float) -> float:
    """Seconds left before `deadline`; TimeoutError once it has passed."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("deadline passed")
    return left


class _DeadlineReader(io.RawIOBase):
    """Reads a socket, each read limited to the time left before the deadline."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        super().__init__()
        self._sock = sock
        self._deadline = deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        self._sock.settimeout(_remaining(self._deadline))
        return self._sock.recv_into(buffer)


class _DeadlineSocket:
    """What http.client.HTTPResponse needs of a socket: makefile("rb")."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self._sock = sock
        self._deadline = deadline

    def makefile(self, mode: str, *args, **kwargs) -> io.BufferedReader:
        return io.BufferedReader(_DeadlineReader(self._sock, self._deadline))


def _deadline_response(deadline: float):
    """An HTTPConnection.response_class reading the answer before `deadline`."""

    def build(sock, *args, **kwargs) -> http.client.HTTPResponse:
        return http.client.HTTPResponse(
            _DeadlineSocket(sock, deadline), *args, **kwargs
        )

    return build


def _peer_closed(sock: socket.socket) -> bool:
    """True when an idle kept-alive socket is readable: EOF, reset or junk."""
    try:
        if hasattr(select, "poll"):
            poller = select.poll()
            poller.register(sock, select.POLLIN | select.POLLERR | select.POLLHUP)
            return bool(poller.poll(0))
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable)
    except (OSError, ValueError):
        return True
