"""Number checks across a restart: `campaigns.verify_per_minute` holds.

A request spaces its checks (`due_at`, one every 60/verify_per_minute s)
and queues each for its time; nothing else paces them. When the daemon is
down while a request runs (stopped, crashed, the host rebooted), every
check whose time passed meanwhile is due at once when it starts again: the
queue's entries all fire, and each one claimed went to the provider at
once: a whole request's checks in a burst at the provider's number-check
endpoint, the kind of traffic the pace is there to avoid.

Real parts: the verification tasks on the real database and queues, the
fake Wassenger server on loopback; the restart is the supervisor's
`recovery.release_at_start`; time moves through the injected clock.
"""

from __future__ import annotations

import datetime as dt

import pytest

from daemon.app import recovery
from daemon.app import service
from daemon.providers.fake import FakeOptions
from daemon.store.models import CheckStatus
from daemon.store.models import NumberCheck
from daemon.store.models import utcnow
from tests.send_helpers import ManualClock
from tests.send_helpers import build_pipeline
from tests.send_helpers import mode_config
from tests.send_helpers import seed_contacts

pytestmark = pytest.mark.timeout(60)

# The request was made two hours ago, at 20 a minute: one every 3 s.
START = (utcnow() - dt.timedelta(hours=2)).replace(microsecond=0)
STEP = dt.timedelta(seconds=3)


@pytest.fixture
def fake_options():
    return FakeOptions(ack_delays_ms=())


@pytest.fixture(params=["sqlite", "cluster"])
def pipeline(request, make_config, fake):
    extra = {
        "provider": {"base_url": fake.url},
        "campaigns": {"verify_per_minute": 20.0},
    }
    cfg = mode_config(request, make_config, request.param, extra)
    built = build_pipeline(cfg, ManualClock(START))
    yield built
    built.close()


def test_a_restart_runs_the_overdue_checks_at_the_pace(pipeline, fake):
    contact_ids = seed_contacts(4)
    result = service.request_verification(pipeline.tasks, contact_ids=contact_ids)
    assert result["queued"] == 4
    checks = [NumberCheck.get(NumberCheck.contact == c).id for c in contact_ids]
    # The daemon stops before the first check runs, and starts two hours
    # later: the queue's four entries are all due.
    now = pipeline.clock.set(utcnow().replace(microsecond=0))
    recovery.release_at_start(pipeline.cfg)

    outcomes = [pipeline.tasks.verify(check_id) for check_id in checks]

    # The provider is asked once now; the others keep the pace from now.
    assert outcomes == [CheckStatus.VALID] + ["not due yet: rescheduled"] * 3
    assert fake.stats()["checks"] == 1
    dues = [NumberCheck.get_by_id(i).due_at for i in checks[1:]]
    # (The start reads the wall clock, a moment after the test's `now`.)
    assert [b - a for a, b in zip(dues, dues[1:], strict=False)] == [STEP, STEP]
    assert STEP <= dues[0] - now < STEP + dt.timedelta(seconds=5)
    for check_id, due in zip(checks[1:], dues, strict=True):
        pipeline.clock.set(due)
        assert pipeline.tasks.verify(check_id) == CheckStatus.VALID
    assert fake.stats()["checks"] == 4
