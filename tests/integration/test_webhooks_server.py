"""The web role as a real process: standalone start, heartbeat, SIGTERM, and the
whole reply path with real workers and the fake provider posting webhooks.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import requests

from daemon.providers.fake import FakeOptions
from daemon.providers.fake import FakeProvider
from daemon.runtime import HEARTBEAT_ENV
from daemon.runtime import SUPERVISOR_PID_ENV
from daemon.store.db import open_database
from daemon.store.models import InboundEvent
from daemon.store.models import Message
from daemon.store.models import database
from tests.helpers import free_port
from tests.helpers import subprocess_env
from tests.helpers import wait_for

TOKEN = "e2e-token"
SECRET = "hook-secret"


class Roles:
    """Role processes started like the supervisor does (exec, parent pid env,
    the schema migrated first), or standalone (`supervised=False`)."""

    def __init__(self, cfg, tmp_path):
        self.cfg = cfg
        self.tmp_path = tmp_path
        self.procs: list[subprocess.Popen] = []
        self.migrated = False

    def start(
        self, *args: str, heartbeat: str | None = None, supervised: bool = True
    ) -> subprocess.Popen:
        env = subprocess_env()
        if supervised:
            env[SUPERVISOR_PID_ENV] = str(os.getpid())
            if not self.migrated:  # what `campaignd run` does before any role
                open_database(self.cfg, migrate_schema=True)
                database.close()
                self.migrated = True
        if heartbeat:
            env[HEARTBEAT_ENV] = heartbeat
        log = open(self.tmp_path / f"{'-'.join(args)}.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(
            [sys.executable, "-m", "daemon", *args, "-c", self.cfg.source],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


@pytest.fixture
def roles(tmp_path):
    started = []

    def make(cfg) -> Roles:
        group = Roles(cfg, tmp_path)
        started.append(group)
        return group

    yield make
    for group in started:
        group.stop_all()


def healthy(url: str) -> bool:
    try:
        return requests.get(url + "/healthz", timeout=2).status_code == 200
    except requests.ConnectionError:
        return False


@pytest.mark.timeout(60)
def test_standalone_web_migrates_beats_and_exits_0_on_sigterm(
    make_config, roles, tmp_path
):
    port = free_port()
    cfg = make_config(
        "sqlite", {"web": {"port": port}, "supervisor": {"heartbeat_interval_s": 0.1}}
    )
    beat_file = tmp_path / "web.beat"
    web = roles(cfg).start("web", heartbeat=str(beat_file), supervised=False)
    url = f"http://127.0.0.1:{port}"
    wait_for(lambda: healthy(url), timeout=30, what="web /healthz")
    # The fresh data dir was migrated by the web role itself.
    assert requests.get(url + "/readyz", timeout=5).status_code == 200
    wait_for(beat_file.exists, timeout=10, what="first heartbeat")
    first = beat_file.stat().st_mtime_ns
    wait_for(lambda: beat_file.stat().st_mtime_ns > first, timeout=10, what="beats")
    web.send_signal(signal.SIGTERM)
    assert web.wait(15) == 0


@pytest.mark.timeout(60)
def test_web_exits_when_its_parent_pid_is_not_the_expected_one(make_config, tmp_path):
    cfg = make_config("sqlite", {"web": {"port": free_port()}})
    env = subprocess_env(**{SUPERVISOR_PID_ENV: "1"})  # not our parent
    proc = subprocess.run(
        [sys.executable, "-m", "daemon", "web", "-c", cfg.source],
        env=env,
        capture_output=True,
        timeout=30,
    )
    assert proc.returncode == 0


@pytest.mark.timeout(150)
def test_replies_posted_by_the_fake_provider_send_message2_once(
    make_config, roles, tmp_path
):
    contacts = 20
    port = free_port()
    hook = f"http://127.0.0.1:{port}/webhooks/wassenger"
    options = FakeOptions(
        webhook_url=hook,
        webhook_secret=SECRET,
        reply_share=1.0,
        reply_delay_ms=100.0,
        ack_delays_ms=(20.0, 40.0, 60.0),
    )
    with FakeProvider(options) as fake:
        cfg = make_config(
            "sqlite",
            {
                "web": {
                    "port": port,
                    "api_token": TOKEN,
                    "webhook_secret": SECRET,
                    "webhook_hmac_secret": SECRET,
                },
                "provider": {"base_url": fake.url, "token": "t"},
            },
        )
        group = roles(cfg)
        group.start("web")
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: healthy(url), timeout=30, what="web /healthz")
        group.start("worker", "--queue", "messages")
        group.start("worker", "--queue", "default")
        api = requests.Session()
        api.headers["Authorization"] = f"Bearer {TOKEN}"
        people = [
            {"phone": f"+3361234{i + 1:04d}", "name": f"P{i}"} for i in range(contacts)
        ]
        created = api.post(
            url + "/api/v1/campaigns",
            json={
                "name": "e2e",
                "message1": "Bonjour {name}",
                "message2": "Merci {name}",
                "contacts": people,
                "start": True,
            },
            timeout=30,
        )
        assert created.status_code == 201, created.text
        campaign_id = created.json()["id"]

        def message2_sent() -> bool:
            summary = api.get(f"{url}/api/v1/campaigns/{campaign_id}", timeout=10)
            m2 = summary.json()["messages"]["message2"]
            return sum(m2.get(s, 0) for s in ("sent", "delivered", "read")) == contacts

        try:
            wait_for(
                message2_sent, timeout=20, interval=0.2, what="every Message 2 sent"
            )
        except AssertionError:
            print(api.get(f"{url}/api/v1/campaigns/{campaign_id}").json(), fake.stats())
            raise

        # Replay every stored reply: all duplicates, nothing new is sent.
        open_database(cfg)
        with database.connection_context():
            replies = [
                e.payload
                for e in InboundEvent.select().where(
                    InboundEvent.event_type == "message:in:new"
                )
            ]
        assert len(replies) == contacts
        from daemon.providers.base import sign_hmac_sha256

        for payload in replies:
            raw = payload.encode()
            resp = requests.post(
                hook,
                data=raw,
                headers={
                    "X-Webhook-Secret": SECRET,
                    "X-Wassenger-Signature": sign_hmac_sha256(SECRET, raw),
                    "Content-Type": "application/json",
                },
                timeout=10,
            )
            assert resp.json() == {"stored": 0, "duplicates": 1}

        sent = fake.messages()
        by_phone: dict[str, int] = {}
        for message in sent:
            by_phone[message["phone"]] = by_phone.get(message["phone"], 0) + 1
        assert by_phone == {p["phone"]: 2 for p in people}
        assert all(m["accepted_count"] == 1 for m in sent)
        with database.connection_context():
            assert Message.select().where(Message.kind == 2).count() == contacts
        database.close()
