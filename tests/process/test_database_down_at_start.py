"""PostgreSQL unreachable when the daemon starts: the supervisor stays up,
says so (status, alert), and starts its roles once the database answers.
Before, it exited 1 and systemd restarted it every 2 s, silently."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from daemon import status_client
from daemon.testing.services import OwnPostgres
from tests.helpers import free_port
from tests.helpers import require
from tests.helpers import wait_for
from tests.process.fixture_roles import AlertReceiver

pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]

ROOT = Path(__file__).resolve().parents[2]


def status(sock: Path) -> dict | None:
    try:
        return status_client.request(sock, {"cmd": "status"}, timeout=3)
    except (OSError, ValueError):
        return None


def test_the_supervisor_waits_for_the_database_then_starts(tmp_path):
    require(OwnPostgres.available(), "needs the PostgreSQL server binaries")
    port = free_port()
    sock = Path(tempfile.mkdtemp(prefix="cddb", dir="/tmp")) / "s.sock"
    pg = OwnPostgres(port)  # not started yet: nothing answers on the port
    with AlertReceiver() as receiver:
        cfg = tmp_path / "c.toml"
        cfg.write_text(
            f'[daemon]\ndata_dir = "{tmp_path / "data"}"\nlog_level = "warning"\n'
            f'[database]\nurl = "{pg.url}"\n'
            '[queue]\nbackend = "postgres"\n'
            f'[status]\nsocket = "{sock}"\n'
            f'[alerts]\ndown_after_s = 1.0\nwebhook_url = "{receiver.url}"\n'
            f"[web]\nport = {free_port()}\n"
        )
        env = {k: v for k, v in os.environ.items() if k != "CAMPAIGND_CONFIG"}
        daemon = subprocess.Popen(
            [sys.executable, "-m", "daemon", "run", "-c", str(cfg)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            cwd=ROOT,
            env=env,
        )
        try:
            waiting = wait_for(lambda: status(sock), timeout=30, what="status")
            assert waiting["daemon"]["state"] == "waiting for the database"
            assert waiting["roles"] == []
            assert "OperationalError" in waiting["db_error"]
            # The CLI says it too, degraded (exit 1).
            done = subprocess.run(
                [sys.executable, "-m", "daemon", "status", "-c", str(cfg)],
                capture_output=True,
                text=True,
                timeout=30,
                cwd=ROOT,
                env=env,
            )
            assert done.returncode == 1
            assert "waiting for the database" in done.stdout
            raised = receiver.wait_for("dependency:database", "raised", timeout=30)
            assert "database unreachable" in raised["message"]
            assert daemon.poll() is None

            pg.start()
            running = wait_for(
                lambda: (
                    (s := status(sock))
                    and s["daemon"]["state"] == "running"
                    and s["roles"]
                    and all(r["state"] == "RUNNING" for r in s["roles"])
                    and s
                ),
                timeout=90,
                interval=0.5,
                what="every role running",
            )
            names = [r["name"] for r in running["roles"]]
            assert names == [
                "web",
                "worker:background",
                "worker:messages#1",
                "worker:messages#2",
                "scheduler",
            ]
            receiver.wait_for("dependency:database", "resolved", timeout=30)
        finally:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(timeout=40)
            finally:
                pg.close()
    assert daemon.returncode == 0
