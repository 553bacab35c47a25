"""The real daemon under test: `campaignd run` under a restart loop, its
config, and the small waits every end-to-end test and benchmark needs.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

from daemon import config as config_mod
from daemon import config_text

# The directory holding the `daemon` package (the repository, in a clone).
ROOT = Path(__file__).resolve().parents[2]
WEBHOOK_SECRET = "chaos-secret"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float, interval: float = 0.1, what: str = ""):
    """Poll `predicate` until truthy; AssertionError naming `what` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def write_config(workdir: Path, tables: dict) -> config_mod.Config:
    """Write `tables` as TOML in `workdir` and load it (the daemon reads the file)."""
    lines = []
    for table, values in tables.items():
        lines.append(f"[{table}]")
        lines += [f"{k} = {config_text.toml_value(v)}" for k, v in values.items()]
        lines.append("")
    path = Path(workdir) / "campaignd.toml"
    path.write_text("\n".join(lines))
    return config_mod.load(path)


def merge_tables(base: dict, extra: dict) -> dict:
    out = {table: dict(values) for table, values in base.items()}
    for table, values in extra.items():
        out.setdefault(table, {}).update(values)
    return out


def fast_tables(workdir: Path, provider_url: str, web_port: int) -> dict:
    """Settings that make a whole campaign (and its recovery) take seconds."""
    return {
        "daemon": {
            "data_dir": str(Path(workdir) / "data"),
            "log_level": "warning",
            "stop_timeout_s": 10.0,
        },
        "provider": {
            "base_url": provider_url,
            "timeout_s": 5.0,
            "connect_timeout_s": 2.0,
        },
        "web": {"port": web_port, "webhook_secret": WEBHOOK_SECRET},
        "pacing": {"per_minute": 0.0, "daily_cap": 0},
        "retry": {"base_s": 0.5, "cap_s": 5.0, "max_attempts": 8, "jitter": 0.1},
        # Leases outlive the hard limit by 30 s: a short limit makes the rows
        # of a worker killed together with its supervisor come back sooner.
        "workers": {"soft_time_limit_s": 10.0, "hard_time_limit_s": 20.0},
        "scheduler": {
            "sweep_s": 1.0,
            "check_expired_interactions_s": 1.0,
            "recover_interrupted_campaigns_s": 10.0,
            "system_health_check_s": 2.0,
            "leader_lease_s": 3.0,
        },
    }


class DaemonUnderTest:
    """`campaignd run` plus a restart loop standing in for systemd Restart=always.

    The loop starts the supervisor again `restart_delay_s` after any exit we
    did not ask for (systemd's RestartSec), and records each exit.
    """

    def __init__(
        self, cfg: config_mod.Config, workdir: Path, restart_delay_s: float = 5.0
    ):
        self.cfg = cfg
        self.workdir = Path(workdir)
        self.restart_delay_s = restart_delay_s
        self.log_path = self.workdir / "daemon.log"
        self.proc: subprocess.Popen | None = None
        self.exits: list[int] = []  # exit codes of supervisors we did not stop
        self.starts = 0
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._loop: threading.Thread | None = None

    # ------------------------------------------------------------- lifecycle

    def start(self) -> DaemonUnderTest:
        self._spawn()
        self._loop = threading.Thread(
            target=self._restart_loop, daemon=True, name="restart-loop"
        )
        self._loop.start()
        return self

    def _spawn(self) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the process
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("CAMPAIGND_CONFIG", "NOTIFY_SOCKET", "WATCHDOG_USEC")
        }
        proc = subprocess.Popen(
            [sys.executable, "-m", "daemon", "run", "-c", self.cfg.source],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env=env,
            start_new_session=True,
        )
        log.close()
        with self._lock:
            self.proc = proc
            self.starts += 1

    def _restart_loop(self) -> None:
        while not self._stopping.is_set():
            proc = self.proc
            code = proc.wait()
            if self._stopping.is_set():
                return
            self.exits.append(code)
            if self._stopping.wait(self.restart_delay_s):
                return
            self._spawn()

    def stop(self, timeout: float = 40.0) -> int | None:
        """SIGTERM the supervisor and wait; its exit code (None if killed)."""
        self._stopping.set()
        proc = self.proc
        if proc is None:
            return None
        code = None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._kill_tree(proc.pid)
                proc.wait(10)
        else:
            code = proc.returncode
        if self._loop is not None:
            self._loop.join(10)
        return code

    def close(self) -> None:
        """Make sure nothing of ours is left running (test teardown)."""
        self._stopping.set()
        proc = self.proc
        if proc is not None and proc.poll() is None:
            self._kill_tree(proc.pid)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)

    @staticmethod
    def _kill_tree(pid: int) -> None:
        try:
            parent = psutil.Process(pid)
            procs = parent.children(recursive=True) + [parent]
        except psutil.NoSuchProcess:
            return
        for p in procs:
            with contextlib.suppress(psutil.Error):
                p.kill()

    # --------------------------------------------------------------- looking

    @property
    def supervisor_pid(self) -> int | None:
        proc = self.proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def status(self, timeout: float = 3.0) -> dict | None:
        from daemon import status as status_mod

        try:
            return status_mod.request(
                self.cfg.status_socket, {"cmd": "status"}, timeout=timeout
            )
        except (OSError, ValueError):
            return None

    def all_running(self) -> dict | None:
        answer = self.status()
        roles = (answer or {}).get("roles") or []
        if roles and all(r.get("state") == "RUNNING" for r in roles):
            return answer
        return None

    def wait_ready(self, timeout: float = 60.0) -> dict:
        return wait_until(self.all_running, timeout, 0.1, "every role RUNNING")

    def children(self) -> list[int]:
        """Pids of the supervisor's live children (roles and the zygote)."""
        pid = self.supervisor_pid
        if pid is None:
            return []
        try:
            return [kid.pid for kid in psutil.Process(pid).children()]
        except psutil.NoSuchProcess:
            return []

    def running_roles(self) -> dict[int, str]:
        """pid -> role of the children the supervisor reports RUNNING.

        From the status socket, which names each role's pid. RUNNING means
        the child has beaten its heartbeat: one still starting has taken no
        work yet, so killing it proves nothing about the work.
        """
        answer = self.status(timeout=2.0) or {}
        kids = set(self.children())
        return {
            r["pid"]: r["name"]
            for r in answer.get("roles") or []
            if r.get("state") == "RUNNING" and r.get("pid") in kids
        }

    def kill_role(self, prefix: str, rng, roles: dict[int, str] | None = None):
        """SIGKILL one RUNNING child whose role starts with `prefix` (chosen by rng).

        (pid, role), or None when no child qualifies.
        """
        roles = self.running_roles() if roles is None else roles
        candidates = sorted(
            (pid, role) for pid, role in roles.items() if role.startswith(prefix)
        )
        if not candidates:
            return None
        pid, role = rng.choice(candidates)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return None
        return pid, role

    def kill_supervisor(self) -> list[int]:
        """SIGKILL the supervisor alone; its children's pids at that moment."""
        pid = self.supervisor_pid
        if pid is None:
            return []
        kids = self.children()
        os.kill(pid, signal.SIGKILL)
        return kids

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


def alive(pids) -> list[int]:
    """The pids among `pids` still running (zombies count as gone)."""
    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out


def http_get(url: str, timeout: float = 3.0) -> tuple[int, dict | None]:
    """(status, JSON body) of a GET; (0, None) when nothing answers."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        try:
            body = json.loads(exc.read() or b"null")
        except ValueError:
            body = None
        return exc.code, body
    except (OSError, ValueError):
        return 0, None
