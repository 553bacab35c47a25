"""The real `campaignd run` with the real roles: up, heal, release leases, stop."""

from __future__ import annotations

import datetime as dt
import importlib.util
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

import psutil
import pytest

from daemon import status as status_mod
from daemon.store.db import open_database
from daemon.store.models import Campaign
from daemon.store.models import Contact
from daemon.store.models import Message
from daemon.store.models import utcnow
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


def all_running(sock: Path):
    try:
        answer = status_mod.request(sock, {"cmd": "status"})
    except (OSError, ValueError):
        return None
    roles = answer["roles"]
    return answer if roles and all(r["state"] == "RUNNING" for r in roles) else None


def tree(pid: int) -> set[int]:
    try:
        return {p.pid for p in psutil.Process(pid).children(recursive=True)}
    except psutil.NoSuchProcess:
        return set()


def leased_message(worker_pid: int) -> int:
    """A message row leased by `worker_pid`, as if it died after claiming it
    and before writing the request (no in-flight record)."""
    campaign = Campaign.create(name="t", message1="a", message2="b")
    contact = Contact.create(phone="+33600000001")
    message = Message.create(
        campaign=campaign,
        contact=contact,
        kind=1,
        phone=contact.phone,
        body="a",
        status="sending",
        idempotency_key="t-1",
        lease_owner=f"{socket.gethostname()}:{worker_pid}:0a1b2c3d",
        lease_expires_at=utcnow() + dt.timedelta(hours=1),
    )
    return message.id


@pytest.mark.timeout(120)
def test_real_daemon_heals_releases_leases_and_stops(make_config, capfd):
    """Verify the real tree: all RUNNING, /healthz, SIGKILL heals, leases of a
    killed worker released at once, SIGTERM stops everything (no orphan)."""
    port = free_port()
    sock = Path(tempfile.mkdtemp(prefix="cdreal", dir="/tmp")) / "s.sock"
    cfg = make_config(
        "sqlite",
        {
            "web": {"port": port},
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
        answer = wait_for(lambda: all_running(sock), timeout=60, what="all RUNNING")
        names = [r["name"] for r in answer["roles"]]
        assert names == [
            "web",
            "worker:background",
            "worker:messages#1",
            "worker:messages#2",
            "scheduler",
        ]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
            assert r.status == 200

        db = open_database(cfg)
        worker = next(r for r in answer["roles"] if r["name"] == "worker:messages#1")
        with db.connection_context():
            message_id = leased_message(worker["pid"])
        for name in ("web", "worker:messages#1"):
            old = next(r["pid"] for r in answer["roles"] if r["name"] == name)
            os.kill(old, signal.SIGKILL)
            wait_for(
                lambda o=old: (
                    (a := all_running(sock)) and all(r["pid"] != o for r in a["roles"])
                ),
                timeout=30,
                what=f"{name} back",
            )

        def released():
            # It never left: queued again at once, not left to lease expiry.
            with db.connection_context():
                row = Message.get_by_id(message_id)
                return row.status == "queued" and row.lease_owner is None

        wait_for(released, timeout=10, what="the dead worker's lease released")
        db.close()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
            assert r.status == 200

        children = tree(proc.pid)
        assert len(children) >= len(names) + 1  # the roles and the zygote
        capfd.readouterr()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        # Within the stop timeout: no role had to be SIGKILLed at the deadline.
        err = capfd.readouterr().err
        assert not re.search(r"(web|worker:\S+|scheduler): SIGKILL pid", err), err
        assert [
            p
            for p in children
            if psutil.pid_exists(p)
            and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
        ] == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        sock.unlink(missing_ok=True)


@pytest.mark.timeout(120)
def test_a_first_start_and_stop_log_no_error(make_config, tmp_path):
    """A fresh install's first start (no data dir yet) and a clean stop say
    nothing at ERROR: an error there is what an operator reads in the
    journal on day one (the supervisor's metrics were written before their
    directory existed, and kept out of /metrics)."""
    sock = Path(tempfile.mkdtemp(prefix="cdfirst", dir="/tmp")) / "s.sock"
    data_dir = tmp_path / "fresh" / "data"
    cfg = make_config(
        "sqlite",
        {
            "daemon": {"data_dir": str(data_dir)},
            "web": {"port": free_port()},
            "status": {"socket": str(sock)},
        },
    )
    assert not data_dir.exists()
    log_path = tmp_path / "daemon.log"
    with log_path.open("w") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "daemon", "run", "-c", cfg.source],
            cwd=REPO_ROOT,
            env=subprocess_env(),
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for(lambda: all_running(sock), timeout=60, what="all RUNNING")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        text = log_path.read_text()
        assert "stopped (exit code 0)" in text
        assert re.findall(r".* (?:ERROR|CRITICAL) .*|^Traceback.*", text, re.M) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        sock.unlink(missing_ok=True)
