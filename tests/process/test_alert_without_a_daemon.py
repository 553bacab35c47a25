"""Alerts when there is no running daemon to send them (issue 16).

A config error stops `campaignd run` with exit 2, which systemd does not
restart: the daemon says so through the alert channels before exiting, and
systemd's OnFailure unit runs `campaignd alert`, which reads only [alerts].
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import run_cli
from tests.process.fixture_roles import AlertReceiver

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

ROOT = Path(__file__).resolve().parents[2]


def campaignd(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return run_cli(*args, cwd=cwd, timeout=40)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_a_config_error_at_start_is_alerted_before_exit_2(tmp_path):
    with AlertReceiver() as receiver:
        cfg = write(
            tmp_path / "bad.toml",
            f'[daemon]\ndata_dir = "{tmp_path / "data"}"\n'
            '[web]\nport = "eighty"\n'
            f'[alerts]\nwebhook_url = "{receiver.url}"\n',
        )
        done = campaignd("run", "-c", str(cfg), cwd=tmp_path)
        assert done.returncode == 2, done.stderr
        assert "web.port" in done.stderr
        alert = receiver.wait_for("daemon:config_error", "raised", timeout=5)
        assert "campaignd cannot start" in alert["message"]
        assert "web.port" in alert["message"]


def test_campaignd_alert_reaches_the_webhook_and_the_command(tmp_path):
    out = tmp_path / "alert.out"
    with AlertReceiver() as receiver:
        cfg = write(
            tmp_path / "c.toml",
            # The rest of the file is broken: [alerts] alone is read.
            "[nonsense]\nx = 1\n"
            f'[alerts]\nwebhook_url = "{receiver.url}"\n'
            'command = "echo $CAMPAIGND_ALERT_STATUS $CAMPAIGND_ALERT_KEY'
            f' > {out}"\n',
        )
        done = campaignd(
            "alert",
            "-c",
            str(cfg),
            "--key",
            "unit_failed:x",
            "x failed",
            cwd=tmp_path,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        body = receiver.wait_for("unit_failed:x", "raised", timeout=5)
        assert body["message"] == "x failed" and body["severity"] == "critical"
        assert out.read_text().split() == ["raised", "unit_failed:x"]

        done = campaignd(
            "alert",
            "-c",
            str(cfg),
            "--key",
            "unit_failed:x",
            "--resolved",
            "ok",
            cwd=tmp_path,
        )
        assert done.returncode == 0
        receiver.wait_for("unit_failed:x", "resolved", timeout=5)


def test_campaignd_alert_without_a_channel_or_with_a_dead_one(tmp_path):
    none = write(tmp_path / "none.toml", "[alerts]\n")
    done = campaignd("alert", "-c", str(none), "hello", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().endswith(
        "alerts: no channel configured (alerts.webhook_url, alerts.command)"
    )
    dead = write(tmp_path / "dead.toml", '[alerts]\ncommand = "exit 3"\n')
    done = campaignd("alert", "-c", str(dead), "hello", cwd=tmp_path)
    assert done.returncode == 1
    assert "alert not delivered: command failed" in done.stderr


def test_the_units_are_valid_and_wired(tmp_path):
    service = (ROOT / "systemd/campaignd.service").read_text()
    assert "OnFailure=campaignd-alert@%n.service" in service
    # The in-flight records in RuntimeDirectory outlive a crash's restart.
    assert "\nRuntimeDirectoryPreserve=restart\n" in service
    alert_unit = (ROOT / "systemd/campaignd-alert@.service").read_text()
    # Its command line is one our CLI accepts.
    exec_line = next(
        line
        for line in alert_unit.replace("\\\n", " ").splitlines()
        if line.startswith("ExecStart=")
    )
    import shlex

    from daemon.cli import build_parser

    argv = shlex.split(exec_line.removeprefix("ExecStart="))
    assert argv[0] == "/usr/local/bin/campaignd"
    args = build_parser().parse_args(argv[1:])
    assert args.command == "alert" and args.key == "unit_failed:%i"
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    binary = shutil.which("campaignd") or str(Path(sys.executable).parent / "campaignd")
    for name in ("campaignd.service", "campaignd-alert@.service"):
        text = (ROOT / "systemd" / name).read_text()
        write(tmp_path / name, text.replace("/usr/local/bin/campaignd", binary))
    done = subprocess.run(
        [analyze, "verify", "campaignd.service", "campaignd-alert@.service"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
    )
    assert (done.stdout + done.stderr).strip() == "", done.stdout + done.stderr
