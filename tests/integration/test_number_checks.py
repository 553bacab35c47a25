"""Number checks as rows (issue 16): requested, paced, run by a real
verification worker against the fake provider (HTTP on loopback), swept when
their queue entry is lost, counted with an ETA, in both storage modes."""

from __future__ import annotations

import datetime as dt
import json
import re

import pytest

from daemon.app import service
from daemon.domain.contacts import verification
from daemon.errors import EXIT_OK
from daemon.providers.fake import FakeOptions
from daemon.store.db import migrate
from daemon.store.models import CheckStatus
from daemon.store.models import Contact
from daemon.store.models import NumberCheck
from daemon.store.models import WaStatus
from daemon.store.models import database
from daemon.store.models import utcnow
from tests.helpers import run_cli
from tests.send_helpers import ManualClock
from tests.send_helpers import build_pipeline
from tests.send_helpers import invalid_phone_for
from tests.send_helpers import mode_config
from tests.send_helpers import new_campaign
from tests.send_helpers import running_workers
from tests.send_helpers import seed_contacts
from tests.send_helpers import wait_with_logs

pytestmark = pytest.mark.timeout(120)

MODES = ["sqlite", "cluster"]


@pytest.fixture
def fake_options():
    return FakeOptions(ack_delays_ms=())


def _pipeline(request, make_config, fake, mode, per_minute=600.0, clock=utcnow):
    extra = {
        "provider": {"base_url": fake.url},
        "campaigns": {"verify_per_minute": per_minute},
        "retry": {"max_attempts": 3},
    }
    cfg = mode_config(request, make_config, mode, extra)
    return build_pipeline(cfg, clock=clock)


@pytest.fixture(params=MODES)
def pipeline(request, make_config, fake):
    built = _pipeline(request, make_config, fake, request.param)
    yield built
    built.close()


def _contacts() -> dict[str, int]:
    """Two numbers on WhatsApp, one not, one contact who opted out."""
    valid = seed_contacts(2)
    (invalid,) = seed_contacts(1, start=10)
    Contact.update(phone=invalid_phone_for(1)).where(Contact.id == invalid).execute()
    (gone,) = seed_contacts(1, start=20, opted_out_at=utcnow())
    return {"ann": valid[0], "bob": valid[1], "cid": invalid, "dan": gone}


def _check(contact_id: int) -> NumberCheck | None:
    return NumberCheck.get_or_none(NumberCheck.contact == contact_id)


def _finished(*contact_ids: int) -> bool:
    rows = NumberCheck.select().where(NumberCheck.contact.in_(contact_ids))
    rows = list(rows)
    return len(rows) == len(contact_ids) and all(
        r.status != CheckStatus.PENDING for r in rows
    )


def test_a_request_makes_paced_pending_rows_and_keeps_pending_ones(
    request, make_config, fake
):
    clock = ManualClock(dt.datetime(2026, 5, 1, 12, 0, 0))
    built = _pipeline(request, make_config, fake, "sqlite", 60.0, clock)
    try:
        people = _contacts()
        result = service.request_verification(
            built.tasks,
            contact_ids=[people["ann"], people["bob"], people["cid"], people["dan"]],
        )
        assert (result["queued"], result["already_pending"], result["opted_out"]) == (
            3,
            0,
            1,
        )
        start = clock.now
        assert [_check(people[p]).due_at for p in ("ann", "bob", "cid")] == [
            start,
            start + dt.timedelta(seconds=1),
            start + dt.timedelta(seconds=2),
        ]
        assert _check(people["dan"]) is None  # opted out: not checked
        figures = result["verification"]
        assert figures == {
            "pending": 3,
            "valid": 0,
            "invalid": 0,
            "unknown": 0,
            "unchecked": 1,
            "eta": "2026-05-01T12:00:02Z",
        }
        # One queue entry per check, each for its time.
        assert built.queues.verification.pending_count() == 3

        # Asked again: the pending check is kept as it is; a new contact
        # takes the slot after the last pending one.
        (eve,) = seed_contacts(1, start=30)
        clock.advance(0.5)
        again = service.request_verification(
            built.tasks, contact_ids=[people["ann"], eve]
        )
        assert (again["queued"], again["already_pending"]) == (1, 1)
        assert _check(people["ann"]).due_at == start
        assert _check(eve).due_at == start + dt.timedelta(seconds=3)
        assert again["verification"]["eta"] == "2026-05-01T12:00:03Z"
    finally:
        built.close()


def test_a_worker_runs_the_checks_and_records_them(pipeline, fake, tmp_path):
    people = _contacts()
    ids = [people["ann"], people["bob"], people["cid"], people["dan"]]
    result = service.request_verification(pipeline.tasks, contact_ids=ids)
    assert result["queued"] == 3
    # A pending check leaves the (unknown) verdict as it was.
    assert Contact.get_by_id(people["ann"]).wa_status == WaStatus.UNKNOWN
    with running_workers(pipeline.cfg, ["verification"], tmp_path) as workers:
        wait_with_logs(
            lambda: _finished(people["ann"], people["bob"], people["cid"]),
            workers,
            60,
            "every check finished",
        )
    expected = {"ann": "valid", "bob": "valid", "cid": "invalid"}
    for name, status in expected.items():
        row = _check(people[name])
        assert (row.status, row.attempts, row.error) == (status, 1, None)
        contact = Contact.get_by_id(people[name])
        assert contact.wa_status == status
        assert contact.wa_checked_at == row.checked_at
    assert Contact.get_by_id(people["dan"]).wa_status == WaStatus.UNKNOWN
    assert fake.stats()["checks"] == 3
    figures = verification.contacts_counts(ids, 600.0, utcnow())
    assert (figures["valid"], figures["invalid"], figures["unchecked"]) == (2, 1, 1)
    assert figures["eta"] is None


def _age_checks(seconds: float) -> None:
    """Move every check's times back, as if `seconds` had passed."""
    back = dt.timedelta(seconds=seconds)
    for row in NumberCheck.select():
        NumberCheck.update(
            due_at=row.due_at - back,
            requested_at=row.requested_at - back,
            enqueued_at=row.enqueued_at - back,
        ).where(NumberCheck.id == row.id).execute()


def test_a_lost_queue_entry_is_swept_and_the_check_completes(pipeline, fake, tmp_path):
    people = _contacts()
    service.request_verification(
        pipeline.tasks, contact_ids=[people["ann"], people["cid"]]
    )
    # The queue loses every entry (a worker killed after popping them, a
    # Redis flushed): the rows are still pending.
    pipeline.queues.verification.flush()
    assert pipeline.tasks.sweep_once()["checks"] == 0  # within the grace
    _age_checks(60)
    assert pipeline.tasks.sweep_once()["checks"] == 2
    # Marked enqueued: the next sweep does not enqueue them twice, even with
    # the queue drained (lost again).
    pipeline.queues.verification.flush()
    assert pipeline.tasks.sweep_once()["checks"] == 0
    _age_checks(60)
    assert pipeline.tasks.sweep_once()["checks"] == 2
    # And once more, still in the queue: a duplicate entry is harmless.
    _age_checks(60)
    pipeline.tasks.enqueue_checks(
        [(_check(people["ann"]).id, utcnow()), (_check(people["cid"]).id, utcnow())]
    )
    # worker:background, the supervisor's consumer of the verification queue
    with running_workers(pipeline.cfg, ["background"], tmp_path) as workers:
        wait_with_logs(
            lambda: _finished(people["ann"], people["cid"]),
            workers,
            60,
            "the swept checks finished",
        )
    assert _check(people["ann"]).status == CheckStatus.VALID
    assert _check(people["cid"]).status == CheckStatus.INVALID
    assert fake.stats()["checks"] == 2  # each once, though enqueued twice


def test_a_recheck_keeps_the_previous_verdict_until_it_finishes(
    request, make_config, fake
):
    clock = ManualClock(utcnow())
    built = _pipeline(request, make_config, fake, "sqlite", 600.0, clock)
    try:
        people = _contacts()
        ann = people["ann"]
        service.request_verification(built.tasks, contact_ids=[ann])
        first = _check(ann)
        assert built.tasks.verify(first.id) == CheckStatus.VALID
        checked = Contact.get_by_id(ann).wa_checked_at

        clock.advance(3600)
        again = service.request_verification(built.tasks, contact_ids=[ann])
        assert again["queued"] == 1
        row = _check(ann)
        assert (row.id, row.status, row.attempts) == (first.id, "pending", 0)
        assert row.due_at == clock.now
        contact = Contact.get_by_id(ann)
        assert (contact.wa_status, contact.wa_checked_at) == ("valid", checked)

        assert built.tasks.verify(row.id) == CheckStatus.VALID
        assert Contact.get_by_id(ann).wa_checked_at == clock.now
        # A task run twice (a duplicate entry) checks nothing more.
        assert built.tasks.verify(row.id) == "already valid"
        assert fake.stats()["checks"] == 2
    finally:
        built.close()


def test_provider_errors_are_retried_then_the_check_is_unknown(
    request, make_config, fake
):
    clock = ManualClock(utcnow())
    built = _pipeline(request, make_config, fake, "sqlite", 600.0, clock)
    try:
        ann = seed_contacts(1)[0]
        Contact.update(wa_status=WaStatus.VALID).where(Contact.id == ann).execute()
        service.request_verification(built.tasks, contact_ids=[ann])
        check_id = _check(ann).id
        fake.configure(down=True)  # every call answers 503
        for attempt in (1, 2):
            outcome = built.tasks.verify(check_id)
            assert outcome.startswith("retry at"), outcome
            row = _check(ann)
            assert (row.status, row.attempts) == ("pending", attempt)
            assert row.due_at > clock.now and row.error
            # Not due yet: the entry comes back at its time, nothing is asked.
            assert built.tasks.verify(check_id) == "not due yet: rescheduled"
            clock.set(row.due_at)
        outcome = built.tasks.verify(check_id)  # the third of max_attempts 3
        row = _check(ann)
        assert row.status == CheckStatus.UNKNOWN, outcome
        assert "gave up after 3 attempts" in row.error
        # Unknown is no verdict: the contact keeps the one it had.
        assert Contact.get_by_id(ann).wa_status == WaStatus.VALID
    finally:
        built.close()


class _NoChecks:
    """A provider without number checks (as Meta's Cloud API)."""

    supports_number_check = False

    def check_number(self, phone):  # pragma: no cover - must not be called
        raise AssertionError("no number check expected")

    def close(self):
        pass


def test_a_provider_without_checks_and_an_opted_out_contact_give_unknown(
    request, make_config, fake
):
    built = _pipeline(request, make_config, fake, "sqlite")
    try:
        ann, bob = seed_contacts(2)
        service.request_verification(built.tasks, contact_ids=[ann, bob])
        Contact.update(opted_out_at=utcnow()).where(Contact.id == bob).execute()
        built.tasks._provider = _NoChecks()
        assert built.tasks.verify(_check(ann).id) == CheckStatus.UNKNOWN
        assert "no number check" in _check(ann).error
        assert built.tasks.verify(_check(bob).id).startswith("not checked")
        assert (_check(bob).status, _check(bob).attempts) == ("unknown", 0)
        assert Contact.get_by_id(ann).wa_status == WaStatus.UNKNOWN
    finally:
        built.close()


def test_campaign_show_and_verify_give_the_counts_and_the_eta(
    request, make_config, fake
):
    built = _pipeline(request, make_config, fake, "sqlite", 1.0)
    try:
        people = _contacts()
        members = [people["ann"], people["bob"], people["cid"], people["dan"]]
        campaign = new_campaign(members)
        cfg = built.cfg
        database.close()

        proc = run_cli("verify", "--campaign", str(campaign.id), cfg=cfg)
        assert proc.returncode == EXIT_OK, proc.stderr
        lines = proc.stdout.splitlines()
        assert lines[0].startswith("queued 3 numbers for verification (1 per minute; ")
        assert lines[0].endswith("; 0 already pending, 1 opted out (not checked)")
        assert lines[1].startswith(
            "members: 3 pending, 0 on WhatsApp, 0 not on WhatsApp, 0 unknown, "
            "1 never checked; all checked by "
        )
        # The third check runs 2 minutes after the first (1 per minute).
        assert re.search(r"\(in (1m5\ds|2m00s)\)$", lines[1]), lines[1]

        shown = run_cli("campaign", "show", str(campaign.id), cfg=cfg)
        assert shown.returncode == EXIT_OK, shown.stderr
        numbers = [line for line in shown.stdout.splitlines() if "numbers" in line]
        assert numbers and "3 pending" in numbers[0] and "all checked by" in numbers[0]

        as_json = run_cli("campaign", "show", str(campaign.id), "--json", cfg=cfg)
        figures = json.loads(as_json.stdout)["verification"]
        assert (figures["pending"], figures["unchecked"]) == (3, 1)
        assert figures["eta"].endswith("Z")

        again = run_cli("verify", "--campaign", str(campaign.id), "--json", cfg=cfg)
        body = json.loads(again.stdout)
        assert (body["queued"], body["already_pending"]) == (0, 3)
    finally:
        built.close()


def test_verify_phone_records_the_row_of_a_known_contact(request, make_config, fake):
    built = _pipeline(request, make_config, fake, "sqlite")
    try:
        (ann,) = seed_contacts(1)
        service.request_verification(built.tasks, contact_ids=[ann])
        phone = Contact.get_by_id(ann).phone
        cfg = built.cfg
        database.close()
        proc = run_cli("verify", "--phone", phone, cfg=cfg)
        assert proc.returncode == EXIT_OK, proc.stderr
        assert proc.stdout.strip() == f"{phone} is on WhatsApp"
        row = _check(ann)
        assert (row.status, row.attempts) == ("valid", 1)
        assert row.checked_at is not None
        # The queued entry finds the check done and asks nothing.
        assert built.tasks.verify(row.id) == "already valid"
        assert fake.stats()["checks"] == 1
    finally:
        built.close()


@pytest.mark.parametrize("mode", ["sqlite", "postgres"])
def test_m0009_creates_the_table_on_an_older_database(request, make_config, mode):
    built = build_pipeline(mode_config(request, make_config, mode))
    try:
        fresh = {i.name: i.columns for i in database.get_indexes("number_check")}
        columns = [c.name for c in database.get_columns("number_check")]
        database.execute_sql("DROP TABLE number_check")
        database.execute_sql(
            "DELETE FROM schema_version WHERE name = 'm0009_number_check'"
        )
        assert migrate(database.obj) == ["m0009_number_check"]
        migrated = {i.name: i.columns for i in database.get_indexes("number_check")}
        assert migrated == fresh
        assert [c.name for c in database.get_columns("number_check")] == columns
        assert "number_check_contact_id" in migrated
    finally:
        built.close()


@pytest.mark.parametrize("mode", ["sqlite", "postgres"])
def test_m0009_keeps_what_an_older_version_found(request, make_config, mode):
    """Checked by an older version (wa_status only): a finished row with that
    outcome and time after the upgrade, not "never checked"."""
    built = build_pipeline(mode_config(request, make_config, mode))
    try:
        valid, invalid, unknown = seed_contacts(3)
        checked = dt.datetime(2026, 11, 2, 9, 30)
        for contact_id, status in (
            (valid, WaStatus.VALID),
            (invalid, WaStatus.INVALID),
        ):
            Contact.update(wa_status=status, wa_checked_at=checked).where(
                Contact.id == contact_id
            ).execute()
        database.execute_sql("DROP TABLE number_check")
        database.execute_sql(
            "DELETE FROM schema_version WHERE name = 'm0009_number_check'"
        )
        assert migrate(database.obj) == ["m0009_number_check"]
        rows = {
            row.contact_id: (row.status, row.checked_at) for row in NumberCheck.select()
        }
        assert rows == {
            valid: (CheckStatus.VALID, checked),
            invalid: (CheckStatus.INVALID, checked),
        }
        campaign = new_campaign([valid, invalid, unknown])
        counts = verification.campaign_counts(campaign.id, 3, 60.0, utcnow())
        assert (counts["valid"], counts["invalid"], counts["unchecked"]) == (1, 1, 1)
    finally:
        built.close()


def test_a_check_whose_worker_died_is_swept_once_its_lease_runs_out(
    request, make_config, fake
):
    clock = ManualClock(utcnow())
    built = _pipeline(request, make_config, fake, "sqlite", 600.0, clock)
    try:
        (ann,) = seed_contacts(1)
        service.request_verification(built.tasks, contact_ids=[ann])
        built.queues.verification.flush()
        check_id = _check(ann).id
        # A worker claims it, then dies before recording anything.
        assert verification.claim(check_id, clock.now, built.tasks.check_lease_s)
        clock.advance(60)
        assert built.tasks.sweep_once(now=clock.now)["checks"] == 0  # leased
        assert built.tasks.verify(check_id) == "another worker has it"
        clock.advance(built.tasks.check_lease_s)
        assert built.tasks.sweep_once(now=clock.now)["checks"] == 1
        assert built.tasks.verify(check_id) == CheckStatus.VALID
        assert _check(ann).attempts == 2
    finally:
        built.close()
