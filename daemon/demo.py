"""`campaignd demo`: a whole campaign on this machine, offline, in under a minute.

It starts the fake provider (which posts delivery acks and replies from a
share of contacts back to our webhook), runs the real daemon (`campaignd run`
with every child) on a temporary data dir, creates a campaign of N contacts,
shows live progress, prints a summary and stops everything. Ctrl-C at any
moment stops everything too.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from daemon import config as config_mod
from daemon import config_text
from daemon import status_client
from daemon.errors import EXIT_FAILURE
from daemon.errors import DaemonError

REPLY_SHARE = 0.4
OPT_OUT_SHARE = 0.1
# Short enough that contacts who never reply expire during the demo (the
# real default is 24 hours).
DEMO_REPLY_WINDOW_H = 8 / 3600
DEADLINE_S = 90.0
_SENT = ("sent", "delivered", "read")


def main(args) -> int:
    count = args.contacts
    if not 1 <= count <= 100_000:
        print("campaignd: error: --contacts must be 1-100000", file=sys.stderr)
        return EXIT_FAILURE
    workdir = Path(tempfile.mkdtemp(prefix="campaignd-demo-"))
    supervisor = None
    try:
        from daemon.providers.fake import FakeOptions
        from daemon.providers.fake import FakeProvider

        web_port = _free_port()
        secret = "demo-secret"
        options = FakeOptions(
            latency_ms=20.0,
            webhook_url=f"http://127.0.0.1:{web_port}/webhooks/wassenger",
            webhook_secret=secret,
            reply_share=REPLY_SHARE,
            opt_out_share=OPT_OUT_SHARE,
            reply_delay_ms=800.0,
            invalid_suffix="0000",
        )
        with FakeProvider(options) as fake:
            cfg = _write_config(workdir, fake.url, web_port, secret)
            supervisor = _start_daemon(cfg, workdir)
            _wait_ready(cfg, supervisor)
            campaign_id = _create_campaign(cfg, count)
            print(f"campaign {campaign_id}: {count} contacts, started", flush=True)
            summary = _watch(cfg, campaign_id, supervisor)
            code = _stop_daemon(supervisor)
            supervisor = None
            _print_summary(summary, fake.stats())
            return 0 if code == 0 and summary["status"] == "completed" else 1
    except KeyboardInterrupt:
        print("\ninterrupted: stopping everything", file=sys.stderr)
        return 130
    except DaemonError as exc:
        print(f"campaignd: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        if supervisor is not None:
            _stop_daemon(supervisor)
        if getattr(args, "keep", False):
            print(f"data kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# What the demo changes from the defaults so that a campaign ends in a
# minute: printed at start, so nobody mistakes it for production settings.
DEMO_SETTINGS = {
    "pacing": {"per_minute": 0.0, "daily_cap": 0},
    "campaigns": {"reply_window_h": DEMO_REPLY_WINDOW_H},
    "retry": {"base_s": 1.0, "cap_s": 5.0},
    "scheduler": {"check_expired_interactions_s": 2.0, "sweep_s": 2.0},
}


def _print_demo_settings() -> None:
    defaults = config_mod.from_dict({}, env={})
    print("demo settings, for speed (the defaults are for real campaigns):")
    for table, values in DEMO_SETTINGS.items():
        for key, value in values.items():
            default = getattr(getattr(defaults, table), key)
            print(f"  {table}.{key} = {value:g} (default {default:g})")


def _write_config(workdir: Path, provider_url: str, web_port: int, secret: str):
    _print_demo_settings()
    data = {
        "daemon": {"data_dir": str(workdir / "data"), "log_level": "warning"},
        "provider": {"base_url": provider_url},
        "web": {"port": web_port, "webhook_secret": secret},
        **DEMO_SETTINGS,
    }
    path = workdir / "campaignd.toml"
    path.write_text(config_text.to_toml(data))
    return config_mod.load(path)


def _start_daemon(cfg, workdir: Path) -> subprocess.Popen:
    log = open(workdir / "daemon.log", "wb")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(
        [sys.executable, "-m", "daemon", "run", "-c", cfg.source],
        stdout=log,
        stderr=subprocess.STDOUT,
        # Its own process group: a Ctrl-C reaches only us, and we stop it
        # in order (SIGTERM, wait) instead of both racing.
        start_new_session=True,
    )


def _status(cfg) -> dict | None:
    try:
        return status_client.request(cfg.status_socket, {"cmd": "status"}, timeout=2.0)
    except (OSError, ValueError):
        return None


def _roles_line(status: dict | None) -> str:
    if not status:
        return "daemon: starting"
    roles = status.get("roles", [])
    running = sum(1 for r in roles if r.get("state") == "RUNNING")
    restarts = sum(r.get("restarts", 0) for r in roles)
    return f"processes {running}/{len(roles)} running, {restarts} restarts"


def _wait_ready(cfg, supervisor: subprocess.Popen) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if supervisor.poll() is not None:
            raise DaemonError(f"the daemon exited with code {supervisor.returncode}")
        status = _status(cfg)
        roles = (status or {}).get("roles", [])
        if roles and all(r.get("state") == "RUNNING" for r in roles):
            print(f"daemon ready: {_roles_line(status)}", flush=True)
            return
        time.sleep(0.1)
    raise DaemonError("the daemon did not become ready within 30 s")


def _create_campaign(cfg, count: int) -> int:
    from daemon.app.tasks import Tasks
    from daemon.domain import campaigns
    from daemon.store.db import open_database
    from daemon.store.models import Contact
    from daemon.store.queue import make_queues

    open_database(cfg)
    rows = [
        # Every 50th number ends in 0000, which the fake provider says is
        # not on WhatsApp: those sends fail, as some do in real life.
        {
            "phone": f"+3361{i:07d}" if i % 50 else f"+3362{i // 50:03d}0000",
            "name": f"Contact {i}",
            "variables": {"city": "Lyon"},
        }
        for i in range(1, count + 1)
    ]
    for start in range(0, len(rows), 500):
        Contact.insert_many(rows[start : start + 500]).on_conflict_ignore().execute()
    ids = [c.id for c in Contact.select(Contact.id)]
    campaign = campaigns.create_campaign(
        "Demo",
        "Bonjour {name}, une offre à {city} vous intéresse ?",
        "Merci {name} ! Un conseiller vous écrit très vite.",
        ids,
    )
    queues = make_queues(cfg)
    campaigns.start_campaign(campaign.id, Tasks(cfg, queues))
    queues.close()
    return campaign.id


def _watch(cfg, campaign_id: int, supervisor: subprocess.Popen) -> dict:
    from daemon.domain import campaigns

    tty = sys.stdout.isatty()
    deadline = time.monotonic() + DEADLINE_S
    last_line, last_print = "", 0.0
    while True:
        summary = campaigns.campaign_summary(campaign_id)
        line = _progress_line(summary) + " | " + _roles_line(_status(cfg))
        now = time.monotonic()
        if tty:
            print("\r" + line.ljust(150), end="", flush=True)
        elif line != last_line and now - last_print >= 1.0:
            print(line, flush=True)
            last_line, last_print = line, now
        if summary["status"] in ("completed", "cancelled"):
            break
        if supervisor.poll() is not None:
            raise DaemonError(f"the daemon exited with code {supervisor.returncode}")
        if now > deadline:
            print("\ndemo deadline reached before the campaign completed")
            break
        time.sleep(0.25)
    if tty:
        print()
    return summary


def _progress_line(summary: dict) -> str:
    m1 = summary["messages"]["message1"]
    m2 = summary["messages"]["message2"]
    members = summary["members"]
    sent = sum(m1.get(s, 0) for s in ("sent", "delivered", "read"))
    return (
        f"M1 sent {sent} delivered {m1.get('delivered', 0) + m1.get('read', 0)} "
        f"read {m1.get('read', 0)} failed {m1.get('failed', 0)} | "
        f"replies {members.get('interacted', 0) + members.get('message_2_sent', 0)} "
        f"M2 sent {sum(m2.get(s, 0) for s in ('sent', 'delivered', 'read'))} | "
        f"opted out {members.get('opted_out', 0)} expired {members.get('expired', 0)}"
    )


def _stop_daemon(supervisor: subprocess.Popen) -> int | None:
    if supervisor.poll() is None:
        supervisor.send_signal(signal.SIGTERM)
        try:
            return supervisor.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(supervisor.pid, signal.SIGKILL)
            return supervisor.wait()
    return supervisor.returncode


def _print_summary(summary: dict, fake_stats: dict) -> None:
    members = summary["members"]
    m1 = summary["messages"]["message1"]
    m2 = summary["messages"]["message2"]
    rows = [
        ("contacts", summary["contacts"]),
        ("Message 1 sent", sum(m1.get(s, 0) for s in _SENT)),
        ("  of which read", m1.get("read", 0)),
        ("Message 1 failed (not on WhatsApp)", m1.get("failed", 0)),
        ("replies -> Message 2 sent", sum(m2.get(s, 0) for s in _SENT)),
        ("opted out (replied STOP)", members.get("opted_out", 0)),
        ("expired (no reply in the window)", members.get("expired", 0)),
        (
            "provider: duplicate deliveries",
            max(fake_stats.get("per_reference_max", 1) - 1, 0),
        ),
        ("campaign status", summary["status"]),
    ]
    width = max(len(r[0]) for r in rows)
    print()
    for label, value in rows:
        print(f"  {label.ljust(width)}  {value}")
