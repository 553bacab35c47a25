"""The waitress server of the web role, and its graceful stop (the drain).

On SIGTERM waitress's own path (SystemExit in its I/O loop) stops the loop
and gives the running requests 5 s (their threads send their answers), but
cancels the requests read and still queued for a thread: those webhooks get
no answer and are stored only if the provider delivers them again
(Wassenger's retries are not documented). `WebServer.drain` keeps the loop
running instead: it stops taking connections and requests, answers every
request it has read, closes each connection once its answers are out, and
returns from serve() when none is left or at its deadline.
"""

from __future__ import annotations

import errno
import logging
import resource
import socket
import threading
import time

from waitress import wasyncore
from waitress.channel import HTTPChannel
from waitress.server import create_server
from waitress.task import WSGITask

from daemon.config import Config

log = logging.getLogger(__name__)

# waitress answers 413 itself above max_body_bytes plus this; the app's
# middleware answers (in JSON) from max_body_bytes on, so the margin only
# covers headers and framing.
WAITRESS_BODY_MARGIN = 64 * 1024


def wait_for_port(host: str, port: int, timeout_s: float) -> bool:
    """Wait up to `timeout_s` until `host:port` can be bound (a socket of
    ours, closed again); True once it can. Binding the server itself to find
    out would cost a failed waitress server each time (its request threads
    start before it binds)."""
    if not port:
        return True
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except OSError:
        return False  # the server's own bind says what is wrong
    deadline = time.monotonic() + timeout_s
    while True:
        with socket.socket(family, kind, proto) as probe:
            # As waitress binds: a port with connections in TIME_WAIT is free.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
                return True
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE or time.monotonic() >= deadline:
                    return False
        time.sleep(0.05)


def _connection_limit() -> int:
    # waitress uses poll() here, so fds above 1024 are fine; stay under the
    # process's open-files limit with room for DB, queue and log files.
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1000
    return max(50, min(1000, soft - 100))


class _DrainAwareTask(WSGITask):
    """A request's answer, which closes its connection once the server drains
    (`Connection: close`: the client sends nothing more on it). Done here
    because waitress refuses the header from the application (hop-by-hop)."""

    def build_response_header(self):
        if getattr(self.channel.server, "draining", False):
            # As if the client had asked for it: waitress then answers
            # `Connection: close` (HTTP/1.0 and 1.1 alike) and closes the
            # connection once the answer is out.
            self.request.headers["CONNECTION"] = "close"
        return super().build_response_header()


class _DrainableChannel(HTTPChannel):
    """waitress's connection, whose answers close it once its server drains,
    and which can be told to read no new request."""

    task_class = _DrainAwareTask

    def stop_reading_new_requests(self) -> None:
        """Read only the rest of a request already begun. From the I/O loop's
        thread. (An instance attribute, not an override: the loop asks every
        connection whether it is readable at each turn.)"""
        readable = self.readable
        self.readable = lambda: self.request is not None and readable()


def _busy(channel: HTTPChannel) -> bool:
    """A request read or being read, or an answer not yet sent."""
    return bool(
        channel.requests or channel.request is not None or channel.total_outbufs_len
    )


class WebServer:
    """A waitress server on cfg.web's address (port 0 picks a free one)."""

    # How often a drain looks for connections it can close.
    DRAIN_TICK_S = 0.02

    def __init__(self, app, cfg: Config, *, host: str | None = None, port=None):
        self._drained = threading.Event()
        self._ticker: threading.Thread | None = None
        self.server = create_server(
            app,
            host=host or cfg.web.host,
            port=cfg.web.port if port is None else port,
            threads=cfg.web.threads,
            asyncore_use_poll=True,
            max_request_body_size=cfg.web.max_body_bytes + WAITRESS_BODY_MARGIN,
            # Idle keep-alive connections are dropped after this; providers
            # reconnect. Short enough that dead peers do not pile up.
            channel_timeout=30,
            cleanup_interval=10,
            connection_limit=_connection_limit(),
            ident="campaignd",
        )
        self.server.channel_class = _DrainableChannel
        self.server.draining = False

    @property
    def host(self) -> str:
        return self.server.effective_host

    @property
    def port(self) -> int:
        return self.server.effective_port

    @property
    def url(self) -> str:
        host = self.host
        if host in ("0.0.0.0", ""):
            host = "127.0.0.1"
        elif ":" in host:
            host = "[::1]" if host == "::" else f"[{host}]"
        return f"http://{host}:{self.port}"

    def serve(self) -> None:
        """Run until drained, stop(), or SystemExit/KeyboardInterrupt here."""
        try:
            self.server.run()
        finally:
            wait_s = 5.0
            if self._ticker is not None:
                self._drained.set()
                self._ticker.join()
                self.server.trigger.close()
                # A drain left no request thread busy but those it cut off
                # at its deadline, which are not worth waiting for.
                wait_s = 0.5
            # run() returns without waiting for the request threads when its
            # map was emptied (a drain, stop()).
            self.server.task_dispatcher.shutdown(cancel_pending=True, timeout=wait_s)

    def stop_listening(self) -> None:
        """Close the listening socket: the port is free for a replacement
        while the requests already taken finish. Call it from the thread that
        runs serve() (main's SIGTERM handler runs there).

        Without it the port stays taken until the process is gone. A daemon
        restarted at once after its supervisor died (a restart loop or a
        container's restart policy; systemd clears the unit's processes
        first) then saw its new web role fail to bind and back off: READY 7 s
        after the kill in W3's top-process kills (docs/benchmarks.md).
        """
        # The listener only: the server's own close() also closes the trigger
        # that request threads still pull to hand their answers to the loop.
        wasyncore.dispatcher.close(self.server)

    def drain(self, timeout_s: float) -> None:
        """Stop gracefully, from any thread: take no new connection or
        request, answer those read (each answer says `Connection: close`),
        close idle connections and each busy one once its answers are sent;
        serve() returns when none is left, or after `timeout_s` with what is
        left cut off. Returns at once."""
        if self._ticker is not None:
            return
        deadline = time.monotonic() + timeout_s
        self._ticker = threading.Thread(
            target=self._tick, args=(deadline,), name="web-drain", daemon=True
        )
        self._ticker.start()

    def _tick(self, deadline: float) -> None:
        # Channels belong to the I/O loop's thread: each step runs there, as
        # a trigger thunk. The trigger stays open until serve() has joined us.
        while True:
            self.server.trigger.pull_trigger(lambda: self._drain_step(deadline))
            if self._drained.wait(self.DRAIN_TICK_S):
                return

    def _drain_step(self, deadline: float) -> None:
        if self._drained.is_set():
            return
        try:
            if not self.server.draining:
                self.server.draining = True
                self.stop_listening()
                for channel in list(self.server._map.values()):
                    if isinstance(channel, _DrainableChannel):
                        channel.stop_reading_new_requests()
                log.info("web draining: no new connection or request")
            done = self._close_finished(late=time.monotonic() >= deadline)
        except Exception:  # noqa: BLE001 - a drain that raises must still end
            log.exception("web drain failed; closing every connection")
            self._close_finished(late=True)
            done = True
        if done:
            self._drained.set()
            # Out of the map, not closed (the ticker may be pulling it): the
            # map is empty and the loop ends.
            self.server.trigger.del_channel()

    def _close_finished(self, late: bool) -> bool:
        """Close the connections with nothing in flight (all of them when
        `late`); True when none is left."""
        left = 0
        for channel in list(self.server._map.values()):
            if channel is self.server.trigger:
                continue
            if not isinstance(channel, HTTPChannel):
                channel.close()
            elif not _busy(channel):
                channel.handle_close()
            elif late:
                log.warning(
                    "web drain: a request or answer still in flight after the"
                    " drain's time; closing its connection"
                )
                channel.handle_close()
            else:
                left += 1
        return left == 0

    def stop(self) -> None:
        """Stop serving from any thread (tests, embedding); serve() then returns."""

        def close_all():
            for channel in list(self.server._map.values()):
                channel.close()

        # Runs inside the I/O loop thread, the only one allowed to touch
        # its channels; an empty map ends the loop.
        try:
            self.server.trigger.pull_trigger(close_all)
        except OSError as exc:
            # The trigger's pipe was closed under us (seen once in a test
            # process: EBADF), so the loop cannot be woken: close from here;
            # the loop's next poll finds an empty map and ends.
            log.warning("web server stop: trigger unusable (%s); closing directly", exc)
            close_all()

    def serve_in_thread(self) -> threading.Thread:
        thread = threading.Thread(target=self.serve, name="waitress", daemon=True)
        thread.start()
        return thread
