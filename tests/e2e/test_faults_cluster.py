"""Service faults against the real daemon in cluster mode: it bends, reports,
and loses nothing.

One timeline, run once per module by a fixture that records what it observes,
then judged by the tests below (so one slow daemon run serves many small
verdicts): our own PostgreSQL and Redis on free ports; Redis killed (its
queues are lost) and restarted empty, then PostgreSQL stopped and started.

During each fault: the supervisor and its roles stay up (no FATAL exit),
/readyz says what is missing, `campaignd status` shows it, a webhook that
cannot be stored gets a 503 (the provider retries), alerts fire. After it:
the campaign completes with nothing lost or sent twice.

The embedded (SQLite) timeline is in test_faults.py; the helpers both use
are in tests/fault_helpers.py.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from daemon import testing as ch
from daemon.providers.fake import FakeProvider
from tests.fault_helpers import CONTACTS
from tests.fault_helpers import SETTLE_S
from tests.fault_helpers import brief
from tests.fault_helpers import fake_options
from tests.fault_helpers import hold_outage
from tests.fault_helpers import observe
from tests.fault_helpers import settle
from tests.fault_helpers import tables_for
from tests.helpers import require
from tests.process.fixture_roles import AlertReceiver

pytestmark = [pytest.mark.slow]


@pytest.fixture(scope="module")
def cluster_run():
    # CI installs both (.ci/run starts them): fail there rather than skip.
    require(
        ch.OwnPostgres.available() and ch.OwnRedis.available(),
        "needs redis-server and PostgreSQL binaries",
    )
    work = Path(tempfile.mkdtemp(prefix="faults-cl-", dir="/tmp"))
    facts: dict = {}
    pg = redis = daemon = None
    try:
        pg = ch.OwnPostgres().start()
        redis = ch.OwnRedis(work / "redis").start()
        web_port = ch.free_port()
        options = fake_options(web_port)
        with AlertReceiver() as alerts, FakeProvider(options) as fake:
            extra = {
                "database": {"url": pg.url},
                "queue": {"backend": "redis", "url": redis.url},
            }
            cfg = ch.write_config(
                work, tables_for(work, fake.url, web_port, alerts.url, extra)
            )
            daemon = ch.DaemonUnderTest(cfg, work).start()
            daemon.wait_ready(90)
            phones = ch.contact_phones(CONTACTS * 2, 0)

            # 1. Redis gone (with every queued task), then back empty.
            campaign1 = ch.seed_campaign(cfg, phones[:CONTACTS])
            started = time.monotonic()
            redis.kill()
            facts["redis_down"] = observe(daemon, cfg, web_port, "redis")
            # The status figures are refreshed off-loop (and Redis connects
            # are retried), so the error shows after a few seconds.
            hold_outage(
                lambda: (daemon.status() or {}).get("queues_error"),
                "queues_error on the status socket",
                started,
            )
            # The supervisor alerts once the outage lasts alerts.down_after_s.
            with contextlib.suppress(AssertionError):
                ch.wait_until(lambda: alerts.received, 30, 0.2, "a queue alert")
            facts["redis_down_later"] = observe(daemon, cfg, web_port, "redis2")
            facts["redis_alerts_sent"] = list(alerts.received)
            redis.start()
            facts["redis_settled"] = settle(campaign1, fake, SETTLE_S)
            facts["redis_audit"] = ch.audit(campaign1, fake, options)

            # 2. PostgreSQL stopped (connections cut), then started again.
            campaign2 = ch.seed_campaign(cfg, phones[CONTACTS:])
            started = time.monotonic()
            pg.stop(mode="fast")
            facts["pg_down"] = observe(daemon, cfg, web_port, "pg")
            hold_outage(
                lambda: (daemon.status() or {}).get("db_error"),
                "db_error on the status socket",
                started,
            )
            seen_before = len(alerts.received)
            with contextlib.suppress(AssertionError):
                ch.wait_until(
                    lambda: len(alerts.received) > seen_before,
                    30,
                    0.2,
                    "a database alert",
                )
            facts["pg_down_later"] = observe(daemon, cfg, web_port, "pg2")
            facts["pg_alerts_sent"] = [
                a for a in alerts.received if a not in facts["redis_alerts_sent"]
            ]
            pg.start()
            facts["pg_back"] = observe(daemon, cfg, web_port, "pgback")
            facts["pg_settled"] = settle(campaign2, fake, SETTLE_S)
            with contextlib.suppress(Exception):
                facts["pg_audit"] = ch.audit(campaign2, fake, options)
            facts["exit_code"] = daemon.stop()
            facts["exits"] = list(daemon.exits)
            facts["log"] = daemon.log_text()
    finally:
        if daemon is not None:
            daemon.close()
        for service in (redis, pg):
            if service is not None:
                service.close()
        shutil.rmtree(work, ignore_errors=True)
    return facts


@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.timeout(300)
def test_redis_down_is_reported_and_webhooks_still_stored(cluster_run):
    for phase in ("redis_down", "redis_down_later"):
        seen = cluster_run[phase]
        assert seen["supervisor_alive"] and seen["supervisor_starts"] == 1, phase
        assert set(seen["roles"].values()) == {"RUNNING"}, seen["roles"]
    seen = cluster_run["redis_down_later"]
    assert seen["readyz"] == 503, brief(seen)
    assert "queue" in seen["readyz_body"]["checks"]["failed"], brief(seen)
    # The database can store it, so it is acknowledged; the sweeper replays
    # it once the queue is back.
    assert seen["webhook"] == 200
    assert seen["queues_error"] and "queues: " in seen["status_text"]


@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.timeout(300)
def test_redis_down_raises_an_alert(cluster_run):
    seen = cluster_run["redis_down_later"]
    assert seen["status_rc"] != 0
    assert cluster_run["redis_alerts_sent"]


@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.timeout(300)
def test_redis_back_empty_the_sweeper_recovers_everything(cluster_run):
    assert cluster_run["redis_settled"]
    audit = cluster_run["redis_audit"]
    assert audit.message1_accepted == CONTACTS
    assert audit.lost == 0 and audit.duplicate_deliveries == 0, audit
    assert audit.message2_missing == 0 and audit.message2_extra == 0, audit
    assert audit.unprocessed_events == 0


@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.timeout(300)
def test_postgres_down_refuses_webhooks_and_stays_up(cluster_run):
    for phase in ("pg_down", "pg_down_later"):
        seen = cluster_run[phase]
        assert seen["supervisor_alive"] and seen["supervisor_starts"] == 1, phase
        assert "FATAL" not in seen["roles"].values(), seen["roles"]
        assert seen["webhook"] == 503, (phase, seen["webhook"])
    seen = cluster_run["pg_down_later"]
    assert seen["readyz"] == 503, brief(seen)
    assert "database" in seen["readyz_body"]["checks"]["failed"], brief(seen)
    assert seen["db_error"]
    assert cluster_run["pg_back"]["webhook"] == 200


@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.timeout(300)
def test_postgres_down_raises_an_alert(cluster_run):
    seen = cluster_run["pg_down_later"]
    assert seen["status_rc"] != 0 and "database" in seen["status_text"]
    assert cluster_run["pg_alerts_sent"]


@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.timeout(300)
def test_postgres_back_completes_the_campaign_without_loss(cluster_run):
    assert cluster_run["pg_settled"]
    audit = cluster_run["pg_audit"]
    assert audit.lost == 0 and audit.duplicate_deliveries == 0, audit
    assert audit.message2_missing == 0 and audit.unprocessed_events == 0


@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.timeout(300)
def test_cluster_faults_never_kill_the_supervisor(cluster_run):
    assert cluster_run["exits"] == []
    assert cluster_run["exit_code"] == 0
    assert "-> FATAL" not in cluster_run["log"]
