"""Helpers for the service-fault tests against the real daemon.

Shared by tests/e2e/test_faults.py (embedded: provider down, disk full) and
tests/e2e/test_faults_cluster.py (Redis and PostgreSQL down): the fake
provider's options and the daemon's config for a fault run, what an operator
(or a provider) sees during a fault (`observe`), holding a fault on until the
daemon shows it, and waiting for the campaign to settle afterwards.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import requests

from daemon import testing as ch
from daemon.providers.fake import FakeOptions

OUTAGE_S = 5.0
CONTACTS = 20
REPLY_WINDOW_S = 15.0
SETTLE_S = 60.0


def fake_options(web_port: int) -> FakeOptions:
    return FakeOptions(
        latency_ms=10.0,
        webhook_url=f"http://127.0.0.1:{web_port}/webhooks/wassenger",
        webhook_secret=ch.WEBHOOK_SECRET,
        webhook_retries=12,
        webhook_backoff_ms=250.0,
        reply_share=0.3,
        reply_delay_ms=2000.0,
        # As at Wassenger and Meta: a repeated request is a second message,
        # which the audit's duplicate counts would show.
        dedupe=False,
    )


def tables_for(
    workdir: Path,
    fake_url: str,
    web_port: int,
    alert_url: str,
    extra: dict | None = None,
) -> dict:
    tables = ch.fast_tables(workdir, fake_url, web_port)
    return ch.merge_tables(
        tables,
        {
            "campaigns": {"reply_window_h": REPLY_WINDOW_S / 3600.0},
            # A provider outage must not use up the attempts of the rows it hits.
            "retry": {"max_attempts": 30},
            "database": {"busy_timeout_s": 1.0},
            # Short, so that an outage held for OUTAGE_S raises its alert.
            "alerts": {"webhook_url": alert_url, "down_after_s": 3.0},
            **(extra or {}),
        },
    )


def campaignd_status(cfg) -> tuple[int, str]:
    done = subprocess.run(
        [sys.executable, "-m", "daemon", "status", "-c", cfg.source],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ch.ROOT,
        env={k: v for k, v in os.environ.items() if k != "CAMPAIGND_CONFIG"},
    )
    return done.returncode, done.stdout + done.stderr


def post_reply(web_port: int, msg_id: str, phone: str = "+33619999999"):
    raw = json.dumps(
        {
            "event": "message:in:new",
            "id": msg_id,
            "data": {"id": msg_id, "fromNumber": phone, "body": "oui"},
        }
    )
    try:
        return requests.post(
            f"http://127.0.0.1:{web_port}/webhooks/wassenger",
            data=raw,
            timeout=20,
            headers={"X-Webhook-Secret": ch.WEBHOOK_SECRET},
        ).status_code
    except requests.RequestException:
        return 0


def observe(daemon, cfg, web_port: int, tag: str) -> dict:
    """Everything an operator (or a provider) would see right now."""
    status = daemon.status() or {}
    rc, text = campaignd_status(cfg)
    ready_code, ready = ch.http_get(f"http://127.0.0.1:{web_port}/readyz", timeout=10)
    return {
        "supervisor_alive": daemon.supervisor_pid is not None,
        "supervisor_starts": daemon.starts,
        "roles": {r["name"]: r["state"] for r in status.get("roles", [])},
        "state": (status.get("daemon") or {}).get("state"),
        "db_error": status.get("db_error"),
        "queues_error": status.get("queues_error"),
        "alerts": [a["key"] for a in status.get("alerts") or []],
        "status_rc": rc,
        "status_text": text,
        "readyz": ready_code,
        "readyz_body": ready,
        "webhook": post_reply(web_port, f"fault-{tag}-{time.monotonic_ns()}"),
    }


def hold_outage(condition, what: str, started: float) -> None:
    """Keep the fault on until `condition` holds and OUTAGE_S has passed."""
    ch.wait_until(
        lambda: condition() and time.monotonic() - started >= OUTAGE_S,
        OUTAGE_S * 4,
        0.2,
        what,
    )


def settle(campaign_id: int, fake, timeout: float) -> bool:
    """True once the campaign is completed and nothing is left in flight."""

    def done():
        state = ch.campaign_state(campaign_id)
        return ch.settled(state, fake) and state["status"] == "completed"

    try:
        ch.wait_until(done, timeout, 0.25, "campaign settled")
    except AssertionError:
        return False
    return True


def brief(seen: dict) -> dict:
    """An `observe` result without its long `campaignd status` text."""
    return {k: v for k, v in seen.items() if k != "status_text"}
