"""The test plays systemd: a NOTIFY_SOCKET datagram socket and WATCHDOG_USEC."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
import uuid

import pytest

from daemon.supervision.systemd import Notifier
from tests.helpers import wait_for
from tests.process.fixture_roles import FixtureDaemon

# Real processes: each test takes several seconds.
pytestmark = pytest.mark.slow


class FakeSystemd:
    """Receives sd_notify datagrams (abstract namespace) with their times."""

    def __init__(self):
        self.name = f"campaignd-test-{uuid.uuid4().hex[:12]}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.name)
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self.running = True
        self.thread = threading.Thread(target=self._receive, daemon=True)
        self.thread.start()

    @property
    def address(self) -> str:
        return "@" + self.name

    def _receive(self):
        while self.running:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            for line in data.decode().splitlines():
                self.messages.append((time.monotonic(), line))

    def times(self, line: str, since: float = 0.0) -> list[float]:
        return [t for t, m in list(self.messages) if m == line and t >= since]

    def has(self, prefix: str, since: float = 0.0) -> bool:
        return any(m.startswith(prefix) and t >= since for t, m in list(self.messages))

    def close(self):
        self.running = False
        self.thread.join()
        self.sock.close()


@pytest.fixture
def fake_systemd():
    fake = FakeSystemd()
    yield fake
    fake.close()


def test_notifier_speaks_to_abstract_sockets(fake_systemd):
    """Verify sd_notify framing: one datagram, newline-separated lines."""
    notifier = Notifier(
        {"NOTIFY_SOCKET": fake_systemd.address, "WATCHDOG_USEC": "2000000"}
    )
    assert notifier.watchdog_interval_s == 1.0
    assert notifier.notify("READY=1", "STATUS=ok")
    wait_for(lambda: fake_systemd.has("STATUS=ok"))
    assert not Notifier({}).notify("READY=1")
    other_pid = {"WATCHDOG_USEC": "1000", "WATCHDOG_PID": "1"}
    assert Notifier(other_pid).watchdog_interval_s is None


@pytest.mark.timeout(90)
def test_ready_watchdog_reload_and_stopping(tmp_path, make_config, fake_systemd):
    """Verify READY=1, regular WATCHDOG=1 that stop while a child is wedged,
    RELOADING=1 -> READY=1 on SIGHUP, a bad reload kept out, STOPPING=1."""
    daemon = FixtureDaemon(
        tmp_path,
        make_config,
        {"supervisor": {"heartbeat_timeout_s": 4.0}},
        roles="web,worker:default,scheduler",
    )
    try:
        daemon.start(
            env={"NOTIFY_SOCKET": fake_systemd.address, "WATCHDOG_USEC": "300000"},
            wait_running=False,
        )
        wait_for(lambda: fake_systemd.times("READY=1"), timeout=30, what="READY=1")
        assert all(r["state"] == "RUNNING" for r in daemon.status()["roles"])
        assert fake_systemd.has("STATUS=3/3 roles running")

        # Regular pings: every 0.15 s while all is well.
        t0 = time.monotonic()
        wait_for(lambda: len(fake_systemd.times("WATCHDOG=1", t0)) >= 5, timeout=5)

        # A wedged child: pings stop (before the supervisor replaces it).
        wedged = daemon.role("web")["pid"]
        daemon.set_flag("web", "hang", pid=wedged)
        hung_at = time.monotonic()
        daemon.wait_role(
            "web", lambda r: r["pid"] != wedged and r["state"] == "RUNNING", timeout=20
        )
        replaced_at = time.monotonic()
        pings = fake_systemd.times("WATCHDOG=1", hung_at)
        edges = [hung_at] + pings + [replaced_at]
        gaps = [b - a for a, b in zip(edges, edges[1:], strict=False)]
        assert max(gaps) > 1.5, gaps
        wait_for(
            lambda: fake_systemd.times("WATCHDOG=1", replaced_at + 0.1),
            timeout=5,
            what="pings again after the replacement",
        )

        # Reload: RELOADING=1 with MONOTONIC_USEC, children replaced, READY=1.
        before = {r["name"]: r["pid"] for r in daemon.status()["roles"]}
        t_hup = time.monotonic()
        daemon.signal(signal.SIGHUP)
        wait_for(
            lambda: fake_systemd.times("READY=1", t_hup),
            timeout=30,
            what="READY=1 after the reload",
        )
        assert fake_systemd.times("RELOADING=1", t_hup)
        assert fake_systemd.has("MONOTONIC_USEC=", t_hup)
        after = {r["name"]: r["pid"] for r in daemon.status()["roles"]}
        assert all(after[name] != pid for name, pid in before.items())

        # A broken config file: the reload is refused, nobody is replaced.
        source = daemon.cfg.source
        good = open(source).read()
        with open(source, "w") as f:
            f.write("[web]\nport = 70000\n")
        t_bad = time.monotonic()
        daemon.signal(signal.SIGHUP)
        wait_for(lambda: fake_systemd.has("STATUS=reload failed", t_bad), timeout=10)
        assert {r["name"]: r["pid"] for r in daemon.status()["roles"]} == after
        # The broken file never reaches a respawned child: it gets the copy
        # validated at the last good (re)load.
        os.kill(after["scheduler"], signal.SIGKILL)
        daemon.wait_role(
            "scheduler",
            lambda r: r["state"] == "RUNNING" and r["pid"] != after["scheduler"],
        )
        with open(source, "w") as f:
            f.write(good)

        t_stop = time.monotonic()
        daemon.signal(signal.SIGTERM)
        assert daemon.wait_exit(timeout=15) == 0
        assert fake_systemd.times("STOPPING=1", t_stop)
    finally:
        daemon.close()
