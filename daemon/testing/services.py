"""PostgreSQL and Redis servers of a test's own, on free ports in a temp dir,
so a test may kill and restart them; the machine's shared services are
never touched.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from daemon.testing.harness import free_port
from daemon.testing.harness import wait_until


def _as_service_user() -> list[str]:
    """Prefix that runs a PostgreSQL tool as `postgres` when we are root."""
    if os.geteuid() != 0:
        return []
    return ["runuser", "-u", "postgres", "--"]


class OwnRedis:
    """A redis-server of our own: no persistence, so a restart empties it."""

    def __init__(self, workdir: Path, port: int | None = None):
        self.workdir = Path(workdir)
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    @staticmethod
    def available() -> bool:
        return shutil.which("redis-server") is not None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> OwnRedis:
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = open(self.workdir / "redis.log", "ab")  # noqa: SIM115 - owned by the process
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
                "--protected-mode",
                "no",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        wait_until(self.ping, 10, 0.05, f"redis on port {self.port}")
        return self

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), 0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL: connections drop, every key is gone (no persistence)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def restart(self, down_s: float = 0.0) -> None:
        self.kill()
        time.sleep(down_s)
        self.start()

    def close(self) -> None:
        self.kill()


class OwnPostgres:
    """A PostgreSQL cluster of our own (initdb + pg_ctl), trust auth on loopback."""

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.bindir = self.find_bindir()
        # Not under pytest's tmp_path: its 0700 parents would keep the
        # postgres user out when we run as root.
        self.root = Path(tempfile.mkdtemp(prefix="campaignd-pg-"))
        self.data = self.root / "data"
        self.sockdir = self.root / "sock"
        self.sockdir.mkdir()
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            for path in (self.root, self.sockdir):
                os.chown(path, user.pw_uid, user.pw_gid)
        self._initdb()

    @staticmethod
    def find_bindir() -> Path | None:
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
        if found:
            return Path(found[-1]).parent
        which = shutil.which("pg_ctl")
        return Path(which).parent if which else None

    @classmethod
    def available(cls) -> bool:
        if cls.find_bindir() is None:
            return False
        if os.geteuid() == 0:
            try:
                pwd.getpwnam("postgres")
            except KeyError:
                return False
            return shutil.which("runuser") is not None
        return True

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _tool(self, name: str, *args: str, timeout: float = 60) -> None:
        subprocess.run(
            [*_as_service_user(), str(self.bindir / name), *args],
            check=True,
            capture_output=True,
            timeout=timeout,
        )

    def _initdb(self) -> None:
        self._tool(
            "initdb",
            "-D",
            str(self.data),
            "--auth=trust",
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--no-sync",
        )

    def start(self) -> OwnPostgres:
        options = (
            f"-p {self.port} -k {self.sockdir} -c listen_addresses=127.0.0.1 "
            # fsync off is safe against what we inject (a killed server: the
            # OS keeps its writes). synchronous_commit stays on: off, a
            # crash loses commits already acknowledged (a Message 1 recorded
            # as sent comes back queued and goes out twice), a configuration
            # campaignd warns against and does not claim to survive.
            "-c fsync=off -c full_page_writes=off "
            "-c max_connections=300"
        )
        self._tool(
            "pg_ctl",
            "-D",
            str(self.data),
            "-l",
            str(self.root / "pg.log"),
            "-o",
            options,
            "-w",
            "-t",
            "60",
            "start",
        )
        return self

    def stop(self, mode: str = "immediate") -> None:
        """Stop the server; `immediate` is a crash (recovery on the next start)."""
        with contextlib.suppress(subprocess.CalledProcessError):
            self._tool("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def restart(self, down_s: float = 0.0) -> None:
        self.stop()
        time.sleep(down_s)
        self.start()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
