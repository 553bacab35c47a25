"""`campaignd demo` as a newcomer runs it: a real daemon, a real fake provider,
a completed campaign with Message 2s, and nothing left running afterwards,
also when interrupted with Ctrl-C."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import psutil
import pytest

from tests.helpers import subprocess_env
from tests.helpers import wait_for

SUMMARY_LINE = re.compile(r"^  (?P<label>\S.*?)\s{2,}(?P<value>\S+)$")


def summary_of(output: str) -> dict[str, str]:
    """The demo's closing table as {label: value}."""
    rows = {}
    for line in output.splitlines():
        if match := SUMMARY_LINE.match(line):
            rows[match["label"].strip()] = match["value"]
    return rows


def processes_mentioning(text: str) -> list[psutil.Process]:
    """Live processes whose command line names `text` (a demo's temp dir)."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if text in cmdline and proc.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(proc)
    return found


@pytest.fixture
def demo_tmp():
    """A short TMPDIR for the demo: its data dir (and so its status socket
    path, at most 107 bytes) lands here, and its processes name it."""
    path = Path(tempfile.mkdtemp(prefix="cdemo-"))
    yield path
    # Whatever a failed test left behind must not outlive it.
    for proc in processes_mentioning(str(path)):
        proc.kill()
    shutil.rmtree(path, ignore_errors=True)


def demo_env(tmp: Path) -> dict:
    return subprocess_env(TMPDIR=str(tmp), PYTHONUNBUFFERED="1")


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_demo_completes_a_campaign_and_leaves_nothing_running(demo_tmp):
    result = subprocess.run(
        [sys.executable, "-m", "daemon", "demo", "--contacts", "30"],
        capture_output=True,
        text=True,
        timeout=110,
        cwd=demo_tmp,
        env=demo_env(demo_tmp),
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # It says what it changed for speed, so nobody copies it to production.
    assert "demo settings, for speed" in result.stdout
    assert "  pacing.per_minute = 0 (default 12)" in result.stdout
    summary = summary_of(result.stdout)
    assert summary.get("campaign status") == "completed", result.stdout[-3000:]
    assert summary["contacts"] == "30"
    assert int(summary["Message 1 sent"]) > 0
    assert int(summary["replies -> Message 2 sent"]) > 0, result.stdout[-3000:]
    assert summary["provider: duplicate deliveries"] == "0"
    assert processes_mentioning(str(demo_tmp)) == []
    # Without --keep the data dir is removed.
    assert list(demo_tmp.glob("campaignd-demo-*")) == []


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class LineReader:
    """Collects a child's stdout lines on a thread, so waits have deadlines."""

    def __init__(self, stream):
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream) -> None:
        for line in stream:
            self.lines.append(line)

    def saw(self, text: str) -> bool:
        return any(text in line for line in self.lines)

    def text(self) -> str:
        return "".join(self.lines)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_ctrl_c_mid_run_stops_everything_and_exits_130(demo_tmp):
    demo = subprocess.Popen(
        [sys.executable, "-m", "daemon", "demo", "--contacts", "30"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=demo_tmp,
        env=demo_env(demo_tmp),
        # Its own process group, like a shell job: Ctrl-C signals the group.
        start_new_session=True,
        # As from a terminal: a runner started without job control (a
        # script's `cmd &`) ignores SIGINT, and its children inherit that.
        preexec_fn=_default_sigint,
    )
    try:
        reader = LineReader(demo.stdout)
        wait_for(
            lambda: reader.saw("started") or demo.poll() is not None,
            timeout=60,
            what="the demo's campaign to start",
        )
        assert demo.poll() is None, reader.text()
        # The daemon it started is running now, named by the demo's data dir.
        assert processes_mentioning(str(demo_tmp)), reader.text()
        os.killpg(demo.pid, signal.SIGINT)
        code = demo.wait(timeout=60)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
    assert code == 130, reader.text()
    assert reader.saw("interrupted"), reader.text()
    assert processes_mentioning(str(demo_tmp)) == []
    assert list(demo_tmp.glob("campaignd-demo-*")) == []
