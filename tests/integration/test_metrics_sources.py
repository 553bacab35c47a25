"""/metrics with each of its sources up, down or hung.

The web app in process (falcon TestClient) on a real database. What a
running daemon exports (the role series, the names the contrib rules and
dashboard use) is tests/e2e/test_monitoring.py.
"""

from __future__ import annotations

import itertools
import socket
import tempfile
import time
from pathlib import Path

import pytest
from falcon import testing

from daemon import __version__
from daemon import metrics
from daemon.domain import alerts
from daemon.roles.web import health
from daemon.roles.web.app import create_app
from daemon.store.db import open_database
from daemon.store.models import Campaign
from daemon.store.models import Contact
from daemon.store.models import Message
from daemon.store.models import database
from daemon.store.queue import make_queues
from tests.helpers import free_port

pytestmark = pytest.mark.timeout(60)
_phones = itertools.count(1)


def series(text: str) -> dict[str, float]:
    """{'name{labels}': value} of every campaignd_ sample in a scrape."""
    found = {}
    for line in text.splitlines():
        if line.startswith("campaignd_"):
            name, _, value = line.rpartition(" ")
            found[name] = float(value)
    return found


def seed_messages(statuses: dict[tuple[int, str], int]) -> None:
    campaign = Campaign.create(name="m", message1="a", message2="b")
    for (kind, status), count in statuses.items():
        for _ in range(count):
            n = next(_phones)
            contact = Contact.create(phone=f"+3361000{n:04d}")
            Message.create(
                campaign=campaign,
                contact=contact,
                kind=kind,
                phone=contact.phone,
                body="a",
                status=status,
                idempotency_key=f"k-{n}",
            )


@pytest.fixture
def short_socket():
    # sun_path holds 107 bytes: pytest's tmp_path can be longer.
    path = Path(tempfile.mkdtemp(prefix="cdm", dir="/tmp")) / "s.sock"
    yield path
    path.unlink(missing_ok=True)
    path.parent.rmdir()


def test_without_a_supervisor_the_rows_are_counted_and_no_role_is_made_up(
    make_config, short_socket
):
    cfg = make_config("sqlite", {"status": {"socket": str(short_socket)}})
    open_database(cfg, migrate_schema=True)
    queues = make_queues(cfg)
    with database.connection_context():
        seed_messages({(1, "sent"): 3, (1, "failed"): 1, (2, "delivered"): 2})
    alerts.record_raised("test:metrics", "a test alert", severity="warning")
    client = testing.TestClient(create_app(cfg, None, queues=queues))

    got = series(client.simulate_get("/metrics").text)

    assert got[f'campaignd_build_info{{version="{__version__}"}}'] == 1
    assert got["campaignd_supervisor_up"] == 0
    assert not [name for name in got if name.startswith("campaignd_role_")]
    assert got['campaignd_messages{kind="1",status="sent"}'] == 3
    assert got['campaignd_messages{kind="1",status="failed"}'] == 1
    assert got['campaignd_messages{kind="2",status="delivered"}'] == 2
    assert got["campaignd_alerts_active"] == 1
    assert got['campaignd_alert_active{key="test:metrics",severity="warning"}'] == 1
    assert got["campaignd_queue_up"] == 1
    # Nobody leads (no scheduler ran): the family is there, with no sample.
    assert not [name for name in got if name.startswith("campaignd_leader_info")]
    queues.close()


def test_a_hung_supervisor_and_a_dead_database_cost_one_deadline(
    make_config, short_socket
):
    """A status socket that accepts nothing and a database that refuses
    connections: the scrape still answers, within the probe deadline, with
    the sources that did answer and each `_up` saying which did not."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(short_socket))
    listener.listen(1)  # never accepted: a connect waits, then nothing answers
    dead_db = f"postgresql://postgres@127.0.0.1:{free_port()}/nothing"
    cfg = make_config(
        "sqlite",
        {"status": {"socket": str(short_socket)}, "database": {"url": dead_db}},
    )
    open_database(cfg)
    queues = make_queues(cfg)
    try:
        client = testing.TestClient(create_app(cfg, None, queues=queues))
        started = time.monotonic()
        result = client.simulate_get("/metrics")
        took = time.monotonic() - started
    finally:
        listener.close()
        queues.close()

    assert result.status_code == 200
    got = series(result.text)
    assert got["campaignd_supervisor_up"] == 0
    assert got["campaignd_queue_up"] == 1  # the SQLite queue answers
    assert f'campaignd_build_info{{version="{__version__}"}}' in got
    for absent in (
        "campaignd_messages{",
        "campaignd_alerts_active",
        "campaignd_leader",
    ):
        assert not [name for name in got if name.startswith(absent)], absent
    # The probes run side by side: one deadline, not one per source.
    assert took < health.CHECK_TIMEOUT_S + 1.5, took


def test_row_counts_are_reused_for_30_seconds_then_taken_again(make_config):
    cfg = make_config("sqlite")
    open_database(cfg, migrate_schema=True)
    now = [1000.0]
    rows = health.RowsCollector(health.Probe(), clock=lambda: now[0])
    with database.connection_context():
        seed_messages({(1, "sent"): 2})

    def sent() -> float:
        return series(metrics.render([rows]).decode())[
            'campaignd_messages{kind="1",status="sent"}'
        ]

    assert sent() == 2
    with database.connection_context():
        seed_messages({(1, "sent"): 1})
    now[0] += health.ROWS_MAX_AGE_S - 1
    assert sent() == 2  # counted 29 s ago: not counted again
    now[0] += 1
    assert sent() == 3
