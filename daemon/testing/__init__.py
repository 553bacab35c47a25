"""Testing campaignd end to end: the real daemon, servers of a test's own,
a seeded campaign and the audit of its outcome (like `falcon.testing`).

Both the end-to-end tests (tests/e2e) and the benchmarks (bench/, the chaos
run) use it, so neither imports the other. Nothing in the daemon imports it.

- `harness`: `DaemonUnderTest` (`campaignd run` under a restart loop standing
  in for systemd's Restart=always), `write_config`, `fast_tables`,
  `wait_until`, `free_port`;
- `services`: `OwnRedis`, `OwnPostgres`;
- `audit`: `seed_campaign`, `campaign_state`, `settled`, `Audit`, `audit`.
"""

from daemon.testing.audit import MESSAGE1
from daemon.testing.audit import MESSAGE1_MARK
from daemon.testing.audit import MESSAGE2
from daemon.testing.audit import MESSAGE2_MARK
from daemon.testing.audit import SENT_OR_LATER
from daemon.testing.audit import Audit
from daemon.testing.audit import audit
from daemon.testing.audit import campaign_state
from daemon.testing.audit import contact_phones
from daemon.testing.audit import seed_campaign
from daemon.testing.audit import settled
from daemon.testing.harness import ROOT
from daemon.testing.harness import WEBHOOK_SECRET
from daemon.testing.harness import DaemonUnderTest
from daemon.testing.harness import alive
from daemon.testing.harness import fast_tables
from daemon.testing.harness import free_port
from daemon.testing.harness import http_get
from daemon.testing.harness import merge_tables
from daemon.testing.harness import wait_until
from daemon.testing.harness import write_config
from daemon.testing.services import OwnPostgres
from daemon.testing.services import OwnRedis

__all__ = [
    "MESSAGE1",
    "MESSAGE1_MARK",
    "MESSAGE2",
    "MESSAGE2_MARK",
    "ROOT",
    "SENT_OR_LATER",
    "WEBHOOK_SECRET",
    "Audit",
    "DaemonUnderTest",
    "OwnPostgres",
    "OwnRedis",
    "alive",
    "audit",
    "campaign_state",
    "contact_phones",
    "fast_tables",
    "free_port",
    "http_get",
    "merge_tables",
    "seed_campaign",
    "settled",
    "wait_until",
    "write_config",
]
