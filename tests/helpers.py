"""Shared test helpers: configs on disk, waiting on conditions, free ports,
a loopback webhook receiver and one-request calls to the fake provider."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from daemon import config_text
from daemon.testing import free_port as free_port  # one definition, re-exported

if TYPE_CHECKING:
    from daemon.providers.fake import FakeProvider

# Set by CI (.ci/run): a missing prerequisite is then a broken machine, and the
# tests that need it fail instead of being skipped (a skip is easy to miss).
REQUIRE_SERVICES = os.environ.get("CAMPAIGND_TEST_REQUIRE_SERVICES") == "1"


def require(condition, why: str) -> None:
    """Skip the calling test unless `condition` holds; fail it instead in CI.

    Use it for anything CI provides (services, binaries, root, test extras).
    A skip for something truly impossible on the CI machine stays a plain
    `pytest.skip`, with a comment saying why.
    """
    if condition:
        return
    if REQUIRE_SERVICES:
        pytest.fail(f"{why} (and CAMPAIGND_TEST_REQUIRE_SERVICES=1)", pytrace=False)
    pytest.skip(why)


def healthz_ok(port: int) -> bool:
    """GET /healthz on 127.0.0.1:`port` answered 200 (False if refused)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", "/healthz")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


def post_webhook(port: int, body: dict, answers: list) -> None:
    """POST `body` to /webhooks/wassenger on 127.0.0.1:`port` (for a thread):
    appends (status, Connection header, body) to `answers`, or the OSError."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request(
            "POST",
            "/webhooks/wassenger",
            body=json.dumps(body),
            headers={"Content-Type": "application/json"},
        )
        answer = conn.getresponse()
        answers.append((answer.status, answer.getheader("Connection"), answer.read()))
    except OSError as exc:
        answers.append(exc)
    finally:
        conn.close()


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.02, what=""):
    """Poll `predicate` until it returns a truthy value or the deadline passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout}s waiting for {what or predicate}"
            )
        time.sleep(interval)


def dump_toml(data: dict) -> str:
    lines = []
    for table, values in data.items():
        lines.append(f"[{table}]")
        for key, value in values.items():
            lines.append(f"{key} = {config_text.toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def merge(base: dict, extra: dict) -> dict:
    out = {k: dict(v) for k, v in base.items()}
    for table, values in extra.items():
        out.setdefault(table, {}).update(values)
    return out


def write_config(path: Path, data: dict) -> Path:
    path.write_text(dump_toml(data))
    return path


def subprocess_env(**extra) -> dict:
    env = dict(os.environ)
    env.pop("CAMPAIGND_CONFIG", None)
    env.update(extra)
    return env


ROOT = Path(__file__).resolve().parent.parent


def run_cli(
    *args: str, cfg=None, cwd=None, env_extra=None, timeout: float = 90, **popen
) -> subprocess.CompletedProcess:
    """`python -m daemon ARGS [-c CFG]` as an operator runs it: a process of
    its own, text output captured, no $CAMPAIGND_CONFIG from this shell."""
    cmd = [sys.executable, "-m", "daemon", *args]
    if cfg is not None:
        cmd += ["-c", cfg.source]
    popen.setdefault("capture_output", True)
    return subprocess.run(
        cmd,
        text=True,
        env=subprocess_env(**(env_extra or {})),
        timeout=timeout,
        check=False,
        cwd=cwd or ROOT,
        **popen,
    )


# ---------------------------------------------------------------- fake provider

# The fake provider's sent/delivered/read ack delays (ms), short for a test.
FAST_ACKS = (5.0, 10.0, 15.0)


class Receiver:
    """A loopback webhook endpoint; answers 500 to the first ``fail_first`` posts."""

    def __init__(self, fail_first: int = 0) -> None:
        self.events: list[dict] = []
        self.raw: list[tuple[dict, bytes]] = []  # (headers, body) of every post
        self.fail_first = fail_first
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver._lock:
                    receiver.raw.append((dict(self.headers), body))
                    failing = len(receiver.raw) <= receiver.fail_first
                    if not failing:
                        receiver.events.append(json.loads(body))
                status = 500 if failing else 200
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/hooks?t=1"
        threading.Thread(
            target=self._server.serve_forever, args=(0.01,), daemon=True
        ).start()

    def of(self, event: str) -> list[dict]:
        with self._lock:
            return [e for e in self.events if e.get("event") == event]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def call(fake: FakeProvider, method: str, path: str, body=None, headers=None):
    """One request on a fresh connection: (status, headers, parsed JSON)."""
    conn = http.client.HTTPConnection("127.0.0.1", fake.port, timeout=5)
    data = json.dumps(body).encode() if body is not None else None
    conn.request(method, path, data, headers or {})
    resp = conn.getresponse()
    raw = resp.read()
    conn.close()
    return resp.status, dict(resp.getheaders()), json.loads(raw) if raw else None
