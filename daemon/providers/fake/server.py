"""The fake's HTTP/1.1 server (an asyncio.Protocol) and FakeProvider, which
runs it in a background thread."""

from __future__ import annotations

import asyncio
import signal
import socket
import threading
from collections import deque
from typing import Any

from daemon.providers.fake.core import _Core
from daemon.providers.fake.core import _error_reply
from daemon.providers.fake.core import _Reply
from daemon.providers.fake.options import FakeOptions

_MAX_HEAD = 64 * 1024
_MAX_BODY = 4 * 1024 * 1024
_REASONS = {
    200: "OK",
    201: "Created",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Payload Too Large",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    503: "Service Unavailable",
}


class _HttpProtocol(asyncio.Protocol):
    """HTTP/1.1 with keep-alive and pipelining; answers strictly in order.

    A request is handled (a send accepted) as soon as it is received whole;
    its answer waits in ``_answers`` for its turn and its latency, each answer
    ``delay`` after the previous one was written. A client gone by then
    misses the answer, not the send.
    """

    def __init__(self, core: _Core, loop: asyncio.AbstractEventLoop) -> None:
        self._core = core
        self._loop = loop
        self._buf = bytearray()
        self._transport: asyncio.Transport | None = None  # None once closing
        self._registered: asyncio.BaseTransport | None = None
        self._busy = False  # an answer is waiting for its latency
        self._done = False  # a last request (Connection: close, bad) was read
        self._answers: deque[tuple[bytes, bool, float]] = deque()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = self._registered = transport
        self._core.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._registered is not None:
            self._core.connection_lost(self._registered)
        self._transport = self._registered = None

    def data_received(self, data: bytes) -> None:
        if self._done:
            return  # nothing after a last request is read
        self._buf += data
        self._parse()
        self._pump()

    def _parse(self) -> None:
        """Handle every request received whole; queue the answers in order."""
        buf = self._buf
        while not self._done:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > _MAX_HEAD:
                    self._fail(431)
                return
            lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
            parts = lines[0].split(" ")
            if len(parts) != 3:
                self._fail(400)
                return
            method, target, version = parts
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            if "transfer-encoding" in headers:
                self._fail(501)  # our clients always send Content-Length
                return
            try:
                length = int(headers.get("content-length", "0"))
            except ValueError:
                self._fail(400)
                return
            if not 0 <= length <= _MAX_BODY:
                self._fail(413)
                return
            total = end + 4 + length
            if len(buf) < total:
                return
            body = bytes(buf[end + 4 : total])
            del buf[:total]
            connection = headers.get("connection", "").lower()
            if version == "HTTP/1.1":
                keep = connection != "close"
            else:
                keep = connection == "keep-alive"
            reply = self._core.handle(method, target, headers, body)
            self._answers.append((_render(reply, keep), keep, reply.delay))
            if not keep:
                self._done = True
                buf.clear()

    def _pump(self) -> None:
        """Write the queued answers in order, each after its delay."""
        while self._answers and not self._busy:
            data, keep, delay = self._answers.popleft()
            if delay > 0:
                self._busy = True
                self._loop.call_later(delay, self._write_later, data, keep)
                return
            self._write(data, keep)

    def _write(self, data: bytes, keep: bool) -> None:
        if self._transport is None:
            return
        self._transport.write(data)
        if not keep:
            self._transport.close()
            self._transport = None

    def _write_later(self, data: bytes, keep: bool) -> None:
        self._busy = False
        self._write(data, keep)
        self._pump()

    def _fail(self, status: int) -> None:
        reply = _error_reply(status, "bad_request", _REASONS.get(status, "error"))
        self._answers.append((_render(reply, keep=False), False, 0.0))
        self._done = True
        self._buf.clear()


def _render(reply: _Reply, keep: bool) -> bytes:
    close = "" if keep else "Connection: close\r\n"
    head = (
        f"HTTP/1.1 {reply.status} {_REASONS.get(reply.status, 'Unknown')}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(reply.body)}\r\n"
        f"{reply.headers}{close}\r\n"
    )
    return head.encode("latin-1") + reply.body


class FakeProvider:
    """The fake provider running in a background thread of this process.

    ``with FakeProvider(FakeOptions(...)) as fake: fake.url`` binds at once, so
    ``url`` is usable on the next line.
    """

    def __init__(self, options: FakeOptions | None = None) -> None:
        self._core = _Core(options or FakeOptions())
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._ready = threading.Event()
        self.port = 0

    @property
    def options(self) -> FakeOptions:
        return self._core.options

    @property
    def url(self) -> str:
        """Base URL for ProviderConfig.base_url (the API root without /v1)."""
        return f"http://{self._core.options.host}:{self.port}"

    def __enter__(self) -> FakeProvider:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> FakeProvider:
        """Bind, then serve on a daemon thread."""
        self._bind()
        self._core.start()
        self._thread = threading.Thread(
            target=lambda: asyncio.run(self._serve(in_main=False)),
            name="fake-provider",
            daemon=True,
        )
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("fake provider did not start")
        return self

    def stop(self) -> None:
        """Stop serving, drop connections and pending webhooks."""
        loop, stop_event = self._loop, self._stop_event
        if loop is not None and stop_event is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(stop_event.set)
            except RuntimeError:
                pass  # the loop already finished
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        self._core.stop()

    def serve_forever(self) -> None:
        """Serve on this (main) thread until SIGTERM or SIGINT."""
        self._bind()
        self._core.start()
        try:
            asyncio.run(self._serve(in_main=True))
        finally:
            self._core.stop()

    def stats(self) -> dict[str, int]:
        return self._core.stats()

    def messages(self) -> list[dict]:
        return self._core.messages()

    def phone_counts(self, by: str = "kind") -> dict[str, dict[str, int]]:
        """{phone: {"m1": n, "m2": n}}: what each phone received (see _Core)."""
        return self._core.phone_counts(by)

    def duplicates(self) -> dict[str, dict[str, int]]:
        """{phone: {kind: n}} of phones that got one kind more than once."""
        return self._core.duplicates()

    def reset(self) -> None:
        self._core.reset()

    def configure(self, **changes: Any) -> FakeOptions:
        """Change runtime options, as POST /_fake/config does."""
        return self._core.configure(changes)

    def _bind(self) -> None:
        opts = self._core.options
        self._sock = socket.create_server((opts.host, opts.port), backlog=1024)
        self._sock.setblocking(False)
        self.port = self._sock.getsockname()[1]

    async def _serve(self, in_main: bool) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._stop_event = asyncio.Event()
        server = await loop.create_server(
            lambda: _HttpProtocol(self._core, loop), sock=self._sock, backlog=1024
        )
        if in_main:
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, self._stop_event.set)
            print(f"fake provider listening on {self.url}", flush=True)
        self._ready.set()
        try:
            await self._stop_event.wait()
        finally:
            server.close()
            self._core.abort_connections()
            await server.wait_closed()
