"""Provider calls go through HTTPS_PROXY / HTTP_PROXY, except for NO_PROXY.

A small real forward proxy on loopback sends every connection it is asked for
to one upstream server, whatever name the client asked for: a request for
`provider.test` (a name no resolver knows) only succeeds through the proxy.
"""

from __future__ import annotations

import base64
import http.server
import json
import socket
import ssl
import subprocess
import threading

import pytest

from daemon.config import ProviderConfig
from daemon.errors import ConfigError
from daemon.providers.base import RetryableError
from daemon.providers.fake import FakeOptions
from daemon.providers.fake import FakeProvider
from daemon.providers.http import HttpClient
from daemon.providers.wassenger import WassengerProvider
from tests.helpers import free_port

pytestmark = pytest.mark.timeout(30)

PROXY_VARS = [
    f"{name}_proxy" for name in ("http", "https", "all", "no", "HTTP", "HTTPS")
] + ["ALL_PROXY", "NO_PROXY"]


class ForwardProxy:
    """CONNECT tunnels and absolute-form requests, all sent to `upstream`."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.seen: list[str] = []  # request lines, as the proxy got them
        self.auth: list[str | None] = []  # their Proxy-Authorization
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._sock.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        reader = client.makefile("rb")
        upstream = socket.create_connection(self.upstream, timeout=10)
        try:
            line, headers = self._head(reader)
            if line.startswith("CONNECT "):
                client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                threading.Thread(
                    target=_pump, args=(upstream, client), daemon=True
                ).start()
                _pump(reader, upstream)
                return
            threading.Thread(target=_pump, args=(upstream, client), daemon=True).start()
            while line:
                # Forward with the origin-form target an origin server expects.
                method, target, version = line.split(" ")
                path = "/" + target.split("://", 1)[1].partition("/")[2]
                length = int(headers.get("content-length", "0"))
                body = reader.read(length) if length else b""
                kept = "".join(
                    f"{k}: {v}\r\n"
                    for k, v in headers.items()
                    if k != "proxy-authorization"
                )
                upstream.sendall(f"{method} {path} {version}\r\n{kept}\r\n".encode())
                upstream.sendall(body)
                line, headers = self._head(reader)
        finally:
            upstream.close()
            client.close()

    def _head(self, reader) -> tuple[str, dict[str, str]]:
        line = reader.readline().decode().rstrip("\r\n")
        headers = {}
        while True:
            header = reader.readline().decode().rstrip("\r\n")
            if not header:
                break
            name, _, value = header.partition(":")
            headers[name.strip().lower()] = value.strip()
        if line:
            self.seen.append(line)
            self.auth.append(headers.get("proxy-authorization"))
        return line, headers


def _pump(source, sink: socket.socket) -> None:
    read = source.recv if isinstance(source, socket.socket) else source.read1
    try:
        while chunk := read(65536):
            sink.sendall(chunk)
    except OSError:
        pass
    finally:
        try:
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass


class _Echo(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        body = json.dumps({"path": self.path, "host": self.headers["Host"]}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(autouse=True)
def no_proxy_settings(monkeypatch):
    for name in PROXY_VARS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def tls_origin(tmp_path, monkeypatch):
    """An HTTPS server whose certificate says provider.test, trusted by the
    default context through SSL_CERT_FILE (so TLS is verified end to end)."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes"]
        + ["-keyout", str(key), "-out", str(cert), "-days", "1"]
        + ["-subj", "/CN=provider.test"]
        + ["-addext", "subjectAltName=DNS:provider.test"],
        check=True,
        capture_output=True,
        timeout=30,
    )
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address
    server.shutdown()
    server.server_close()


@pytest.fixture
def fake():
    with FakeProvider(FakeOptions(ack_delays_ms=())) as server:
        yield server


def test_https_goes_through_a_connect_tunnel(tls_origin, monkeypatch):
    proxy = ForwardProxy(tls_origin)
    try:
        monkeypatch.setenv("HTTPS_PROXY", proxy.url)
        client = HttpClient(
            "https://provider.test:8443/api", connect_timeout=5, read_timeout=10
        )
        resp = client.request("GET", "/v1/ping")
        again = client.request("GET", "/v1/ping?n=2")  # the kept-alive tunnel
        client.close()
    finally:
        proxy.close()
    assert resp.status == 200
    assert resp.json() == {"path": "/api/v1/ping", "host": "provider.test:8443"}
    assert again.json()["path"] == "/api/v1/ping?n=2"
    # The proxy saw the origin's name, never the request: TLS is end to end.
    assert proxy.seen == ["CONNECT provider.test:8443 HTTP/1.0"]


def test_a_send_goes_through_an_http_proxy_with_its_credentials(fake, monkeypatch):
    proxy = ForwardProxy(("127.0.0.1", int(fake.url.rsplit(":", 1)[1])))
    try:
        monkeypatch.setenv("http_proxy", proxy.url.replace("://", "://ops:p%40ss@"))
        provider = WassengerProvider(
            ProviderConfig(base_url="http://wassenger.test", token="t")
        )
        result = provider.send("+33612345678", "Bonjour", "ref-1")
    finally:
        proxy.close()
    assert result.provider_id
    assert [m["phone"] for m in fake.messages()] == ["+33612345678"]
    assert proxy.seen == ["POST http://wassenger.test/v1/messages HTTP/1.1"]
    assert proxy.auth == ["Basic " + base64.b64encode(b"ops:p@ss").decode()]


def test_no_proxy_bypasses_the_proxy(fake, monkeypatch):
    proxy = ForwardProxy(("127.0.0.1", int(fake.url.rsplit(":", 1)[1])))
    # 192.0.2.1 (TEST-NET-1) routes nowhere: only the proxy can answer for it.
    url = "http://192.0.2.1"
    try:
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        proxied = HttpClient(url, connect_timeout=1, read_timeout=5)
        assert proxied.request("GET", "/_fake/stats").status == 200
        proxied.close()
        assert proxy.seen == ["GET http://192.0.2.1/_fake/stats HTTP/1.1"]

        monkeypatch.setenv("NO_PROXY", "example.org, 192.0.2.1")
        direct = HttpClient(url, connect_timeout=0.5, read_timeout=5)
        with pytest.raises(RetryableError) as info:
            direct.request("GET", "/_fake/stats")
    finally:
        proxy.close()
    assert str(info.value).startswith("cannot connect to http://192.0.2.1:")
    assert "proxy" not in str(info.value)
    assert len(proxy.seen) == 1


def test_loopback_never_goes_to_the_proxy(fake, monkeypatch):
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{free_port()}")
    client = HttpClient(fake.url, connect_timeout=2, read_timeout=5)
    assert client.request("GET", "/_fake/stats").status == 200
    client.close()


def test_an_unreachable_proxy_is_named_in_the_error(monkeypatch):
    address = f"127.0.0.1:{free_port()}"
    monkeypatch.setenv("ALL_PROXY", f"http://{address}")
    client = HttpClient("https://provider.test", connect_timeout=2, read_timeout=5)
    with pytest.raises(RetryableError) as info:
        client.request("GET", "/")
    assert str(info.value).startswith(
        f"cannot connect to https://provider.test through the proxy {address}:"
    )


def test_an_unsupported_proxy_is_a_config_error_without_its_password(monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "socks5://ops:hunter2@proxy.internal:1080")
    with pytest.raises(ConfigError) as info:
        HttpClient("https://provider.test", connect_timeout=1, read_timeout=1)
    assert str(info.value) == (
        "HTTPS_PROXY: must be an http://host:port proxy URL"
        " (https:// and socks proxies are not supported)"
    )
