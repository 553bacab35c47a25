"""The warm spare with the real roles: it takes a killed role, is replaced,
is itself replaced when killed, and dies with the supervisor."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pytest

from daemon import status as status_mod
from daemon.testing import alive
from tests.helpers import free_port
from tests.helpers import require
from tests.helpers import subprocess_env
from tests.helpers import wait_for

# Real processes: each test takes several seconds.
pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[2]
ROLE_MODULES = ("daemon.roles.web.app", "daemon.roles.worker", "daemon.roles.scheduler")
MISSING = [m for m in ROLE_MODULES if importlib.util.find_spec(m) is None]


@pytest.fixture(autouse=True)
def _real_roles():
    require(not MISSING, f"real roles not written yet: {', '.join(MISSING)}")


def answer(sock: Path) -> dict | None:
    try:
        return status_mod.request(sock, {"cmd": "status", "figures": False})
    except (OSError, ValueError):
        return None


def ready_spare(sock: Path, not_pid: int | None = None):
    """The status answer once every role runs and a (new) spare is ready."""
    a = answer(sock)
    if not a or not all(r["state"] == "RUNNING" for r in a["roles"]):
        return None
    spare = a["spare"]
    if spare["state"] != "ready" or spare["pid"] in (None, not_pid):
        return None
    return a


def role(a: dict, name: str) -> dict:
    return next(r for r in a["roles"] if r["name"] == name)


@pytest.mark.timeout(150)
def test_spare_takes_a_killed_role_and_is_replaced(make_config):
    """Verify: SIGKILLed worker -> the spare's pid runs it (RUNNING) and a new
    spare appears; SIGKILLed spare -> a new one, roles untouched; SIGTERM of
    the supervisor leaves no process behind, the spare included."""
    sock = Path(tempfile.mkdtemp(prefix="cdspare", dir="/tmp")) / "s.sock"
    cfg = make_config(
        "sqlite",
        {
            "web": {"port": free_port()},
            "status": {"socket": str(sock)},
            "daemon": {"stop_timeout_s": 10.0},
            "supervisor": {"heartbeat_interval_s": 0.2, "check_interval_s": 0.5},
        },
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "daemon", "run", "-c", cfg.source],
        cwd=REPO_ROOT,
        env=subprocess_env(),
    )
    try:
        a = wait_for(lambda: ready_spare(sock), timeout=60, what="roles + spare")
        spare_pid = a["spare"]["pid"]
        spare = psutil.Process(spare_pid)
        assert spare.ppid() == proc.pid
        assert "--standby" in spare.cmdline()
        assert spare.name() == "cd-spare"
        assert spare_pid not in [r["pid"] for r in a["roles"]]

        # A killed worker is replaced by the spare's very process.
        name = "worker:messages#1"
        os.kill(role(a, name)["pid"], signal.SIGKILL)
        a = wait_for(
            lambda: ready_spare(sock, not_pid=spare_pid),
            timeout=60,
            what="role back on the spare, and a new spare",
        )
        assert role(a, name)["pid"] == spare_pid
        assert a["spare"]["roles_taken"] == 1
        adopted = psutil.Process(spare_pid)
        assert adopted.name() == "cd-w-msg#1"
        argv = adopted.cmdline()
        assert argv[argv.index("child") + 1] == name  # what `ps` shows
        roles_before = {r["name"]: r["pid"] for r in a["roles"]}

        # A killed spare is simply replaced; no role moves.
        second = a["spare"]["pid"]
        os.kill(second, signal.SIGKILL)
        a = wait_for(
            lambda: ready_spare(sock, not_pid=second),
            timeout=60,
            what="a spare after the spare was killed",
        )
        assert {r["name"]: r["pid"] for r in a["roles"]} == roles_before
        assert a["spare"]["roles_taken"] == 1

        tree = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
        assert a["spare"]["pid"] in tree
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert alive(tree) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        sock.unlink(missing_ok=True)


@pytest.mark.timeout(150)
def test_reload_replaces_the_spare(make_config):
    """Verify that SIGHUP kills the spare holding the old config, and that the
    roles replaced by the reload come up (on spares started after it)."""
    sock = Path(tempfile.mkdtemp(prefix="cdspare", dir="/tmp")) / "s.sock"
    cfg = make_config(
        "sqlite",
        {
            "web": {"port": free_port()},
            "status": {"socket": str(sock)},
            "daemon": {"stop_timeout_s": 10.0},
            "supervisor": {"heartbeat_interval_s": 0.2, "check_interval_s": 0.5},
        },
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "daemon", "run", "-c", cfg.source],
        cwd=REPO_ROOT,
        env=subprocess_env(),
    )
    try:
        a = wait_for(lambda: ready_spare(sock), timeout=60, what="roles + spare")
        old_spare = a["spare"]["pid"]
        old_roles = {r["pid"] for r in a["roles"]}
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: alive([old_spare]) == [], timeout=10, what="old spare gone")

        def reloaded():
            b = ready_spare(sock, not_pid=old_spare)
            if not b or b["daemon"]["state"] != "running":
                return None
            return b if not old_roles & {r["pid"] for r in b["roles"]} else None

        a = wait_for(reloaded, timeout=90, what="every role replaced, a new spare")
        assert a["spare"]["roles_taken"] >= 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        sock.unlink(missing_ok=True)
