"""Plumbing shared by the side-by-side benchmarks.

Processes (started in their own session so a whole tree can be ended by its
own id), process-tree measurements with psutil (CPU seconds, peak RSS, PSS),
the services (a private redis-server per benchmark session, a fresh
PostgreSQL database per run), the fake provider in its own process, and the
peer's virtualenv. The result table is in bench/report.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse
from urllib.parse import urlunparse

import psutil

ROOT = Path(__file__).resolve().parent.parent
MAIN_PYTHON = ROOT / ".venv" / "bin" / "python"
CAMPAIGND = ROOT / ".venv" / "bin" / "campaignd"
PEER_VENV = ROOT / "bench" / ".venv-peer"
PEER_PYTHON = PEER_VENV / "bin" / "python"
PEER_REQUIREMENTS = ROOT / "bench" / "requirements-peer.txt"
PG_ADMIN_URL = os.environ.get(
    "CAMPAIGND_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres"
)
PROVIDER_TOKEN = "bench-token"


# ---------------------------------------------------------------- waiting


class BenchError(RuntimeError):
    """A benchmark step failed (a process did not start, a deadline passed)."""


def wait_until(predicate: Callable, timeout: float, what: str, interval=0.02):
    """Poll `predicate` until truthy; BenchError past the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(url: str, data: dict | None = None, timeout: float = 10.0):
    body = None if data is None else json.dumps(data).encode()
    method = "GET" if body is None else "POST"
    req = urllib.request.Request(url, data=body, method=method)
    req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read() or b"null")


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as resp:
            return resp.status == 200
    except (OSError, urllib.error.URLError):
        return False


# ---------------------------------------------------------------- processes


def bench_env(**extra: str) -> dict:
    env = dict(os.environ)
    # A stray supervisor/config variable would change what a child does.
    for name in (
        "CAMPAIGND_CONFIG",
        "CAMPAIGND_SUPERVISOR_PID",
        "CAMPAIGND_HEARTBEAT_FILE",
        "NOTIFY_SOCKET",
    ):
        env.pop(name, None)
    # Deployed code has its bytecode compiled; this machine sets
    # PYTHONDONTWRITEBYTECODE, which would make every start recompile.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env.update(extra)
    return env


@dataclass
class Spawned:
    """A process we started, in a session of its own (pgid == pid)."""

    name: str
    proc: subprocess.Popen
    log_path: Path | None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        if self.log_path is None:
            return ""
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL this process only (as the OOM killer would)."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL its whole process group past `timeout`."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        self.kill_group()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)

    def kill_group(self) -> None:
        # Leftover children (pool processes, supervised roles) share our pgid.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)


def spawn(
    name: str,
    cmd: list[str],
    log_dir: Path,
    env: dict | None = None,
    *,
    stdin=subprocess.DEVNULL,
    stdout=None,
) -> Spawned:
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}-{time.monotonic_ns()}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=env or bench_env(),
            stdin=stdin,
            stdout=log if stdout is None else stdout,
            stderr=log,
            start_new_session=True,
        )
    return Spawned(name, proc, log_path)


def reap_quietly(items: Iterable[Spawned | None]) -> None:
    for item in items:
        if item is not None:
            with contextlib.suppress(Exception):
                item.stop(timeout=5)


# ---------------------------------------------------------------- measuring


def tree(roots: Iterable[int]) -> list[psutil.Process]:
    """The live processes of the trees under `roots` (roots included)."""
    procs: dict[int, psutil.Process] = {}
    for pid in roots:
        try:
            root = psutil.Process(pid)
            procs[pid] = root
            for child in root.children(recursive=True):
                procs[child.pid] = child
        except psutil.Error:
            continue
    return list(procs.values())


def cpu_of(procs: Iterable[psutil.Process]) -> dict[int, float]:
    out = {}
    for p in procs:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            out[p.pid] = t.user + t.system
    return out


def rss_of(procs: Iterable[psutil.Process]) -> int:
    total = 0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total


def memory_of(procs: Iterable[psutil.Process]) -> tuple[int, int]:
    """(RSS, PSS) in bytes, summed; PSS splits shared pages fairly."""
    rss = pss = 0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            m = p.memory_full_info()
            rss += m.rss
            pss += m.pss
    return rss, pss


class TreeMeter:
    """CPU seconds and peak RSS of process trees (and extra processes) over a span.

    A sampler thread remembers each process's last CPU reading, so a process
    that exits mid-run still counts up to its last sample. `extra` (service
    processes: Redis, PostgreSQL backends) is looked up once, at start: finding
    them scans every process, too costly to repeat while measuring.
    """

    def __init__(
        self,
        roots: Callable[[], Iterable[int]],
        interval: float = 0.25,
        extra: Callable[[], Iterable[psutil.Process]] | None = None,
    ):
        self._roots = roots
        self._extra_fn = extra
        self._extra: list[psutil.Process] = []
        self.interval = interval
        self.peak_rss = 0
        self._start: dict[int, float] = {}
        self._last: dict[int, float] = {}
        self._extra_start: dict[int, float] = {}
        self._extra_last: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        procs = tree(self._roots())
        self._last.update(cpu_of(procs))
        self.peak_rss = max(self.peak_rss, rss_of(procs))
        if self._extra:
            self._extra_last.update(cpu_of(self._extra))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def start(self) -> TreeMeter:
        self._start = cpu_of(tree(self._roots()))
        self._last = dict(self._start)
        if self._extra_fn is not None:
            self._extra = list(self._extra_fn())
            self._extra_start = cpu_of(self._extra)
            self._extra_last = dict(self._extra_start)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    @property
    def cpu_s(self) -> float:
        return sum(v - self._start.get(pid, 0.0) for pid, v in self._last.items())

    @property
    def extra_cpu_s(self) -> float:
        return sum(
            v - self._extra_start.get(pid, 0.0) for pid, v in self._extra_last.items()
        )


def pg_backends(dbname: str) -> list[psutil.Process]:
    """PostgreSQL backend processes serving database `dbname`."""
    found = []
    for p in psutil.process_iter(["name", "cmdline"]):
        cmd = p.info.get("cmdline") or []
        if p.info.get("name") == "postgres" and cmd and f" {dbname} " in f" {cmd[0]} ":
            found.append(p)
    return found


# ---------------------------------------------------------------- services


class PrivateRedis:
    """A redis-server of our own: its CPU is ours alone, and no test sees it."""

    def __init__(self, log_dir: Path):
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        exe = shutil.which("redis-server")
        if exe is None:
            raise BenchError("redis-server not found (apt-get install redis-server)")
        cmd = [
            exe,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--databases",
            "16",
        ]
        self.spawned = spawn("redis", cmd, log_dir)
        wait_until(self.ping, 10, "the private redis-server")

    def url_db(self, db: int) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def client(self, db: int = 0):
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, db=db)

    def ping(self) -> bool:
        try:
            return bool(self.client().ping())
        except Exception:  # noqa: BLE001 - not up yet
            return False

    def flushall(self) -> None:
        self.client().flushall()

    def processes(self) -> list[psutil.Process]:
        return tree([self.spawned.pid])

    def close(self) -> None:
        self.spawned.stop(timeout=5)


def pg_available() -> str | None:
    try:
        import psycopg

        with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=3) as c:
            c.execute("SELECT 1")
    except Exception as exc:  # noqa: BLE001 - any failure means "not here"
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return None


def create_database(name: str) -> str:
    import psycopg

    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    parts = urlparse(PG_ADMIN_URL)
    return urlunparse(parts._replace(path=f"/{name}"))


def drop_database(name: str) -> None:
    import psycopg

    with contextlib.suppress(Exception):
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# ---------------------------------------------------------------- fake provider


class FakeProviderProcess:
    """`campaignd fake-provider` in its own process, on a free port."""

    def __init__(self, log_dir: Path, *, latency_ms: float = 0.0, dedupe=False):
        # dedupe off by default, as at Wassenger and Meta (--dedupe turns it on).
        cmd = [
            str(CAMPAIGND),
            "fake-provider",
            "--port",
            "0",
            "--token",
            PROVIDER_TOKEN,
            "--ack-delays-ms",
            "",
            "--latency-ms",
            f"{latency_ms:g}",
        ]
        if dedupe:
            cmd.append("--dedupe")
        self.spawned = spawn("fake-provider", cmd, log_dir, stdout=subprocess.PIPE)
        line = self.spawned.proc.stdout.readline().decode()
        if "listening on" not in line:
            self.spawned.stop()
            raise BenchError(f"fake provider did not start: {line!r}")
        self.url = line.rsplit(" ", 1)[1].strip()

    def stats(self) -> dict:
        return http_json(self.url + "/_fake/stats")

    def accepted(self) -> int:
        return self.stats()["sends_accepted"]

    def messages(self) -> list[dict]:
        return http_json(self.url + "/_fake/messages", timeout=60)

    def phone_counts(self) -> dict[str, dict[str, int]]:
        """What each phone received: {phone: {"m1": n, "m2": n, "other": n}}."""
        return http_json(self.url + "/_fake/phones", timeout=60)

    def reset(self, **config) -> None:
        http_json(self.url + "/_fake/reset", {})
        if config:
            http_json(self.url + "/_fake/config", config)

    def close(self) -> None:
        self.spawned.stop(timeout=5)


# ---------------------------------------------------------------- the peer venv


def ensure_peer_venv(log: Callable[[str], None]) -> Path:
    """bench/.venv-peer with requirements-peer.txt installed (made once)."""
    marker = PEER_VENV / ".requirements"
    wanted = PEER_REQUIREMENTS.read_text()
    if PEER_PYTHON.exists() and marker.exists() and marker.read_text() == wanted:
        return PEER_PYTHON
    log(f"creating the peer's virtualenv in {PEER_VENV} (celery, fastapi, uvicorn)")
    if not PEER_PYTHON.exists():
        subprocess.run([sys.executable, "-m", "venv", str(PEER_VENV)], check=True)
    subprocess.run(
        [str(PEER_PYTHON), "-m", "pip", "install", "-q", "-r", str(PEER_REQUIREMENTS)],
        check=True,
    )
    marker.write_text(wanted)
    return PEER_PYTHON


def peer_versions() -> dict[str, str]:
    code = (
        "import celery, fastapi, uvicorn, kombu, psycopg, json;"
        "print(json.dumps({'celery': celery.__version__, 'kombu': kombu.__version__,"
        "'fastapi': fastapi.__version__, 'uvicorn': uvicorn.__version__,"
        "'psycopg': psycopg.__version__}))"
    )
    out = subprocess.run(
        [str(PEER_PYTHON), "-c", code], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout)


def main_versions() -> dict[str, str]:
    from importlib.metadata import version

    names = ("huey", "peewee", "falcon", "waitress", "psutil", "redis", "psycopg")
    return {name: version(name) for name in names}


def machine_summary() -> str:
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    mem = psutil.virtual_memory().total / 2**30
    return (
        f"{os.cpu_count()} CPUs, {mem:.0f} GiB, Linux {platform.release()}, "
        f"Python {platform.python_version()}, load average {load}"
    )


def compile_bytecode() -> None:
    """Compile our sources once, as an installed package would have them."""
    subprocess.run(
        [str(MAIN_PYTHON), "-m", "compileall", "-q", "daemon", "bench"],
        cwd=ROOT,
        check=False,
        env=bench_env(),
    )
    if PEER_PYTHON.exists():
        subprocess.run(
            [str(PEER_PYTHON), "-m", "compileall", "-q", "bench/peers"],
            cwd=ROOT,
            check=False,
            env=bench_env(),
        )
