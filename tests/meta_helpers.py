"""The real daemon on Meta's Cloud API against the fake provider's Meta
dialect: the fake's options and the daemon's config that pair them (shared
by tests/e2e/test_meta_provider.py and tests/e2e/test_meta_exactly_once.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

from daemon import testing as ch
from daemon.providers.fake import FakeOptions
from daemon.providers.fake import FakeProvider
from daemon.store.models import database

TOKEN = "EAAG-e2e-token"
APP_SECRET = "meta-app-secret"
VERIFY_TOKEN = "meta-verify-token"
# The approved template: Message 1 of daemon.testing.seed_campaign uses two
# variables ({name}, {city}), so two body parameters.
TEMPLATE = "campaign_intro"


def meta_options(web_port: int, options: FakeOptions) -> FakeOptions:
    """`options` in the Meta dialect, posting signed webhooks to the daemon."""
    return dataclasses.replace(
        options,
        dialect="meta",
        token=TOKEN,
        templates=(f"{TEMPLATE}:2",),
        webhook_url=f"http://127.0.0.1:{web_port}/webhooks/whatsapp",
        webhook_secret=APP_SECRET,
    )


def meta_tables(work: Path, fake: FakeProvider, web_port: int) -> dict:
    """fast_tables with provider.kind = meta, pointed at `fake`."""
    return ch.merge_tables(
        ch.fast_tables(work, fake.url, web_port),
        {
            "provider": {
                "kind": "meta",
                "token": TOKEN,
                "phone_number_id": fake.options.phone_number_id,
                "template_name": TEMPLATE,
                "template_language": "fr",
                "app_secret": APP_SECRET,
                "verify_token": VERIFY_TOKEN,
            },
        },
    )


@contextlib.contextmanager
def meta_daemon(work: Path, options: FakeOptions, extra: dict | None = None):
    """The fake (Meta dialect) and `campaignd run`, ready:
    (daemon, cfg, fake, web_port); both stopped on the way out."""
    web_port = ch.free_port()
    fake = FakeProvider(meta_options(web_port, options)).start()
    daemon = None
    try:
        tables = ch.merge_tables(meta_tables(work, fake, web_port), extra or {})
        cfg = ch.write_config(work, tables)
        daemon = ch.DaemonUnderTest(cfg, work, restart_delay_s=3600).start()
        try:
            daemon.wait_ready(60)
        except AssertionError:
            raise AssertionError(daemon.log_text()[-4000:]) from None
        yield daemon, cfg, fake, web_port
    finally:
        if daemon is not None:
            daemon.stop(timeout=20)
            daemon.close()
        fake.stop()
        database.close()


def wait_settled(daemon, fake, campaign_id: int, timeout: float) -> None:
    """Until nothing more will happen to the campaign (daemon.testing.settled)."""
    try:
        ch.wait_until(
            lambda: ch.settled(ch.campaign_state(campaign_id), fake),
            timeout,
            0.2,
            "the campaign settled",
        )
    except AssertionError as exc:
        raise AssertionError(
            f"{exc}: {ch.campaign_state(campaign_id)} {fake.stats()}\n"
            f"{daemon.log_text()[-4000:]}"
        ) from None
