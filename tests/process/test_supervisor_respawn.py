"""A real supervisor over fixture children: SIGKILL respawn and the status socket."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import time

import pytest

from daemon.runtime import InFlight
from daemon.runtime import inflight_dir
from daemon.runtime import read_inflight
from tests.helpers import run_cli
from tests.helpers import wait_for
from tests.process.fixture_roles import REPO_ROOT
from tests.process.fixture_roles import FixtureDaemon

# Real processes: each test takes several seconds.
pytestmark = pytest.mark.slow


@pytest.fixture
def daemon(tmp_path, make_config):
    d = FixtureDaemon(tmp_path, make_config)
    yield d
    d.close()


def campaignd(*args, cfg) -> subprocess.CompletedProcess:
    return run_cli(*args, cfg=cfg, timeout=30)


@pytest.mark.timeout(90)
def test_sigkill_of_each_role_is_replaced_at_once(daemon):
    """Verify every role comes back after SIGKILL and the restart shows."""
    daemon.start()
    for role in daemon.status()["roles"]:
        name, old_pid = role["name"], role["pid"]
        os.kill(old_pid, signal.SIGKILL)
        t0 = time.monotonic()
        # The replacement is spawned in the same loop pass as the reap...
        daemon.wait_role(
            name,
            lambda r, p=old_pid: r["pid"] not in (None, p),
            timeout=1.0,
            what=f"{name} respawned",
        )
        # ...and RUNNING once its first heartbeat lands (python start-up).
        back = daemon.wait_role(
            name,
            lambda r, p=old_pid: r["state"] == "RUNNING" and r["pid"] != p,
            timeout=10.0,
        )
        assert back["restarts"] == 1, back
        assert back["last_exit"] == "killed by SIGKILL (out of memory?)"
        print(f"{name}: RUNNING again {time.monotonic() - t0:.2f}s after SIGKILL")
    answer = daemon.status()
    assert all(r["restarts"] == 1 for r in answer["roles"])
    assert answer["daemon"]["state"] == "running"


@pytest.mark.timeout(60)
def test_status_socket_protocol(daemon):
    """Verify the socket's mode, its error answers and a graceful restart."""
    daemon.start()
    assert stat.S_IMODE(os.stat(daemon.socket_path).st_mode) == 0o660
    import socket

    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5)
        sock.connect(str(daemon.socket_path))
        sock.sendall(b"{nope\n")
        assert "bad JSON" in json.loads(sock.recv(65536))["error"]
    assert "unknown cmd" in daemon.request({"cmd": "dance"})["error"]
    assert "unknown role" in daemon.request({"cmd": "restart", "role": "x"})["error"]

    old = daemon.role("web")["pid"]
    answer = daemon.request({"cmd": "restart", "role": "web"})
    assert answer == {"ok": True, "restarting": ["web"]}
    back = daemon.wait_role(
        "web", lambda r: r["state"] == "RUNNING" and r["pid"] != old, timeout=15
    )
    assert back["last_exit"] == "exited 0"  # drained on SIGTERM, not killed
    assert ("STOP", "web", old) in daemon.events()

    answer = daemon.status()
    assert set(answer["queues"]) == {"default", "messages", "retry", "verification"}
    assert answer["daemon"]["pid"] == daemon.proc.pid


@pytest.mark.timeout(60)
def test_status_and_restart_commands(daemon):
    """Verify `campaignd status` (table, --json, exit codes) and `restart`."""
    cfg = daemon.cfg
    assert campaignd("status", cfg=cfg).returncode == 3  # not running yet
    daemon.start()
    table = campaignd("status", cfg=cfg)
    assert table.returncode == 0, table.stderr
    assert "worker:messages#1" in table.stdout and "RUNNING" in table.stdout
    as_json = campaignd("status", "--json", cfg=cfg)
    assert as_json.returncode == 0
    assert len(json.loads(as_json.stdout)["roles"]) == 6

    restart = campaignd("restart", "worker:messages", cfg=cfg)
    assert restart.returncode == 0, restart.stderr
    assert "worker:messages#1" in restart.stdout
    assert campaignd("restart", "nope", cfg=cfg).returncode == 1

    # reload: every role replaced, one by one; planned, so no RESTARTS.
    before = {r["name"]: r for r in daemon.status()["roles"]}
    reload = campaignd("reload", cfg=cfg)
    assert reload.returncode == 0, reload.stderr
    assert reload.stdout.startswith("reloading")
    for name, old in before.items():
        back = daemon.wait_role(
            name,
            lambda r, p=old["pid"]: r["state"] == "RUNNING" and r["pid"] != p,
            timeout=30,
            what=f"{name} replaced by the reload",
        )
        assert back["restarts"] == old["restarts"]

    daemon.set_flag("scheduler", "crash")
    os.kill(daemon.role("scheduler")["pid"], signal.SIGKILL)
    daemon.wait_role("scheduler", lambda r: r["state"] != "RUNNING")
    degraded = campaignd("status", cfg=cfg)
    assert degraded.returncode == 1


@pytest.mark.timeout(30)
def test_second_daemon_on_the_same_socket_refuses(daemon):
    """Verify a second daemon on the same data dir refuses before it touches
    anything: the live status socket stays, and so do the records of a dead
    worker that only the running daemon may release."""
    daemon.start()
    dead = subprocess.Popen(["true"])
    dead.wait()
    records = inflight_dir(daemon.cfg.data_path, daemon.env)
    InFlight(records, pid=dead.pid).begin(4242)
    second = subprocess.run(
        daemon.command(),
        env=daemon.env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert second.returncode == 1
    assert f"another campaignd (pid {daemon.proc.pid}) runs on the data dir" in (
        second.stderr
    )
    assert len(second.stderr.strip().splitlines()) == 1
    assert read_inflight(records, dead.pid) == {4242}
    wait_for(daemon.try_status, timeout=5)
