"""Where the config, the data and the status socket are found by default."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from daemon import config as config_mod
from tests.helpers import run_cli

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]


def campaignd(*args: str, cwd: Path, env_extra=None) -> subprocess.CompletedProcess:
    return run_cli(*args, cwd=cwd, env_extra=env_extra, timeout=40)


def port_of(check_config_output: str) -> int:
    line = next(x for x in check_config_output.splitlines() if x.startswith("port ="))
    return int(line.split("=")[1])


def test_search_order_flag_then_env_then_the_current_directory(tmp_path):
    (tmp_path / "campaignd.toml").write_text("[web]\nport = 8101\n")
    (tmp_path / "env.toml").write_text("[web]\nport = 8102\n")
    (tmp_path / "flag.toml").write_text("[web]\nport = 8103\n")
    found = campaignd("check-config", cwd=tmp_path)
    assert found.returncode == 0, found.stderr
    assert port_of(found.stdout) == 8101
    env = {"CAMPAIGND_CONFIG": str(tmp_path / "env.toml")}
    assert (
        port_of(campaignd("check-config", cwd=tmp_path, env_extra=env).stdout) == 8102
    )
    # -c wins, before or after the subcommand.
    for argv in (
        ("-c", "flag.toml", "check-config"),
        ("check-config", "-c", "flag.toml"),
    ):
        done = campaignd(*argv, cwd=tmp_path, env_extra=env)
        assert done.returncode == 0, done.stderr
        assert port_of(done.stdout) == 8103


def test_under_systemd_data_and_socket_follow_the_unit(tmp_path):
    env = {
        "STATE_DIRECTORY": f"{tmp_path / 'state'}:{tmp_path / 'other'}",
        "RUNTIME_DIRECTORY": str(tmp_path / "run"),
    }
    cfg = config_mod.from_dict({}, env=env)
    assert cfg.data_path == tmp_path / "state"
    assert cfg.status_socket == tmp_path / "run" / "campaignd.sock"
    # What the file says wins.
    cfg = config_mod.from_dict(
        {
            "daemon": {"data_dir": str(tmp_path / "mine")},
            "status": {"socket": "/x.sock"},
        },
        env=env,
    )
    assert cfg.data_path == tmp_path / "mine"
    assert str(cfg.status_socket) == "/x.sock"
    # Without systemd: the documented defaults.
    cfg = config_mod.from_dict({}, env={})
    assert cfg.status_socket == cfg.data_path / "campaignd.sock"


def test_a_relative_data_dir_with_no_database_yet_is_announced(tmp_path):
    (tmp_path / "c.toml").write_text('[daemon]\ndata_dir = "data"\n')
    first = campaignd("contacts", "list", "-c", "c.toml", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert first.stderr.strip() == (
        f"campaignd: created a new database at {tmp_path / 'data' / 'campaignd.db'}"
        " (daemon.data_dir is relative to the current directory)"
    )
    again = campaignd("contacts", "list", "-c", "c.toml", cwd=tmp_path)
    assert again.stderr == ""
    # An absolute data_dir is what the operator meant: nothing to announce.
    (tmp_path / "abs.toml").write_text(f'[daemon]\ndata_dir = "{tmp_path / "abs"}"\n')
    done = campaignd("contacts", "list", "-c", "abs.toml", cwd=tmp_path)
    assert done.returncode == 0 and done.stderr == ""
