"""Two real daemons (`campaignd run`) sharing PostgreSQL and Redis.

One campaign is sent by both; mid-campaign the scheduler leader's whole
process tree is SIGKILLed. The other daemon takes the lease within one lease
period, its sweeper brings back what the dead host held, and the campaign
completes with nothing lost and nothing delivered twice (checked against
the fake provider's own records).

The design's scenario has 2,000 contacts; CI runs CLUSTER_CONTACTS (default
600) to stay well inside the time limit on two cores. Set
CAMPAIGND_CLUSTER_CONTACTS=2000 for the full run.

The fake provider posts its webhooks to the surviving daemon throughout: that
is the load balancer routing around a dead host (a daemon's web role is only
a door; any host can take any webhook).
"""

from __future__ import annotations

import collections
import os
import shutil
import signal
import tempfile
from pathlib import Path

import psutil
import pytest

from daemon.providers.fake import FakeOptions
from daemon.roles.leader import read_state
from daemon.roles.leader import state_path
from daemon.store.models import Interaction
from daemon.store.models import JobRun
from daemon.store.models import database
from daemon.store.models import utcnow
from daemon.testing import WEBHOOK_SECRET
from daemon.testing import DaemonUnderTest
from daemon.testing import audit
from daemon.testing import campaign_state
from daemon.testing import contact_phones
from daemon.testing import fast_tables
from daemon.testing import merge_tables
from daemon.testing import seed_campaign
from daemon.testing import write_config
from tests.conftest import REDIS_URL
from tests.helpers import free_port
from tests.helpers import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

CONTACTS = int(os.environ.get("CAMPAIGND_CLUSTER_CONTACTS", "600"))
LEASE_S = 3.0


def leads(cfg) -> bool:
    state = read_state(state_path(cfg), max_age_s=LEASE_S * 2)
    return bool(state and state.get("leader"))


def kill_tree(pid: int) -> list[int]:
    """SIGKILL a supervisor and all its children at once (a host dying)."""
    parent = psutil.Process(pid)
    procs = parent.children(recursive=True) + [parent]
    for proc in procs:
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=10)
    return [p.pid for p in procs]


@pytest.fixture
def fake_options():
    return FakeOptions(
        reply_share=0.1,
        reply_delay_ms=300.0,
        # "sent" and "delivered" acks only: every ack is a webhook event for
        # the default queue, and the test's short reply window (below) must
        # not be outrun by that queue's backlog.
        ack_delays_ms=(50.0, 150.0),
        webhook_secret=WEBHOOK_SECRET,
        seed=11,
    )


@pytest.fixture
def daemons(tmp_path, pg_url, redis_prefix, fake):
    """Two daemon configs (own data dir, port, socket) on one PG + Redis."""
    made, cfgs, sock_dirs = [], [], []
    for name in ("a", "b"):
        workdir = tmp_path / name
        workdir.mkdir()
        # Short: a socket path must fit in 107 bytes.
        sock_dir = Path(tempfile.mkdtemp(prefix=f"cdcl{name}", dir="/tmp"))
        sock_dirs.append(sock_dir)
        tables = merge_tables(
            fast_tables(workdir, fake.url, free_port()),
            {
                "database": {"url": pg_url},
                "queue": {
                    "backend": "redis",
                    "url": REDIS_URL,
                    "name_prefix": redis_prefix,
                },
                "status": {"socket": str(sock_dir / "s.sock")},
                # A dead host's rows: those whose status webhook arrives are
                # confirmed; the others (claimed, never sent) wait for their
                # lease to expire, then this window, before host b sends them.
                "provider": {"timeout_s": 2.0, "confirm_window_s": 10.0},
                # 54 s instead of 24 h: members that do not reply expire, so
                # the campaign can complete within the test.
                "campaigns": {"reply_window_h": 0.015},
                # Row leases = hard limit + stop timeout + 30 s: what a dead
                # host's sends wait before another host's sweeper marks them
                # unconfirmed.
                "workers": {
                    "soft_time_limit_s": 3.0,
                    "hard_time_limit_s": 5.0,
                    "default_threads": 4,
                },
                "scheduler": {"leader_lease_s": LEASE_S},
            },
        )
        cfgs.append(write_config(workdir, tables))

    def start(cfg) -> DaemonUnderTest:
        # No restart within the test: the dead host stays dead.
        daemon = DaemonUnderTest(cfg, Path(cfg.source).parent, restart_delay_s=3600)
        made.append(daemon)
        return daemon.start()

    yield cfgs, start
    for daemon in made:
        daemon.close()
    database.close()
    for sock_dir in sock_dirs:
        shutil.rmtree(sock_dir, ignore_errors=True)


def test_cluster_survives_the_death_of_the_leader_host(daemons, fake):
    (cfg_a, cfg_b), start = daemons
    host_a = start(cfg_a)
    host_a.wait_ready(90)
    wait_for(lambda: leads(cfg_a), timeout=30, what="host a leading")
    host_b = start(cfg_b)
    host_b.wait_ready(90)
    assert not leads(cfg_b)
    fake.configure(webhook_url=f"http://127.0.0.1:{cfg_b.web.port}/webhooks/wassenger")

    campaign_id = seed_campaign(cfg_a, contact_phones(CONTACTS))
    wait_for(
        lambda: fake.stats()["sends_accepted"] >= CONTACTS // 4,
        timeout=120,
        interval=0.1,
        what="a quarter of the campaign sent",
    )

    killed_wall = utcnow()
    kill_tree(host_a.supervisor_pid)
    # Host b takes over once host a's lease expires (one lease, then its
    # next tick: pinned on an injected clock in tests/unit/test_leader.py);
    # how long a failover takes is for bench/, not for this test.
    wait_for(lambda: leads(cfg_b), timeout=60, what="host b taking over")

    wait_for(
        lambda: (campaign_state(campaign_id) or {}).get("status") == "completed",
        timeout=180,
        interval=0.5,
        what="the campaign completing on host b alone",
    )
    with database.connection_context():
        sweep = JobRun.get(JobRun.job == "sweep")
    assert sweep.last_run_at > killed_wall  # the new leader fires the jobs
    result = audit(campaign_id, fake, fake.options)
    with database.connection_context():
        outcomes = collections.Counter(i.outcome for i in Interaction.select())
    assert result.clean, (result, outcomes)
    assert result.members == CONTACTS
    assert result.campaign_status == "completed"
    assert result.message2_accepted == result.replying_contacts > 0
    assert host_b.stop() == 0
