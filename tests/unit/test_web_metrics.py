"""daemon.metrics: one process's increments are visible in another's scrape."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from tests.helpers import subprocess_env

pytestmark = pytest.mark.timeout(60)


def run(code: str, env: dict) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_multiprocess_mode_adds_up_every_process(tmp_path):
    env = subprocess_env(PROMETHEUS_MULTIPROC_DIR=str(tmp_path))
    worker = """
        from daemon import metrics
        metrics.SENDS.labels(kind="1", outcome="sent").inc(3)
        metrics.TASK_SECONDS.labels(task="send_single_message").observe(0.2)
    """
    run(worker, env)
    run(worker, env)
    text = run(
        """
        from daemon import metrics
        print(metrics.render().decode())
        """,
        env,
    )
    assert 'campaignd_sends_total{kind="1",outcome="sent"} 6.0' in text
    assert 'campaignd_task_seconds_count{task="send_single_message"} 2.0' in text


def test_plain_registry_without_the_variable(tmp_path):
    env = subprocess_env()
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    text = run(
        """
        from daemon import metrics
        metrics.WEBHOOK_EVENTS.labels("wassenger", metrics.event_label("x:y")).inc()
        print(metrics.render().decode())
        """,
        env,
    )
    assert (
        'campaignd_webhook_events_total{event="other",provider="wassenger"} 1.0' in text
    )
    assert "process_cpu_seconds_total" in text  # the default collectors
