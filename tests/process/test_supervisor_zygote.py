"""The zygote with the real roles: it forks every role, forks the respawn of
a killed one, is itself re-exec'd when killed, is replaced on reload, dies
with the supervisor; and a daemon whose zygote cannot start still runs and
serves, every role exec'd."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
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
# The supervisor as `campaignd run` starts it, with a zygote command that
# dies at once (an import that fails, a broken install).
BROKEN_ZYGOTE_RUN = """
import sys
from daemon import config
from daemon.cli import supervisor_hooks
from daemon.supervision import supervisor

cfg = config.load(sys.argv[1])
broken = lambda cfg, path: (sys.executable, "-c", "raise SystemExit(3)")
sys.exit(supervisor.main(cfg, hooks=supervisor_hooks(), zygote=broken))
"""

# A zygote that forks the first role it is asked for (a stand-in process
# whose argv shows `child ROLE`, as a forked role's does) and never answers,
# as a zygote hung between its fork and its answer would; once that is
# done (the marker file), it answers every order with an error, so the
# roles are exec'd.
MUTE_ZYGOTE = """
import json, os, socket, sys
marker = sys.argv[1]
channel = socket.socket(fileno=os.dup(0))
channel.sendall(b"ready\\n")
for line in channel.makefile("rb"):
    role = json.loads(line)["role"]
    if os.path.exists(marker):
        channel.sendall(b'{"error": "test: exec it"}\\n')
        continue
    open(marker, "w").close()
    if os.fork() == 0:
        if os.fork() == 0:
            os.setpgid(0, 0)
            idle = "import signal; signal.pause()"
            os.execv(sys.executable, [sys.executable, "-c", idle, "child", role])
        os._exit(0)
    os.wait()
"""
MUTE_ZYGOTE_RUN = """
import sys
from daemon import config
from daemon.cli import supervisor_hooks
from daemon.supervision import supervisor

cfg = config.load(sys.argv[1])
mute = lambda cfg, path: (sys.executable, "-c", sys.argv[2], sys.argv[3])
sys.exit(supervisor.main(cfg, hooks=supervisor_hooks(), zygote=mute))
"""


@pytest.fixture(autouse=True)
def _real_roles():
    require(not MISSING, f"real roles not written yet: {', '.join(MISSING)}")


def answer(sock: Path) -> dict | None:
    try:
        return status_mod.request(sock, {"cmd": "status", "figures": False})
    except (OSError, ValueError):
        return None


def all_running(sock: Path) -> dict | None:
    a = answer(sock)
    if a and a["roles"] and all(r["state"] == "RUNNING" for r in a["roles"]):
        return a
    return None


def ready_zygote(sock: Path, not_pid: int | None = None):
    """The status answer once every role runs and a (new) zygote is ready."""
    a = all_running(sock)
    if not a:
        return None
    zygote = a["zygote"]
    if zygote["state"] != "ready" or zygote["pid"] in (None, not_pid):
        return None
    return a


def role(a: dict, name: str) -> dict:
    return next(r for r in a["roles"] if r["name"] == name)


def daemon_config(make_config, sock: Path, port: int, **workers):
    return make_config(
        "sqlite",
        {
            "web": {"port": port},
            "status": {"socket": str(sock)},
            "daemon": {"stop_timeout_s": 10.0},
            "supervisor": {"heartbeat_interval_s": 0.2, "check_interval_s": 0.5},
            "workers": workers,
        },
    )


@contextlib.contextmanager
def running(sock: Path, argv: list[str]):
    """The daemon started with `argv`, killed if the test leaves it running."""
    proc = subprocess.Popen(argv, cwd=REPO_ROOT, env=subprocess_env())
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        sock.unlink(missing_ok=True)


def stop_cleanly(proc: subprocess.Popen, tree: list[int]) -> None:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    assert alive(tree) == []


@pytest.mark.timeout(150)
def test_zygote_forks_every_role_and_their_respawns(make_config):
    """Verify: every role is a child of the supervisor in its own process
    group, forked (its pages shared: PSS well under RSS); a SIGKILLed worker
    comes back forked by the same zygote; a SIGKILLed zygote is re-exec'd and
    no role moves; SIGTERM of the supervisor leaves no process behind."""
    sock = Path(tempfile.mkdtemp(prefix="cdzyg", dir="/tmp")) / "s.sock"
    cfg = daemon_config(make_config, sock, free_port())
    with running(
        sock, [sys.executable, "-m", "daemon", "run", "-c", cfg.source]
    ) as proc:
        a = wait_for(lambda: ready_zygote(sock), timeout=60, what="roles + zygote")
        zygote_pid = a["zygote"]["pid"]
        zygote = psutil.Process(zygote_pid)
        assert zygote.ppid() == proc.pid
        assert "--zygote" in zygote.cmdline()
        assert zygote.name() == "cd-zygote"
        # The first zygote is forked by the supervisor, which then shares
        # its imports with every role instead of holding them alone.
        assert a["zygote"]["started"] == "forked by the supervisor"
        supervisor = psutil.Process(proc.pid).memory_full_info()
        assert supervisor.pss < 0.75 * supervisor.rss, supervisor
        assert a["zygote"]["roles_forked"] == len(a["roles"])
        for r in a["roles"]:
            p = psutil.Process(r["pid"])
            assert p.ppid() == proc.pid, r["name"]  # re-parented to the supervisor
            assert os.getpgid(r["pid"]) == r["pid"], r["name"]
            argv = p.cmdline()
            assert argv[argv.index("child") + 1] == r["name"]  # what `ps` shows
            memory = p.memory_full_info()
            assert memory.pss < 0.75 * memory.rss, (r["name"], memory)

        # A killed worker is forked again by the same zygote.
        name = "worker:messages#1"
        old_pid = role(a, name)["pid"]
        os.kill(old_pid, signal.SIGKILL)

        def respawned():
            b = ready_zygote(sock)
            return b if b and role(b, name)["pid"] != old_pid else None

        a = wait_for(respawned, timeout=60, what="role back, forked")
        assert a["zygote"]["pid"] == zygote_pid
        assert a["zygote"]["roles_forked"] == len(a["roles"]) + 1
        assert role(a, name)["restarts"] == 1
        adopted = psutil.Process(role(a, name)["pid"])
        assert adopted.name() == "cd-w-msg#1"
        assert adopted.ppid() == proc.pid
        roles_before = {r["name"]: r["pid"] for r in a["roles"]}

        # A killed zygote is re-exec'd; no role moves.
        os.kill(zygote_pid, signal.SIGKILL)
        a = wait_for(
            lambda: ready_zygote(sock, not_pid=zygote_pid),
            timeout=60,
            what="a zygote after the zygote was killed",
        )
        assert {r["name"]: r["pid"] for r in a["roles"]} == roles_before
        assert "SIGKILL" in (a["zygote"]["last_exit"] or "")
        assert a["zygote"]["started"] == "exec'd"

        tree = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
        assert a["zygote"]["pid"] in tree
        stop_cleanly(proc, tree)


@pytest.mark.timeout(150)
def test_reload_replaces_the_zygote(make_config):
    """Verify that SIGHUP kills the zygote holding the old config, and that
    every role is replaced and comes up, then forked by the new zygote."""
    sock = Path(tempfile.mkdtemp(prefix="cdzyg", dir="/tmp")) / "s.sock"
    cfg = daemon_config(make_config, sock, free_port())
    with running(
        sock, [sys.executable, "-m", "daemon", "run", "-c", cfg.source]
    ) as proc:
        a = wait_for(lambda: ready_zygote(sock), timeout=60, what="roles + zygote")
        old_zygote = a["zygote"]["pid"]
        old_roles = {r["pid"] for r in a["roles"]}
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: alive([old_zygote]) == [], timeout=10, what="old zygote gone")

        def reloaded():
            b = ready_zygote(sock, not_pid=old_zygote)
            if not b or b["daemon"]["state"] != "running":
                return None
            return b if not old_roles & {r["pid"] for r in b["roles"]} else None

        a = wait_for(reloaded, timeout=90, what="every role replaced, a new zygote")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


@pytest.mark.timeout(150)
def test_daemon_runs_and_serves_when_the_zygote_cannot_start(make_config):
    """Verify that with a zygote that exits at start the roles are exec'd,
    every one RUNNING, the web role answers, status says why there is no
    zygote, a killed worker is respawned, and SIGTERM stops everything.
    (With workers.shared_background = false: one role per queue.)"""
    sock = Path(tempfile.mkdtemp(prefix="cdzyg", dir="/tmp")) / "s.sock"
    port = free_port()
    cfg = daemon_config(make_config, sock, port, shared_background=False)
    with running(sock, [sys.executable, "-c", BROKEN_ZYGOTE_RUN, cfg.source]) as proc:
        a = wait_for(lambda: all_running(sock), timeout=60, what="every role")
        assert [r["name"] for r in a["roles"]] == [
            "web",
            "worker:default",
            "worker:messages#1",
            "worker:messages#2",
            "worker:retry",
            "worker:verification",
            "scheduler",
        ]
        for r in a["roles"]:
            assert psutil.Process(r["pid"]).ppid() == proc.pid, r["name"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
            assert r.status == 200
        zygote = wait_for(
            lambda: (answer(sock) or {}).get("zygote", {}).get("last_exit"),
            timeout=30,
            what="the zygote's exit in status",
        )
        assert "exited 3" in zygote
        assert answer(sock)["zygote"]["roles_forked"] == 0

        name = "worker:default"
        old_pid = role(a, name)["pid"]
        os.kill(old_pid, signal.SIGKILL)

        def respawned():
            b = all_running(sock)
            return b if b and role(b, name)["pid"] != old_pid else None

        a = wait_for(respawned, timeout=60, what="worker respawned by exec")
        tree = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
        stop_cleanly(proc, tree)


@pytest.mark.timeout(150)
def test_a_role_forked_without_an_answer_is_killed(make_config, tmp_path):
    """Verify that when the zygote forks a role and its answer never comes,
    the role is exec'd and the forked copy, which nobody tracks, is SIGKILLed:
    one process per role, every one the supervisor's."""
    sock = Path(tempfile.mkdtemp(prefix="cdzyg", dir="/tmp")) / "s.sock"
    cfg = daemon_config(make_config, sock, free_port())
    marker = tmp_path / "forked-once"
    argv = [sys.executable, "-c", MUTE_ZYGOTE_RUN, cfg.source, MUTE_ZYGOTE, str(marker)]
    with running(sock, argv) as proc:

        def stray() -> list[psutil.Process]:
            return [
                p
                for p in psutil.Process(proc.pid).children()
                if "import signal; signal.pause()" in p.cmdline()
            ]

        forked = wait_for(stray, timeout=30, what="the unanswered fork")
        a = wait_for(lambda: all_running(sock), timeout=60, what="every role")
        wait_for(lambda: not alive([p.pid for p in forked]), timeout=30, what="killed")
        tracked = {r["pid"] for r in a["roles"]}
        for r in a["roles"]:
            assert psutil.Process(r["pid"]).ppid() == proc.pid, r["name"]
        others = {
            p.pid for p in psutil.Process(proc.pid).children() if p.pid not in tracked
        }
        assert others <= {a["zygote"]["pid"]}, others
        tree = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
        stop_cleanly(proc, tree)


# The zygote's body with a role that reports its garbage collector.
GC_REPORTING_ZYGOTE = """
import gc, json, sys
from daemon import config
from daemon.supervision.zygote import serve

cfg = config.load(sys.argv[1])

def run_role(cfg, role):
    with open(sys.argv[2], "w") as out:
        seen = {"enabled": gc.isenabled(), "frozen": gc.get_freeze_count()}
        json.dump(dict(seen, role=role), out)
    return 0

sys.exit(serve(cfg, run_role, ("daemon.roles.worker",)))
"""


@pytest.mark.timeout(60)
def test_a_forked_role_collects_garbage_and_leaves_the_shared_imports_alone(
    make_config, tmp_path
):
    """Verify that the zygote imports with the collector off and freezes what
    it imported, and that the role it forks has the collector on again (a
    role without it would never free a reference cycle)."""
    cfg = make_config("sqlite")
    report = tmp_path / "gc.json"
    ours, theirs = socket.socketpair()
    env = {k: v for k, v in subprocess_env().items() if k != "CAMPAIGND_SUPERVISOR_PID"}
    argv = [sys.executable, "-c", GC_REPORTING_ZYGOTE, cfg.source, str(report)]
    zygote = subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stdin=theirs)
    theirs.close()
    try:
        ours.settimeout(30)
        reader = ours.makefile("rb")
        assert reader.readline() == b"ready\n"
        order = {"role": "worker:background", "heartbeat": str(tmp_path / "beat")}
        ours.sendall(json.dumps(order).encode() + b"\n")
        assert "pid" in json.loads(reader.readline())
        wait_for(
            lambda: report.exists() and report.stat().st_size, 20, what="the report"
        )
        seen = json.loads(report.read_text())
        assert seen["role"] == "worker:background"
        assert seen["enabled"] is True
        # Everything the zygote imported (thousands of objects) is frozen.
        assert seen["frozen"] > 10_000
        reader.close()
        ours.close()  # EOF: the zygote exits
        assert zygote.wait(timeout=20) == 0
    finally:
        ours.close()
        if zygote.poll() is None:
            zygote.kill()
            zygote.wait()
