"""Shared test helpers: configs on disk, waiting on conditions, free ports."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from daemon import config_text
from daemon.testing import free_port as free_port  # one definition, re-exported

# Set by CI (.ci/run): a missing prerequisite is then a broken machine, and the
# tests that need it fail instead of being skipped (a skip is easy to miss).
REQUIRE_SERVICES = os.environ.get("CAMPAIGND_TEST_REQUIRE_SERVICES") == "1"


def require(condition, why: str) -> None:
    """Skip the calling test unless `condition` holds; fail it instead in CI.

    Use it for anything CI provides (services, binaries, root, test extras).
    A skip for something truly impossible on the CI machine stays a plain
    `pytest.skip`, with a comment saying why.
    """
    if condition:
        return
    if REQUIRE_SERVICES:
        pytest.fail(f"{why} (and CAMPAIGND_TEST_REQUIRE_SERVICES=1)", pytrace=False)
    pytest.skip(why)


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.02, what=""):
    """Poll `predicate` until it returns a truthy value or the deadline passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout}s waiting for {what or predicate}"
            )
        time.sleep(interval)


def dump_toml(data: dict) -> str:
    lines = []
    for table, values in data.items():
        lines.append(f"[{table}]")
        for key, value in values.items():
            lines.append(f"{key} = {config_text.toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def merge(base: dict, extra: dict) -> dict:
    out = {k: dict(v) for k, v in base.items()}
    for table, values in extra.items():
        out.setdefault(table, {}).update(values)
    return out


def write_config(path: Path, data: dict) -> Path:
    path.write_text(dump_toml(data))
    return path


def subprocess_env(**extra) -> dict:
    env = dict(os.environ)
    env.pop("CAMPAIGND_CONFIG", None)
    env.update(extra)
    return env


ROOT = Path(__file__).resolve().parent.parent


def run_cli(
    *args: str, cfg=None, cwd=None, env_extra=None, timeout: float = 90, **popen
) -> subprocess.CompletedProcess:
    """`python -m daemon ARGS [-c CFG]` as an operator runs it: a process of
    its own, text output captured, no $CAMPAIGND_CONFIG from this shell."""
    cmd = [sys.executable, "-m", "daemon", *args]
    if cfg is not None:
        cmd += ["-c", cfg.source]
    popen.setdefault("capture_output", True)
    return subprocess.run(
        cmd,
        text=True,
        env=subprocess_env(**(env_extra or {})),
        timeout=timeout,
        check=False,
        cwd=cwd or ROOT,
        **popen,
    )
