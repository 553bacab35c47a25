"""README's "Run a campaign", run as written: three terminals, one campaign.

The shell blocks are read from README.md itself, so the README cannot drift
from what works. Only the two ports are changed (to free ones), so that the
test never meets another program on 8080 or 8099.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from tests.helpers import free_port
from tests.helpers import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

ROOT = Path(__file__).resolve().parents[2]


def readme_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Run a campaign\n", 1)[1].split("The everyday commands", 1)[
        0
    ]
    return re.findall(r"```sh\n(.*?)```", section, re.S)


def commands(block: str) -> list[str]:
    """The block's commands: continuation lines joined, comments dropped."""
    joined = block.replace("\\\n", " ")
    return [line for line in joined.splitlines() if line and not line.startswith("#")]


@pytest.fixture
def terminal(tmp_path):
    ports = {"8080": str(free_port()), "8099": str(free_port())}
    env = {k: v for k, v in os.environ.items() if k != "CAMPAIGND_CONFIG"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(ROOT)
    background: list[subprocess.Popen] = []

    def localize(text: str) -> str:
        for port, free in ports.items():
            text = text.replace(port, free)
        return text

    def start(block: str, name: str) -> subprocess.Popen:
        log = open(tmp_path / f"{name}.log", "wb")  # noqa: SIM115 - closed at exit
        proc = subprocess.Popen(
            ["bash", "-euc", localize(block)],
            cwd=tmp_path,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        background.append(proc)
        return proc

    def run(command: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["bash", "-euc", localize(command)],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    yield start, run, ports, tmp_path
    for proc in reversed(background):
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in background:
        try:
            proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def test_the_readme_campaign_runs_as_written(terminal):
    start, run, ports, workdir = terminal
    fake_block, daemon_block, user_block = readme_blocks()
    fake = f"http://127.0.0.1:{ports['8099']}"
    start(fake_block, "terminal1")
    wait_for(lambda: _answers(f"{fake}/_fake/stats"), timeout=30, what="fake up")
    daemon = start(daemon_block, "terminal2")

    def show() -> dict:
        done = run("campaignd campaign show 1 -c campaignd.toml --json")
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    def message1_sent() -> bool:
        m1 = show()["messages"]["message1"]
        return sum(m1.get(s, 0) for s in ("sent", "delivered", "read")) == 2

    def bob_got_message2() -> bool:
        phones = requests.get(f"{fake}/_fake/phones", timeout=5).json()
        return phones.get("+33612345602", {}).get("m2", 0) >= 1

    for command in commands(user_block):
        if command.startswith("curl"):
            # As the reader does: look again until "sent" counts both.
            wait_for(message1_sent, timeout=90, interval=0.5, what="Message 1 sent")
        done = run(command)
        assert done.returncode == 0, (command, done.stdout, done.stderr)
        if command.startswith("curl"):
            assert json.loads(done.stdout) == {"stored": 1, "duplicates": 0}
    assert daemon.poll() is None, (workdir / "terminal2.log").read_text()

    wait_for(bob_got_message2, timeout=60, interval=0.5, what="Bob's Message 2")
    phones = requests.get(f"{fake}/_fake/phones", timeout=5).json()
    # What each phone shows: one Message 1, and one Message 2 for a replier.
    assert phones["+33612345601"]["m1"] == 1
    assert phones["+33612345602"] == {"m1": 1, "m2": 1}
    listed = run(
        "campaignd messages list --campaign 1 --kind 2 -c campaignd.toml --json"
    )
    sent2 = {m["phone"]: m["status"] for m in json.loads(listed.stdout)["messages"]}
    assert sent2["+33612345602"] in ("sent", "delivered", "read")
    os.killpg(daemon.pid, signal.SIGTERM)
    assert daemon.wait(timeout=40) == 0


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).ok
    except requests.RequestException:
        return False
