"""The fake's webhook poster: jobs on a timer heap, posted by a few threads
over bare HTTP/1.1 keep-alive connections."""

from __future__ import annotations

import heapq
import itertools
import json
import socket
import threading
import time
from typing import NamedTuple
from typing import Protocol
from urllib.parse import urlsplit

from daemon.providers.base import sign_hmac_sha256
from daemon.providers.fake.options import FakeOptions

_WEBHOOK_TIMEOUT_S = 5.0
_AGENTS = {"wassenger": "fake-wassenger", "meta": "facebookexternalua"}


class _Job(NamedTuple):
    kind: str  # "ack", "reply" or "stop"
    payload: dict
    attempt: int
    # (delay_s, job) scheduled once this job is done (delivered or given up):
    # how acks follow a reply with reply_before_status.
    then: tuple[tuple[float, _Job], ...] = ()


class _Poster:
    """A bare HTTP/1.1 keep-alive POST client for one webhook URL and one thread.

    http.client costs about five times more CPU per post, and these threads
    share the GIL with the API loop. Webhooks are at-least-once anyway, so a
    post that fails on a reused connection is simply sent again on a new one.
    """

    def __init__(self, url: str, agent: str = "fake-wassenger") -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"webhook_url must be an http:// URL, got {url!r}")
        self._addr = (parts.hostname, parts.port or 80)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._head = (
            f"POST {target} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
            f"Content-Type: application/json\r\nUser-Agent: {agent}\r\n"
        )
        self._sock: socket.socket | None = None
        self._buf = b""

    def post(self, body: bytes, headers: str) -> int:
        """POST ``body`` with extra header lines; the status, or OSError."""
        data = self._head + headers + f"Content-Length: {len(body)}\r\n\r\n"
        request = data.encode("latin-1") + body
        while True:
            fresh = self._sock is None
            if self._sock is None:
                self._sock = socket.create_connection(self._addr, _WEBHOOK_TIMEOUT_S)
                self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self._buf = b""
            try:
                self._sock.sendall(request)
                return self._response()
            except TimeoutError:
                self.close()
                raise
            except OSError:
                self.close()
                if fresh:
                    raise

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _recv(self) -> None:
        assert self._sock is not None
        chunk = self._sock.recv(65536)
        if not chunk:
            raise ConnectionResetError("webhook receiver closed the connection")
        self._buf += chunk

    def _line(self) -> bytes:
        while (eol := self._buf.find(b"\r\n")) < 0:
            self._recv()
        line, self._buf = self._buf[:eol], self._buf[eol + 2 :]
        return line

    def _response(self) -> int:
        while (end := self._buf.find(b"\r\n\r\n")) < 0:
            self._recv()
        lines = self._buf[:end].decode("latin-1").split("\r\n")
        self._buf = self._buf[end + 4 :]
        version, status_text = lines[0].split(" ", 2)[:2]
        status = int(status_text)
        if 100 <= status < 200:
            return self._response()  # 100 Continue and friends: skip
        fields = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            fields[name.strip().lower()] = value.strip().lower()
        connection = fields.get("connection", "")
        if version == "HTTP/1.1":
            keep = connection != "close"
        else:
            keep = connection == "keep-alive"
        if "content-length" in fields:
            length = int(fields["content-length"])
            while len(self._buf) < length:
                self._recv()
            self._buf = self._buf[length:]
        elif fields.get("transfer-encoding", "").endswith("chunked"):
            while size := int(self._line().split(b";")[0], 16):
                while len(self._buf) < size + 2:
                    self._recv()
                self._buf = self._buf[size + 2 :]
            while self._line():  # trailers end with an empty line
                pass
        elif status not in (204, 304):
            try:  # no length: the body ends when the connection does
                while True:
                    self._recv()
            except ConnectionResetError:
                keep = False
        if not keep:
            self.close()
        return status


class _Owner(Protocol):
    """What the poster reads and tells of the fake's state (core._Core)."""

    options: FakeOptions

    def count(self, name: str) -> None: ...

    def webhook_done(self, kind: str) -> None: ...


class _Webhooks:
    """Posts webhook jobs when due: a timer heap drained by a few threads."""

    def __init__(self, core: _Owner, threads: int) -> None:
        self._core = core
        self._heap: list[tuple[float, int, _Job]] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._stopped = False
        self._inflight = 0  # jobs taken off the heap, not yet finished
        self._threads = [
            threading.Thread(target=self._run, name=f"fake-webhook-{i}", daemon=True)
            for i in range(threads)
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._heap.clear()
            self._cond.notify_all()
        for thread in self._threads:
            if thread.is_alive():
                thread.join(timeout=5)

    def schedule(self, delay_s: float, job: _Job) -> None:
        with self._cond:
            heapq.heappush(
                self._heap, (time.monotonic() + delay_s, next(self._seq), job)
            )
            self._cond.notify()

    def clear(self) -> None:
        with self._cond:
            self._heap.clear()

    def pending(self) -> int:
        """Jobs waiting or being posted (0 means every webhook has settled)."""
        with self._cond:
            return len(self._heap) + self._inflight

    def _next_job(self) -> _Job | None:
        with self._cond:
            while not self._stopped:
                now = time.monotonic()
                if self._heap and self._heap[0][0] <= now:
                    job = heapq.heappop(self._heap)[2]
                    self._inflight += 1
                    if self._heap:
                        # Another job may be due too: let a sibling look.
                        self._cond.notify()
                    return job
                timeout = self._heap[0][0] - now if self._heap else None
                self._cond.wait(timeout)
            return None

    def _run(self) -> None:
        posters: dict[str, _Poster] = {}  # this thread's connections, by URL
        try:
            while (job := self._next_job()) is not None:
                try:
                    self._deliver(job, posters)
                finally:
                    with self._cond:
                        self._inflight -= 1
        finally:
            for poster in posters.values():
                poster.close()

    def _deliver(self, job: _Job, posters: dict[str, _Poster]) -> None:
        opts = self._core.options
        if not opts.webhook_url:
            return
        raw = json.dumps(job.payload).encode()
        headers = ""
        if opts.webhook_secret and opts.dialect == "meta":
            # Meta signs the raw body with the app secret; it sends no secret.
            signature = sign_hmac_sha256(opts.webhook_secret, raw)
            headers = f"X-Hub-Signature-256: {signature}\r\n"
        elif opts.webhook_secret:
            signature = sign_hmac_sha256(opts.webhook_secret, raw)
            headers = (
                f"X-Webhook-Secret: {opts.webhook_secret}\r\n"
                f"X-Wassenger-Signature: {signature}\r\n"
            )
        try:
            poster = posters.get(opts.webhook_url)
            if poster is None:
                agent = _AGENTS.get(opts.dialect, "fake-provider")
                poster = posters[opts.webhook_url] = _Poster(opts.webhook_url, agent)
            ok = 200 <= poster.post(raw, headers) < 300
        except (OSError, ValueError):
            ok = False
        if ok:
            self._core.webhook_done(job.kind)
        elif job.attempt < opts.webhook_retries:
            # Like a real provider: back off and try again, a few times.
            self._core.count("webhooks_retried")
            delay = opts.webhook_backoff_ms / 1000.0 * 2**job.attempt
            self.schedule(delay, job._replace(attempt=job.attempt + 1))
            return
        else:
            self._core.count("webhooks_failed")
        for delay_s, follower in job.then:
            self.schedule(delay_s, follower)
