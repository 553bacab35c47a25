"""The leader lease on SQLite, PostgreSQL and Redis, and once-per-period firing.

Database leases run on an injected clock (no waiting a lease period); the
Redis lease expires on Redis's own clock, so its tests wait for real, with a
one-second lease.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import threading

import pytest

from daemon.app.tasks import Tasks
from daemon.roles.leader import DatabaseLeaseStore
from daemon.roles.leader import LeaderLease
from daemon.roles.leader import RedisLeaseStore
from daemon.roles.leader import current_holder
from daemon.roles.leader import make_lease_store
from daemon.roles.leader import read_state
from daemon.roles.leader import write_state
from daemon.roles.scheduler import PeriodicJobs
from daemon.roles.scheduler import job_specs
from daemon.store.db import open_database
from daemon.store.models import JobRun
from daemon.store.models import Lease
from daemon.store.models import database
from daemon.store.queue import make_queues
from tests.conftest import REDIS_URL
from tests.helpers import free_port
from tests.helpers import wait_for

pytestmark = pytest.mark.timeout(60)

LEASE_S = 1.0


class FakeClock:
    """Wall (naive UTC) and monotonic time that move only when told."""

    def __init__(self, start: dt.datetime = dt.datetime(2025, 3, 10, 12, 0)):
        self.wall = start
        self.mono = 1000.0

    def now(self) -> dt.datetime:
        return self.wall

    def monotonic(self) -> float:
        return self.mono

    def advance(self, seconds: float) -> None:
        self.wall += dt.timedelta(seconds=seconds)
        self.mono += seconds


class Backend:
    """One lease backend; `lease()` makes a contender for it."""

    def __init__(self, name: str, cfg, clock: FakeClock | None):
        self.name = name
        self.cfg = cfg
        self.clock = clock

    def lease(self, owner: str, lease_s: float = LEASE_S) -> LeaderLease:
        if self.clock is None:
            return LeaderLease(RedisLeaseStore.from_config(self.cfg), lease_s, owner)
        store = DatabaseLeaseStore(clock=self.clock.now)
        return LeaderLease(store, lease_s, owner, monotonic=self.clock.monotonic)

    def follow_until_leader(self, follower: LeaderLease) -> float:
        """Tick like a scheduler (every lease / 3) until leader; the injected
        time it took (database backends only: Redis expires on its clock)."""
        assert self.clock is not None
        waited = 0.0
        while not follower.tick():
            self.clock.advance(follower.renew_interval_s)
            waited += follower.renew_interval_s
            assert waited < follower.lease_s * 3, "follower never took over"
        return waited

    def break_store(self, lease: LeaderLease) -> None:
        """Make the lease's backend fail for real."""
        if self.clock is None:
            # The production client (short timeouts, one retry) to a port
            # where nothing listens.
            dead_url = f"redis://127.0.0.1:{free_port()}/0"
            queue = dataclasses.replace(self.cfg.queue, url=dead_url)
            dead_cfg = dataclasses.replace(self.cfg, queue=queue)
            lease.store = RedisLeaseStore.from_config(dead_cfg)
        else:
            Lease.drop_table()


@pytest.fixture(params=["sqlite", "postgres", "redis"])
def backend(request, make_config):
    if request.param == "redis":
        prefix = request.getfixturevalue("redis_prefix")
        cfg = make_config(
            "sqlite",
            {"queue": {"backend": "redis", "url": REDIS_URL, "name_prefix": prefix}},
        )
        assert isinstance(make_lease_store(cfg), RedisLeaseStore)
        yield Backend("redis", cfg, None)
        return
    if request.param == "postgres":
        cfg = make_config("pgqueue", pg=request.getfixturevalue("pg_url"))
    else:
        cfg = make_config("sqlite")
    db = open_database(cfg, migrate_schema=True)
    assert isinstance(make_lease_store(cfg), DatabaseLeaseStore)
    yield Backend(request.param, cfg, FakeClock())
    db.close_all() if hasattr(db, "close_all") else db.close()


# ------------------------------------------------------------ the lease


def test_two_contenders_exactly_one_leader(backend):
    a, b = backend.lease("host-a:1:aa"), backend.lease("host-b:1:bb")
    for _ in range(6):
        a.tick()
        b.tick()
        assert [a.is_leader(), b.is_leader()] == [True, False]
        if backend.clock:
            backend.clock.advance(a.renew_interval_s)
    assert a.store.holder() == "host-a:1:aa"


def test_many_contenders_at_the_same_instant_elect_one(backend):
    contenders = [backend.lease(f"host-{i}:1:x") for i in range(6)]
    barrier = threading.Barrier(len(contenders))
    rounds: list[list[bool]] = []
    lock = threading.Lock()

    def contend(lease: LeaderLease, results: list) -> None:
        barrier.wait()
        won = lease.tick()
        with lock:
            results.append((lease.owner, won))

    winners = set()
    for _ in range(3):
        results: list = []
        threads = [
            threading.Thread(target=contend, args=(c, results)) for c in contenders
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        rounds.append([won for _, won in results])
        winners |= {owner for owner, won in results if won}
    assert all(r.count(True) == 1 for r in rounds), rounds
    assert len(winners) == 1  # the same one renews; nobody steals it
    if backend.name != "redis":
        database.close()


def test_follower_takes_over_within_one_lease_after_the_leader_dies(backend):
    a, b = backend.lease("host-a:1:aa"), backend.lease("host-b:1:bb")
    assert a.tick() and not b.tick()
    # a dies right after renewing: it never ticks again.
    if backend.clock:
        took = backend.follow_until_leader(b)
        # Expiry one lease after the last renewal, seen at the follower's
        # next tick (the injected clock: exact, whatever the machine's load).
        assert b.lease_s * 0.9 <= took <= b.lease_s + b.renew_interval_s
    else:
        # Redis expires the key on its own clock: the key lives one lease at
        # most, and once it is gone the follower's next tick takes it.
        assert 0 < b.store.client.pttl(b.store.key) <= b.lease_s * 1000
        wait_for(lambda: b.store.holder() is None, timeout=30, what="the expiry")
        assert b.tick()
    assert b.is_leader() and b.store.holder() == "host-b:1:bb"
    # The dead leader, were it to wake up, finds the lease gone.
    assert not a.tick() and not a.is_leader()


def test_stalled_leader_stops_firing_before_its_lease_can_expire(backend):
    a = backend.lease("host-a:1:aa")
    assert a.tick() and a.is_leader()
    # No renewal for 90 % of the lease (a GC pause, a hung DB call...).
    if backend.clock:
        backend.clock.advance(a.lease_s * 0.95)
    else:
        wait_for(lambda: not a.is_leader(), timeout=a.lease_s * 2)
    assert not a.is_leader()
    assert a.since is None


def test_leader_steps_down_at_once_when_renewal_fails(backend):
    a = backend.lease("host-a:1:aa")
    # A clock that does not move: the local deadline (0.9 lease) never
    # passes, so only the failed renewal can end the lead.
    a.monotonic = (backend.clock or FakeClock()).monotonic
    assert a.tick()
    backend.break_store(a)
    assert a.tick() is False
    # At the failed renewal itself, so it never fires on a lease it lost.
    assert not a.is_leader() and a.since is None
    if not backend.clock:
        # The production client (made for the configured lease) cannot hold
        # a renewal past one renewal period: two tries (one retry), each
        # within its socket timeouts.
        kw = a.store.client.connection_pool.connection_kwargs
        assert kw["retry"]._retries == 1
        worst = 2 * max(kw["socket_timeout"], kw["socket_connect_timeout"])
        assert worst < backend.cfg.scheduler.leader_lease_s / 3


def test_release_hands_over_without_waiting_for_expiry(backend):
    a, b = backend.lease("host-a:1:aa"), backend.lease("host-b:1:bb")
    assert a.tick() and not b.tick()
    a.release()
    assert not a.is_leader()
    assert b.tick() and b.is_leader()
    # Releasing a lease we do not hold leaves the holder alone.
    a.release()
    assert b.tick()


def test_owner_ids_are_unique_per_process_start():
    one = LeaderLease(DatabaseLeaseStore(), LEASE_S)
    two = LeaderLease(DatabaseLeaseStore(), LEASE_S)
    assert one.owner != two.owner
    host, pid, suffix = one.owner.split(":")
    assert int(pid) > 0 and len(suffix) == 6


def test_state_file_says_who_leads(tmp_path, backend):
    a = backend.lease("host-a:1:aa")
    path = tmp_path / "run" / "scheduler.json"
    write_state(path, a.state())
    assert read_state(path)["leader"] is False
    a.tick()
    write_state(path, a.state())
    state = read_state(path)
    assert state["leader"] is True and state["owner"] == "host-a:1:aa"
    assert state["since"].endswith("Z")
    assert state["backend"] == ("redis" if backend.name == "redis" else "database")
    assert read_state(path, max_age_s=60) == state
    assert read_state(path, max_age_s=-1) is None  # stale: the writer is gone
    assert read_state(tmp_path / "missing.json") is None


# ------------------------------------------------------------ firing


@pytest.fixture
def firing(any_mode_config):
    """(PeriodicJobs factory, clock, queues) on a database and queue backend."""
    cfg = any_mode_config
    db = open_database(cfg, migrate_schema=True)
    queues = make_queues(cfg)
    tasks = Tasks(cfg, queues)
    clock = FakeClock(dt.datetime(2025, 3, 10, 0, 30))

    def make(owner: str = "host-a:1:aa", lease: LeaderLease | None = None):
        if lease is None:
            store = make_lease_store(cfg)
            if isinstance(store, DatabaseLeaseStore):
                store.clock = clock.now
            lease = LeaderLease(store, 60.0, owner, monotonic=clock.monotonic)
        return PeriodicJobs(job_specs(cfg), lease, tasks.run_job, clock=clock.now)

    yield make, clock, queues
    queues.close()
    db.close_all() if hasattr(db, "close_all") else db.close()


def fired(queues) -> collections.Counter:
    """Jobs waiting on the default queue, by name (what a worker would run)."""
    return collections.Counter(task.args[0] for task in queues.default.pending())


def test_catch_up_runs_each_missed_job_once_not_once_per_missed_period(firing):
    make, clock, queues = firing
    now = clock.now()  # 00:30 UTC
    JobRun.insert_many(
        [
            # The cluster was down 3 h: three hourly periods missed.
            {"job": "sync_monitoring", "last_run_at": now - dt.timedelta(hours=3)},
            {
                "job": "check_expired_interactions",
                "last_run_at": now - dt.timedelta(hours=4),
            },
            # Yesterday's midnight run: today's midnight was missed.
            {
                "job": "reset_daily_monitoring",
                "last_run_at": now - dt.timedelta(hours=24),
            },
            # Ran moments ago (another leader before us): not due.
            {"job": "sweep", "last_run_at": now - dt.timedelta(seconds=5)},
            {
                "job": "system_health_check",
                "last_run_at": now - dt.timedelta(seconds=30),
            },
        ]
    ).execute()
    jobs = make()
    assert jobs.lease.tick()

    caught_up = jobs.catch_up()

    assert sorted(caught_up) == [
        "check_expired_interactions",
        "cleanup_expired_locks",  # never ran: no row at all
        "recover_interrupted_campaigns",
        "reset_daily_monitoring",
        "sync_monitoring",
    ]
    assert fired(queues) == collections.Counter(caught_up)
    assert JobRun.get(JobRun.job == "sync_monitoring").last_run_at == now
    # Becoming leader again a minute later catches up nothing more.
    clock.advance(60)
    assert jobs.catch_up() == []
    assert fired(queues) == collections.Counter(caught_up)


def test_a_follower_fires_nothing(firing):
    make, clock, queues = firing
    leader, follower = make("host-a:1:aa"), make("host-b:1:bb")
    assert leader.lease.tick() and not follower.lease.tick()
    assert not follower.fire("sweep")
    assert follower.catch_up() == []
    assert fired(queues) == {}
    assert JobRun.select().count() == 0


def test_two_believing_leaders_fire_a_job_once_per_period(firing):
    """A stalled leader that has not noticed yet and the new one: one run."""
    make, clock, queues = firing
    one = make()
    assert one.lease.tick()
    two = make(lease=one.lease)  # both believe they lead
    assert one.fire("sweep") and not two.fire("sweep")
    clock.advance(5)  # a new leader's timer phase: too early for the next
    assert not two.fire("sweep")
    clock.advance(25)
    assert two.fire("sweep") and not one.fire("sweep")
    assert fired(queues) == {"sweep": 2}


def test_the_midnight_job_fires_once_a_day(firing):
    make, clock, queues = firing
    jobs = make()
    assert jobs.lease.tick()
    clock.wall = dt.datetime(2025, 3, 11, 0, 0, 0, 20_000)
    assert jobs.fire("reset_daily_monitoring")
    clock.advance(1)
    assert not jobs.fire("reset_daily_monitoring")
    assert not jobs.fire("reset_daily_monitoring", catch_up=True)
    clock.wall = dt.datetime(2025, 3, 12, 0, 0, 0, 10_000)
    assert jobs.fire("reset_daily_monitoring")
    assert fired(queues) == {"reset_daily_monitoring": 2}


def test_current_holder_names_the_leader_of_the_cluster(backend):
    lease = LeaderLease(make_lease_store(backend.cfg), 30.0, "host-a:1:aa")
    assert current_holder(backend.cfg) is None
    assert lease.tick()
    assert current_holder(backend.cfg) == "host-a:1:aa"
    lease.release()
    assert current_holder(backend.cfg) is None
