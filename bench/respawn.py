"""Supervision benchmark: start -> READY, SIGKILL -> RUNNING again, idle footprint.

    .venv/bin/python bench/respawn.py [--kills 20] [--roles real|fixture]

Runs `campaignd run` (the real roles, embedded mode, a temporary data dir)
under a fake systemd (a NOTIFY_SOCKET datagram socket), then:

- start -> READY=1: from exec of the supervisor to READY=1, which it sends
  once every child has written its first heartbeat;
- respawn latency: SIGKILL one child (roles in turn), time until the status
  socket shows its replacement RUNNING (first heartbeat seen), p50/p95/max;
- idle footprint after a few quiet seconds: RSS and PSS (psutil
  memory_full_info) of the whole tree, and per role.

`--roles fixture` uses the light test children (tests/process/fixture_roles)
to separate the supervisor's own cost from the roles' import time.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from daemon import status as status_mod  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def roles_only(sock: Path) -> list[dict] | None:
    try:
        return status_mod.request(sock, {"cmd": "status", "figures": False})["roles"]
    except (OSError, ValueError, KeyError):
        return None


def start(tmp: Path, fixture: bool):
    sock = tmp / "s.sock"
    cfg = tmp / "campaignd.toml"
    cfg.write_text(
        f'[daemon]\ndata_dir = "{tmp / "data"}"\nlog_level = "warning"\n'
        f"[web]\nport = {free_port()}\n"
        f'[status]\nsocket = "{sock}"\n'
        "[supervisor]\nheartbeat_interval_s = 0.5\nhealthy_after_s = 0.1\n"
    )
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"campaignd-bench-{uuid.uuid4().hex[:8]}"
    notify.bind("\0" + name)
    env = {**os.environ, "NOTIFY_SOCKET": "@" + name, "PYTHONPATH": str(REPO_ROOT)}
    if fixture:
        control = tmp / "control"
        control.mkdir()
        env["FIXTURE_CONTROL_DIR"] = str(control)
        argv = [sys.executable, "-m", "tests.process.fixture_roles", "supervise"]
    else:
        argv = [sys.executable, "-m", "daemon", "run"]
    t0 = time.monotonic()
    proc = subprocess.Popen(argv + ["-c", str(cfg)], env=env, cwd=REPO_ROOT)
    notify.settimeout(120)
    while True:
        message = notify.recv(4096).decode()
        if "READY=1" in message.splitlines():
            break
    ready_s = time.monotonic() - t0
    notify.close()
    return proc, sock, ready_s


def measure_respawns(sock: Path, kills: int) -> list[float]:
    latencies = []
    for i in range(kills):
        roles = roles_only(sock)
        role = roles[i % len(roles)]
        old = role["pid"]
        os.kill(old, signal.SIGKILL)
        t0 = time.monotonic()
        while True:
            now_roles = roles_only(sock) or []
            back = next((r for r in now_roles if r["name"] == role["name"]), None)
            if back and back["pid"] != old and back["state"] == "RUNNING":
                latencies.append(time.monotonic() - t0)
                break
            if time.monotonic() - t0 > 60:
                raise SystemExit(f"{role['name']} not back after 60 s")
            time.sleep(0.002)
        # Past healthy_after_s, so the next kill of this role restarts at
        # once instead of backing off.
        time.sleep(0.3)
    return latencies


def footprint(pid: int) -> list[tuple[str, float, float]]:
    rows = []
    supervisor = psutil.Process(pid)
    for proc in [supervisor] + supervisor.children(recursive=True):
        try:
            mem = proc.memory_full_info()
            cmd = proc.cmdline()
        except psutil.Error:
            continue
        role = cmd[-3] if "-c" in cmd else cmd[-1]
        name = "supervisor" if proc.pid == pid else role
        rows.append((name, mem.rss / 1_048_576, mem.pss / 1_048_576))
    return rows


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--roles", choices=("real", "fixture"), default="real")
    parser.add_argument("--settle", type=float, default=5.0, help="idle seconds")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cdbench", dir="/tmp") as tmp:
        proc, sock, ready_s = start(Path(tmp), args.roles == "fixture")
        try:
            time.sleep(args.settle)
            rows = footprint(proc.pid)
            latencies = measure_respawns(sock, args.kills)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
    ms = [x * 1000 for x in latencies]
    print(f"\ncampaignd supervision ({args.roles} roles, {os.cpu_count()} CPUs)")
    print(f"{'metric':<36}{'value':>12}")
    print(f"{'start -> READY=1':<36}{ready_s:>11.2f}s")
    p50 = f"SIGKILL -> RUNNING p50 (n={len(ms)})"
    print(f"{p50:<36}{statistics.median(ms):>10.0f}ms")
    print(f"{'SIGKILL -> RUNNING p95':<36}{pct(ms, 95):>10.0f}ms")
    print(f"{'SIGKILL -> RUNNING max':<36}{max(ms):>10.0f}ms")
    print(f"{'idle RSS, whole tree':<36}{sum(r[1] for r in rows):>10.0f}MB")
    print(f"{'idle PSS, whole tree':<36}{sum(r[2] for r in rows):>10.0f}MB")
    print(f"\n{'process':<24}{'RSS MB':>8}{'PSS MB':>8}")
    for name, rss, pss in rows:
        print(f"{name:<24}{rss:>8.1f}{pss:>8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
