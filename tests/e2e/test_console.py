"""The web console (/ui) in a real browser, on a real daemon, as an operator uses it.

`campaignd run` on the embedded default (SQLite) with the HTTP fake provider,
a campaign started through the admin API, and headless Chromium (Debian's
`chromium` + `chromium-driver`) driven by Selenium with JavaScript switched
off: log in, open each page while the campaign runs, compare the figures on
the page with the database, press Replay on a dead letter.

A dead letter needs an event that fails: console_hook/sitecustomize.py (on
the daemon's PYTHONPATH) makes the status handler raise for one reference
while a flag file exists, as test_dead_letters.py does in process.

With CAMPAIGND_SCREENSHOTS=DIR the pages are saved there as PNG
(tools/screenshots.py writes docs/img/ that way).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import requests

from daemon import config as config_mod
from daemon.providers.fake import FakeOptions
from daemon.providers.fake import FakeProvider
from daemon.status_client import request as status_request
from daemon.store.db import open_database
from daemon.store.models import Alert
from daemon.store.models import Campaign
from daemon.store.models import CampaignContact
from daemon.store.models import InboundEvent
from daemon.store.models import Message
from daemon.store.models import database
from tests.helpers import dump_toml
from tests.helpers import free_port
from tests.helpers import require
from tests.helpers import subprocess_env
from tests.helpers import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

TOKEN = "console-token-1"
SECRET = "console-secret"
HOOK_DIR = Path(__file__).resolve().parent / "console_hook"
CONTACTS = 40
# Without these Chromium tries the network (no internet here) and hangs.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1200,900",
)
SENT = ("sent", "delivered", "read")
# Figures that only grow while a campaign runs (with the fake provider: a
# contact replies once, a failure happens at the send, never after it).
GROWING = (
    "targeted",
    "sent",
    "delivered",
    "read",
    "replied",
    "message2",
    "expired",
    "opted_out",
    "failed",
    "skipped",
)


def chromium_paths() -> tuple[str, str]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (chromium and driver) and os.environ.get("CAMPAIGND_TEST_NO_BROWSER"):
        # .ci/run tried to install them and could not (no package mirror):
        # it said so in its output; the rest of the suite still counts.
        pytest.skip(f"no browser: {os.environ['CAMPAIGND_TEST_NO_BROWSER']}")
    require(
        chromium and driver,
        "Chromium or chromedriver missing (apt-get install chromium chromium-driver)",
    )
    require(
        importlib.util.find_spec("selenium") is not None,
        "selenium not installed (pip install -e '.[test]')",
    )
    return chromium, driver


class Daemon:
    """`campaignd run` in a short temp dir, with the fake provider."""

    def __init__(self, workdir: Path, fake: FakeProvider, web_port: int):
        self.workdir = workdir
        self.flag = workdir / "poison-on"
        self.flag.touch()
        data = {
            "daemon": {"data_dir": str(workdir / "data"), "log_level": "warning"},
            "provider": {"base_url": fake.url},
            "web": {
                "port": web_port,
                "webhook_secret": SECRET,
                "api_token": TOKEN,
                "event_max_attempts": 1,
            },
            # Paced, so the campaign is still running while the pages are read.
            "pacing": {"per_minute": 150.0, "daily_cap": 0},
            "campaigns": {"reply_window_h": 6 / 3600},
            "retry": {"base_s": 1.0, "cap_s": 5.0},
            "scheduler": {"check_expired_interactions_s": 2.0, "sweep_s": 2.0},
        }
        path = workdir / "campaignd.toml"
        path.write_text(dump_toml(data))
        self.cfg = config_mod.load(path)
        self.url = f"http://127.0.0.1:{web_port}"
        self.log = open(workdir / "daemon.log", "wb")  # noqa: SIM115 - closed in stop()
        env = subprocess_env(
            PYTHONPATH=os.pathsep.join(
                [str(HOOK_DIR), *filter(None, [os.environ.get("PYTHONPATH")])]
            ),
            CAMPAIGND_TEST_POISON_FLAG=str(self.flag),
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "daemon", "run", "-c", str(path)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )

    def status(self) -> dict | None:
        try:
            return status_request(self.cfg.status_socket, {"cmd": "status"})
        except (OSError, ValueError):
            return None

    def wait_running(self) -> dict:
        def running():
            assert self.proc.poll() is None, self.tail()
            answer = self.status() or {}
            roles = answer.get("roles") or []
            return (
                answer
                if roles and all(r["state"] == "RUNNING" for r in roles)
                else None
            )

        return wait_for(running, timeout=60, interval=0.2, what="every role RUNNING")

    def tail(self) -> str:
        self.log.flush()
        return (self.workdir / "daemon.log").read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait()
        self.log.close()


@pytest.fixture
def daemon():
    chromium_paths()  # skip (or fail in CI) before starting anything
    # Short: the status socket's path must fit in 107 bytes.
    workdir = Path(tempfile.mkdtemp(prefix="ccon-"))
    web_port = free_port()
    options = FakeOptions(
        latency_ms=20.0,
        webhook_url=f"http://127.0.0.1:{web_port}/webhooks/wassenger",
        webhook_secret=SECRET,
        reply_share=0.4,
        opt_out_share=0.1,
        reply_delay_ms=800.0,
        invalid_suffix="0000",
    )
    with FakeProvider(options) as fake:
        built = Daemon(workdir, fake, web_port)
        try:
            built.wait_running()
            open_database(built.cfg)
            yield built
        finally:
            database.close()
            built.stop()
            shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def browser(tmp_path):
    chromium, driver_path = chromium_paths()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    # The console must work without JavaScript: the browser runs none.
    options.add_experimental_option(
        "prefs", {"profile.managed_default_content_settings.javascript": 2}
    )
    driver = webdriver.Chrome(
        service=Service(executable_path=driver_path), options=options
    )
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


# ------------------------------------------------------------------ helpers


def figures(driver) -> dict[str, str]:
    from selenium.webdriver.common.by import By

    return {
        e.get_dom_attribute("data-figure"): e.text
        for e in driver.find_elements(By.CSS_SELECTOR, "[data-figure]")
    }


def db_funnel(campaign_id: int) -> dict[str, int]:
    """The funnel counted straight from the rows (GROUP BY), not by the app."""
    import peewee as pw

    def by(query, column):
        return dict(
            query.select(column, pw.fn.COUNT(pw.SQL("*"))).group_by(column).tuples()
        )

    members = by(
        CampaignContact.select().where(CampaignContact.campaign == campaign_id),
        CampaignContact.state,
    )
    m1 = by(
        Message.select().where(Message.campaign == campaign_id, Message.kind == 1),
        Message.status,
    )
    m2 = by(
        Message.select().where(Message.campaign == campaign_id, Message.kind == 2),
        Message.status,
    )
    return {
        "targeted": sum(members.values()),
        "sent": sum(m1.get(s, 0) for s in SENT),
        "delivered": m1.get("delivered", 0) + m1.get("read", 0),
        "read": m1.get("read", 0),
        "replied": members.get("interacted", 0) + members.get("message_2_sent", 0),
        "message2": sum(m2.get(s, 0) for s in SENT),
        "expired": members.get("expired", 0),
        "opted_out": members.get("opted_out", 0),
        "failed": members.get("failed", 0),
        "skipped": members.get("skipped", 0),
        "unconfirmed": m1.get("unconfirmed", 0) + m2.get("unconfirmed", 0),
    }


def page_funnel(driver) -> dict[str, int]:
    shown = figures(driver)
    return {key: int(shown[key]) for key in (*GROWING, "unconfirmed")}


def submit(driver, element, url_part: str) -> None:
    """Click a form's button and wait for the page the form leads to."""
    old = driver.find_element("tag name", "html")
    element.click()
    wait_for(
        lambda: url_part in driver.current_url and not _alive(old),
        timeout=30,
        what=f"the page {url_part}",
    )


def _alive(element) -> bool:
    from selenium.common.exceptions import StaleElementReferenceException

    try:
        element.tag_name  # noqa: B018 - raises once the page was replaced
    except StaleElementReferenceException:
        return False
    return True


def screenshot(driver, name: str) -> None:
    target = os.environ.get("CAMPAIGND_SCREENSHOTS")
    if not target:
        return
    # The whole page, not only the window: size the viewport to the layout
    # (through DevTools, since the page runs no JavaScript).
    metrics = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})
    height = int(metrics["cssContentSize"]["height"]) + 20
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": 1200, "height": height, "deviceScaleFactor": 1, "mobile": False},
    )
    Path(target).mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(Path(target) / f"console-{name}.png"))
    driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def start_campaign(d: Daemon) -> int:
    # Every 20th number is not on WhatsApp for the fake provider (0000).
    contacts = [
        {
            "phone": f"+3361{i:07d}" if i % 20 else f"+3362{i:03d}0000",
            "name": f"Contact {i}",
        }
        for i in range(1, CONTACTS + 1)
    ]
    resp = requests.post(
        f"{d.url}/api/v1/campaigns",
        headers={"Authorization": f"Bearer {TOKEN}"},
        json={
            "name": "Console",
            "message1": "Bonjour {name}, une offre vous intéresse ?",
            "message2": "Merci {name} !",
            "contacts": contacts,
            "start": True,
        },
        timeout=30,
    )
    assert resp.status_code == 201, resp.text
    return resp.json()["id"]


def post_poison(d: Daemon) -> None:
    item = {
        "id": "ACK-BAD",
        "object": "message",
        "event": "message:out:ack",
        "created": int(time.time()),
        "data": {"id": "ACK-BAD", "ack": "delivered", "reference": "cd-poison"},
    }
    resp = requests.post(
        f"{d.url}/webhooks/wassenger",
        headers={"X-Webhook-Secret": SECRET},
        data=json.dumps(item),
        timeout=30,
    )
    assert resp.status_code == 200, resp.text


def poison_event() -> InboundEvent | None:
    return InboundEvent.get_or_none(InboundEvent.dedupe_key.contains(":ACK-BAD:"))


# -------------------------------------------------------------------- test


def test_console_in_a_browser_during_a_live_campaign(daemon, browser):
    from selenium.webdriver.common.by import By

    d, driver = daemon, browser
    campaign_id = start_campaign(d)

    # Not logged in: every page leads to the login form; a wrong token is refused.
    driver.get(f"{d.url}/ui/campaigns/{campaign_id}")
    assert "/ui/login" in driver.current_url
    driver.find_element(By.ID, "token").send_keys("wrong")
    submit(driver, driver.find_element(By.ID, "login"), "/ui/login")
    assert "wrong token" in driver.find_element(By.ID, "login-error").text
    driver.find_element(By.ID, "token").send_keys(TOKEN)
    submit(driver, driver.find_element(By.ID, "login"), f"/ui/campaigns/{campaign_id}")
    assert driver.current_url == f"{d.url}/ui/campaigns/{campaign_id}"
    cookie = driver.get_cookie("campaignd_console")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert TOKEN not in cookie["value"]

    # The campaign page while it runs: every figure between the database's
    # before and after the page was drawn.
    wait_for(
        lambda: db_funnel(campaign_id)["sent"] >= 3,
        timeout=30,
        what="the first sends",
    )
    assert Campaign.get_by_id(campaign_id).status == "running"
    before = db_funnel(campaign_id)
    driver.get(f"{d.url}/ui/campaigns/{campaign_id}")
    shown = page_funnel(driver)
    after = db_funnel(campaign_id)
    for key in GROWING:
        assert before[key] <= shown[key] <= after[key], (key, before, shown, after)
    assert shown["targeted"] == CONTACTS
    assert Campaign.get_by_id(campaign_id).status == "running", "too fast to see live"
    assert driver.find_element(By.CSS_SELECTOR, "svg[aria-label='campaign funnel']")
    assert driver.find_element(By.CSS_SELECTOR, "svg[aria-label='sends per minute']")
    # The ETA at the pacing limits (150 a minute here), or that all are out.
    eta = driver.find_element(By.CSS_SELECTOR, "[data-figure='eta']").text
    assert "the last by" in eta and "150/min" in eta or "every Message 1" in eta, eta

    # The overview: each role as the supervisor reports it.
    driver.get(f"{d.url}/ui")
    answer = d.status()
    states = {
        e.get_dom_attribute("data-role-state"): e.text
        for e in driver.find_elements(By.CSS_SELECTOR, "[data-role-state]")
    }
    assert states == {r["name"]: "RUNNING" for r in answer["roles"]}
    page = driver.page_source
    for role in answer["roles"]:
        assert f">{role['pid']}<" in page, role
    shown = figures(driver)
    assert shown["daemon-state"] == "running"

    # The leader comes with the status figures, which may be served up to
    # a gather late (a slow gather answers with the last ones: at start,
    # before the scheduler took the lease). The page catches up.
    def leader_matches() -> bool:
        driver.get(f"{d.url}/ui")
        answer = d.status()
        leader = answer and answer["daemon"]["leader"]
        return bool(leader) and figures(driver)["leader"] == leader

    wait_for(leader_matches, timeout=30, interval=1.0, what="the page's leader")
    assert {k for k in shown if k.startswith("queue-")} >= {
        "queue-default",
        "queue-messages",
    }

    # The list, while it runs.
    driver.get(f"{d.url}/ui/campaigns")
    assert figures(driver)[f"contacts-{campaign_id}"] == str(CONTACTS)
    assert driver.find_element(By.LINK_TEXT, "Console")
    screenshot(driver, "campaigns")

    # Completed: the page and the database agree exactly.
    wait_for(
        lambda: Campaign.get_by_id(campaign_id).status == "completed",
        timeout=120,
        interval=0.5,
        what=f"campaign completed\n{d.tail()}",
    )
    driver.get(f"{d.url}/ui/campaigns/{campaign_id}")
    expected = db_funnel(campaign_id)
    assert page_funnel(driver) == expected
    assert expected["message2"] > 0 and expected["failed"] == CONTACTS // 20
    sends = (
        Message.select()
        .where(Message.campaign == campaign_id, Message.sent_at.is_null(False))
        .count()
    )
    assert figures(driver)["sends-total"] == str(sends)
    failed = list(
        Message.select().where(
            Message.campaign == campaign_id, Message.status == "failed"
        )
    )
    for message in failed:
        cell = driver.find_element(
            By.CSS_SELECTOR, f"[data-failure-reason='{message.id}']"
        )
        assert cell.text == message.error
    screenshot(driver, "campaign")
    driver.get(f"{d.url}/ui/campaigns")
    assert figures(driver)[f"settled-{campaign_id}"] == str(CONTACTS)

    # A poison webhook becomes a dead letter; the operator fixes the cause
    # and presses Replay.
    post_poison(d)
    wait_for(
        lambda: (e := poison_event()) is not None and e.dead_at is not None,
        timeout=30,
        interval=0.2,
        what=f"the poison event dead\n{d.tail()}",
    )
    dead = poison_event()
    driver.get(f"{d.url}/ui/events")
    shown = figures(driver)
    assert shown["dead-letters"] == "1"
    assert "RuntimeError: cannot handle reference cd-poison" in driver.page_source
    acks = (
        InboundEvent.select().where(InboundEvent.event_type == dead.event_type).count()
    )
    assert int(shown[f"events-wassenger-{dead.event_type}"]) <= acks
    screenshot(driver, "events")
    wait_for(
        lambda: Alert.get_or_none(
            Alert.key == "events:dead_letters", Alert.resolved_at.is_null()
        ),
        timeout=30,
        what="the dead-letter alert",
    )
    driver.get(f"{d.url}/ui")  # the dead letter's alert, for the picture
    assert "events:dead_letters" in driver.page_source
    screenshot(driver, "overview")

    d.flag.unlink()  # the fix
    driver.get(f"{d.url}/ui/events")
    submit(driver, driver.find_element(By.ID, f"replay-{dead.id}"), "replayed=")
    assert f"event {dead.id} replayed" in driver.find_element(By.ID, "notice").text
    wait_for(
        lambda: InboundEvent.get_by_id(dead.id).processed_at is not None,
        timeout=30,
        interval=0.2,
        what="the replayed event processed",
    )
    replayed = InboundEvent.get_by_id(dead.id)
    assert replayed.dead_at is None and replayed.result == "status: unknown message"
    driver.get(f"{d.url}/ui/events")
    assert figures(driver)["dead-letters"] == "0"
    assert "no dead letters" in driver.page_source

    # Log out: the cookie is gone and the pages lead to the form again.
    submit(driver, driver.find_element(By.CSS_SELECTOR, "header button"), "/ui/login")
    assert "/ui/login" in driver.current_url
    driver.get(f"{d.url}/ui/events")
    assert "/ui/login" in driver.current_url
