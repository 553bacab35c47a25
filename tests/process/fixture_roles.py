"""Fixture roles for supervisor process tests, and the harness that runs them.

    python -m tests.process.fixture_roles supervise -c CFG   # the real supervisor
    python -m tests.process.fixture_roles child ROLE -c CFG  # one fixture child

A fixture child behaves like a real role (daemon.runtime: die_with_parent,
Heartbeat) and is steered by files in $FIXTURE_CONTROL_DIR named
``<role>.<action>`` (role with ':' and '#' as '-'; ``all.<action>`` hits every
role):

- crash:       exit 1 at start            - exit2:   exit 2 (config error) at start
- hang:        stop beating, stay alive   - grow:    allocate ~100 MB, keep beating
- task:        report a task started at the file's mtime (hard-limit tests)
- ignore_term: ignore SIGTERM

A file holding a pid applies to that process only (its replacement starts
healthy); an empty one to every process of the role.

It appends ``START role pid`` / ``STOP role pid`` to ``events.log`` there
(circus's marker-file child). With $FIXTURE_WEB_PORT the web role holds that
TCP port, like the real webhook listener.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from daemon import config as config_mod
from daemon import runtime
from daemon import status as status_mod
from daemon.supervision.child import RoleSpec
from tests.helpers import merge
from tests.helpers import wait_for

ALL_ROLES = (
    "web,worker:default,worker:messages#1,worker:retry,worker:verification,scheduler"
)
REPO_ROOT = Path(__file__).resolve().parents[2]

# Fast settings: every policy number shrunk so tests run in seconds.
FAST = {
    "daemon": {"stop_timeout_s": 3.0, "log_level": "info"},
    "supervisor": {
        "heartbeat_interval_s": 0.1,
        "heartbeat_timeout_s": 3.0,
        "check_interval_s": 0.2,
        "backoff_initial_s": 0.05,
        "backoff_max_s": 0.4,
        "healthy_after_s": 1.0,
        "crash_loop_exits": 4,
        "crash_loop_window_s": 30.0,
        "fatal_cooldown_s": 2.0,
        "start_timeout_s": 15.0,
    },
    "alerts": {"down_after_s": 60.0},
}


def safe(role: str) -> str:
    return role.replace(":", "-").replace("#", "-")


def fixture_roles(cfg, config_path: str) -> list[RoleSpec]:
    """Supervisor role factory: fixture children instead of the real roles."""
    names = os.environ.get("FIXTURE_ROLES", ALL_ROLES).split(",")
    tail = ("-c", config_path) if config_path else ()
    base = (sys.executable, "-m", "tests.process.fixture_roles", "child")
    return [RoleSpec(name, base + (name,) + tail) for name in names]


# ------------------------------------------------------------------ the child


class FixtureChild:
    def __init__(self, role: str, cfg):
        self.role = role
        self.control = Path(os.environ["FIXTURE_CONTROL_DIR"])
        self.interval = cfg.supervisor.heartbeat_interval_s
        self.stop_requested = False
        self.ballast = None
        self.listener = None

    def flag(self, action: str) -> Path | None:
        """The control file for `action` if it applies to this process.

        An empty file applies to every process of the role; one holding a
        pid only to that process (so its replacement starts healthy).
        """
        for name in (safe(self.role), "all"):
            path = self.control / f"{name}.{action}"
            try:
                target = path.read_text().strip()
            except FileNotFoundError:
                continue
            if not target or target == str(os.getpid()):
                return path
        return None

    def event(self, what: str) -> None:
        with open(self.control / "events.log", "a") as f:
            f.write(f"{what} {self.role} {os.getpid()}\n")

    def on_term(self, signum, frame) -> None:
        self.stop_requested = True

    def run(self) -> int:
        runtime.die_with_parent()
        self.event("START")
        if self.flag("exit2"):
            return 2
        if self.flag("crash"):
            return 1
        if self.flag("ignore_term"):
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        else:
            signal.signal(signal.SIGTERM, self.on_term)
        port = os.environ.get("FIXTURE_WEB_PORT")
        if port and self.role == "web":
            import socket

            self.listener = socket.create_server(("127.0.0.1", int(port)))
        heartbeat = runtime.Heartbeat.from_env()
        while not self.stop_requested:
            task = self.flag("task")
            if self.flag("grow") and self.ballast is None:
                self.ballast = bytearray(b"\1") * (100 * 1_048_576)
            if heartbeat and not self.flag("hang"):
                started = task.stat().st_mtime if task else None
                heartbeat.beat(started, 1 if task else 0)
            time.sleep(self.interval)
        self.event("STOP")
        return 0


# ---------------------------------------------------------------- the harness


class FixtureDaemon:
    """A real supervisor process over fixture children, driven by a test."""

    def __init__(
        self,
        tmp_path: Path,
        make_config,
        extra: dict | None = None,
        roles: str = ALL_ROLES,
    ):
        self.control = tmp_path / "control"
        self.control.mkdir(exist_ok=True)
        # sun_path holds 107 bytes; pytest's tmp_path can be longer.
        sock_dir = tempfile.mkdtemp(prefix="cdsup", dir="/tmp")
        self.socket_path = Path(sock_dir) / "s.sock"
        data = merge(FAST, {"status": {"socket": str(self.socket_path)}})
        self.cfg = make_config("sqlite", merge(data, extra or {}))
        self.roles = roles
        self.proc: subprocess.Popen | None = None
        self.env: dict[str, str] = {}

    def command(self) -> list[str]:
        """The argv of this daemon's supervisor."""
        return [
            sys.executable,
            "-m",
            "tests.process.fixture_roles",
            "supervise",
            "-c",
            self.cfg.source,
        ]

    def start(
        self,
        env: dict | None = None,
        wait_running: bool = True,
        log_path: Path | None = None,
    ):
        self.env = {
            **os.environ,
            "PYTHONPATH": str(REPO_ROOT),
            "FIXTURE_CONTROL_DIR": str(self.control),
            "FIXTURE_ROLES": self.roles,
            **(env or {}),
        }
        self.env.pop("CAMPAIGND_CONFIG", None)
        for key in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
            if env is None or key not in env:
                self.env.pop(key, None)
        # The daemon's log (every process writes to the supervisor's
        # stderr), for a test that reads it; else the test's output.
        with contextlib.ExitStack() as files:
            log = None if log_path is None else files.enter_context(log_path.open("ab"))
            self.proc = subprocess.Popen(
                self.command(), env=self.env, cwd=REPO_ROOT, stderr=log
            )
        if wait_running:
            self.wait_all_running()
        return self

    # -- observing

    def status(self) -> dict:
        return status_mod.request(self.socket_path, {"cmd": "status"})

    def request(self, payload: dict) -> dict:
        return status_mod.request(self.socket_path, payload)

    def role(self, name: str) -> dict:
        return next(r for r in self.status()["roles"] if r["name"] == name)

    def try_status(self) -> dict | None:
        try:
            return self.status()
        except (OSError, ValueError):
            return None

    def wait_role(self, name: str, predicate, timeout: float = 10.0, what=""):
        def check():
            answer = self.try_status()
            if answer is None:
                return None
            role = next(r for r in answer["roles"] if r["name"] == name)
            return role if predicate(role) else None

        return wait_for(check, timeout=timeout, interval=0.02, what=what or name)

    def wait_all_running(self, timeout: float = 30.0) -> dict:
        def check():
            answer = self.try_status()
            if answer and all(r["state"] == "RUNNING" for r in answer["roles"]):
                return answer
            return None

        return wait_for(check, timeout=timeout, what="every role RUNNING")

    def events(self) -> list[tuple[str, str, int]]:
        path = self.control / "events.log"
        if not path.exists():
            return []
        out = []
        for line in path.read_text().splitlines():
            what, role, pid = line.split()
            out.append((what, role, int(pid)))
        return out

    def child_pids(self) -> set[int]:
        return {pid for what, _, pid in self.events() if what == "START"}

    def live_children(self) -> list[int]:
        """Pids of fixture children that still exist (orphans after a stop)."""
        alive = []
        for pid in self.child_pids():
            try:
                proc = psutil.Process(pid)
                if "fixture_roles" in " ".join(proc.cmdline()):
                    if proc.status() != psutil.STATUS_ZOMBIE:
                        alive.append(pid)
            except psutil.Error:
                continue
        return alive

    # -- steering

    def set_flag(self, role: str, action: str, pid: int | None = None) -> Path:
        """Steer a role (or only its process `pid`)."""
        path = self.control / f"{safe(role)}.{action}"
        path.write_text(str(pid) if pid else "")
        return path

    def clear_flag(self, role: str, action: str) -> None:
        (self.control / f"{safe(role)}.{action}").unlink(missing_ok=True)

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait_exit(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    def close(self) -> None:
        """Tear down whatever is left (test failed half-way)."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pid in self.live_children():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.socket_path.unlink(missing_ok=True)
        try:
            self.socket_path.parent.rmdir()
        except OSError:
            pass


class AlertReceiver:
    """A local HTTP server that keeps every JSON body POSTed to it."""

    def __init__(self):
        import http.server
        import json
        import threading

        received = self.received = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                length = int(self.headers.get("Content-Length", 0))
                received.append(json.loads(self.rfile.read(length)))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/alert"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def wait_for(self, key_part: str, status: str, timeout: float = 10.0) -> dict:
        def find():
            return next(
                (
                    b
                    for b in list(self.received)
                    if key_part in b["key"] and b["status"] == status
                ),
                None,
            )

        return wait_for(find, timeout=timeout, what=f"{status} alert {key_part}")


# ---------------------------------------------------------------- entry point


def main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="fixture_roles")
    parser.add_argument("mode", choices=("supervise", "child"))
    parser.add_argument("role", nargs="?")
    parser.add_argument("-c", "--config")
    args = parser.parse_args(argv)
    cfg = config_mod.load(args.config)
    if args.mode == "supervise":
        from daemon.cli import supervisor_hooks
        from daemon.supervision import supervisor

        return supervisor.main(cfg, roles=fixture_roles, hooks=supervisor_hooks())
    return FixtureChild(args.role, cfg).run()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
