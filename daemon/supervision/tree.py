"""What the process tree is made of: the real roles and the zygote's argv,
and the environment every child runs with (the supervisor's, or the one
its forked first zygote takes on)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from daemon import config as config_mod
from daemon.runtime import SUPERVISOR_PID_ENV
from daemon.supervision.child import RoleSpec
from daemon.supervision.systemd import SYSTEMD_ENV

METRICS_ENV = "PROMETHEUS_MULTIPROC_DIR"


def default_roles(cfg: config_mod.Config, config_path: str) -> list[RoleSpec]:
    """The real roles, in start order (design section 1)."""
    shared = cfg.workers.shared_background
    names = ["web", "worker:background" if shared else "worker:default"]
    names += [f"worker:messages#{i + 1}" for i in range(cfg.workers.messages_processes)]
    names += [] if shared else ["worker:retry", "worker:verification"]
    names += ["scheduler"]
    tail = ["-c", config_path] if config_path else []
    base = [sys.executable, "-m", "daemon", "child"]
    return [RoleSpec(name, tuple(base + [name] + tail)) for name in names]


def metrics_directory(cfg: config_mod.Config, env) -> Path:
    """Where every process of the tree writes its prometheus_client files."""
    # The files are memory-mapped: on a full disk a write to them is a
    # SIGBUS that kills the web child over and over. Under systemd they live
    # on the runtime directory (tmpfs) instead.
    run_base = env.get("RUNTIME_DIRECTORY", "").split(":")[0]
    return Path(run_base) / "metrics" if run_base else cfg.data_path / "metrics"


def prepare_metrics_directory(path: Path) -> None:
    """The metrics directory, there before the first write of a metric and
    emptied of a previous run's files (they would be added to this run's
    counters); this process's own files are kept."""
    path.mkdir(parents=True, exist_ok=True)
    mine = f"_{os.getpid()}.db"
    for stale in path.glob("*.db"):
        if not stale.name.endswith(mine):
            stale.unlink(missing_ok=True)


def default_zygote(cfg: config_mod.Config, config_path: str) -> tuple[str, ...]:
    """The zygote's argv: a child that imports every role and forks them."""
    tail = ["-c", config_path] if config_path else []
    return tuple([sys.executable, "-m", "daemon", "child", "--zygote"] + tail)


def children_environment(cfg: config_mod.Config, env) -> dict[str, str]:
    """What every child runs with: ours, without systemd's notify socket,
    naming us as their supervisor and their metrics directory."""
    child_env = {k: v for k, v in env.items() if k not in SYSTEMD_ENV}
    child_env[SUPERVISOR_PID_ENV] = str(os.getpid())
    child_env[METRICS_ENV] = str(metrics_directory(cfg, env))
    return child_env
