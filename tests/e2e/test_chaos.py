"""The short chaos run (bench/chaos.py): nothing lost, nothing delivered twice.

Embedded mode, 200 contacts, the real `campaignd run` under a restart loop:
a random RUNNING worker SIGKILLed every 0.5 s, the web child SIGKILLed three
times while webhooks arrive, the supervisor SIGKILLed once and restarted 5 s
later; the fake provider fails 10 % of calls (500 and 429), 30 % of the
contacts reply, and it behaves like Wassenger and Meta: no dedupe (a repeated
reference is a second message), statuses 2 s late, a replier's reply before
any status. "Twice" is judged by what each phone received. The run happens
once (module fixture), as `python -m bench.chaos --short --json` in a
process of its own (tests and bench import nothing of each other); each test
judges one promise from its JSON. `python -m bench.chaos` runs the long
version (2,000 contacts, both modes) and prints the table of
docs/reliability.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def chaos():
    argv = [sys.executable, "-m", "bench.chaos", "--mode", "embedded", "--short"]
    # The run's own deadline is 210 s (ChaosSpec.short); this one only
    # stops a wedged run before pytest's timeout does.
    proc = subprocess.run(
        [*argv, "--json"], cwd=ROOT, capture_output=True, text=True, timeout=280
    )
    print("\n" + proc.stderr[-6000:])  # progress and the table
    assert proc.stdout.strip(), f"no JSON (exit {proc.returncode}): {proc.stderr}"
    (result,) = json.loads(proc.stdout)
    result["audit"] = SimpleNamespace(**result["audit"])
    return SimpleNamespace(**result)


def test_the_faults_really_happened(chaos):
    assert chaos.worker_kills >= 10
    assert chaos.web_kills == 3
    assert chaos.supervisor_kills == 1 and chaos.supervisor_starts == 2
    assert chaos.unexpected_exits == [-9]  # only the planned SIGKILL
    assert chaos.orphans_after_supervisor_kill == 0


def test_everything_settles(chaos):
    assert not chaos.timed_out, "work was still in flight at the deadline"


def test_nothing_is_lost(chaos):
    audit = chaos.audit
    assert audit.message1_accepted + audit.message1_failed == audit.members
    assert audit.lost == 0, audit.details["lost"]
    assert audit.sent_but_unknown == 0, audit.details["sent_but_unknown"]


def test_the_provider_does_not_dedupe(chaos):
    options = chaos.provider_options
    assert not options["dedupe"]
    assert options["status_delay_ms"] > 0 and options["reply_before_status"]


def test_nothing_is_delivered_twice(chaos):
    audit = chaos.audit
    # What the phones show: per phone and kind, from the fake's own counts.
    assert audit.phone_duplicates == 0, audit.details["phone_duplicates"]
    assert audit.duplicate_deliveries == 0
    assert audit.per_reference_max <= 1
    assert audit.still_unconfirmed == 0


def test_exactly_one_message_2_per_replying_contact(chaos):
    audit = chaos.audit
    assert audit.replying_contacts > 0
    assert audit.message2_missing == 0, audit.details["message2_missing"]
    assert audit.message2_extra == 0, audit.details["message2_extra"]


def test_every_acknowledged_event_is_stored_and_processed(chaos):
    assert chaos.audit.unprocessed_events == 0
    assert chaos.audit.replies_not_stored == 0, chaos.audit.details


def test_the_campaign_completes(chaos):
    assert chaos.audit.stuck_members == 0
    assert chaos.audit.campaign_status == "completed"


def test_the_daemon_stays_clean(chaos):
    assert chaos.fatal_roles == 0
    assert chaos.final_exit_code == 0
