"""A web port already taken is one line naming web.host:web.port, not a
traceback per respawn."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

ROOT = Path(__file__).resolve().parents[2]


def test_campaignd_web_on_a_taken_port_says_so_in_one_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        cfg = tmp_path / "c.toml"
        cfg.write_text(
            f'[daemon]\ndata_dir = "{tmp_path / "data"}"\n[web]\nport = {port}\n'
        )
        env = {k: v for k, v in os.environ.items() if k != "CAMPAIGND_CONFIG"}
        done = subprocess.run(
            [sys.executable, "-m", "daemon", "web", "-c", str(cfg)],
            capture_output=True,
            text=True,
            timeout=40,
            cwd=ROOT,
            env=env,
        )
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    # (A fresh data dir also logs its migrations at INFO.)
    lines = [x for x in done.stderr.splitlines() if "applied migration" not in x]
    assert len(lines) == 1, done.stderr
    assert lines[0].endswith(
        f"ERROR [web] daemon.roles.web.app: cannot listen on 127.0.0.1:{port}"
        " (web.host, web.port): Address already in use"
    )


def test_under_the_supervisor_the_reason_is_the_roles_last_exit(tmp_path):
    from daemon import status_client
    from tests.helpers import wait_for

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        cfg = tmp_path / "c.toml"
        cfg.write_text(
            f'[daemon]\ndata_dir = "{tmp_path / "data"}"\nlog_level = "warning"\n'
            f"[web]\nport = {port}\n"
        )
        env = {k: v for k, v in os.environ.items() if k != "CAMPAIGND_CONFIG"}
        daemon = subprocess.Popen(
            [sys.executable, "-m", "daemon", "run", "-c", str(cfg)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            cwd=ROOT,
            env=env,
        )
        sock = tmp_path / "data" / "campaignd.sock"

        def web_last_exit():
            try:
                answer = status_client.request(sock, {"cmd": "status"}, timeout=2)
            except OSError:
                return None
            web = next((r for r in answer.get("roles", []) if r["name"] == "web"), {})
            return web.get("last_exit")

        try:
            last = wait_for(web_last_exit, timeout=40, interval=0.2, what="web exit")
        finally:
            daemon.terminate()
            _, err = daemon.communicate(timeout=40)
    assert last == (
        f"exited 1: cannot listen on 127.0.0.1:{port} (web.host, web.port):"
        " Address already in use"
    )
    assert "Traceback" not in err.decode()
