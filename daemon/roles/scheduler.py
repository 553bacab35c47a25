"""The scheduler role: fires the periodic jobs, on the leader only.

``campaignd scheduler`` runs it in the foreground; the supervisor runs it as
``campaignd child scheduler``. An APScheduler BlockingScheduler (UTC), started
here, inside the child, because a scheduler started before a fork is silently
dead in the child. Its jobs:

- ``leader``, every lease / 3: take or renew the leader lease
  (daemon/roles/leader.py) and write <data_dir>/run/scheduler.json;
- ``heartbeat``, every supervisor.heartbeat_interval_s: beat the supervisor's
  heartbeat file, which proves this loop is alive;
- one per periodic job (daemon/app/jobs.py): on the leader only, enqueue
  ``run_job(name)`` on the ``default`` queue; a worker:default runs it.

Each firing is also a compare-and-set on ``job_run.last_run_at``: a job
fires only if its last run is older than half its period (or, for the daily
job, older than today's midnight). So even two schedulers that both believe
they lead for a moment (a stalled leader that has not noticed yet) fire a job
once per period.

Catch-up: at start and whenever this process becomes the leader, every job
whose last run is older than its period (before today's midnight for the
daily one) is enqueued once. A cluster that was down for three hours runs
the hourly jobs once when it comes back, not three times.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.blocking import BlockingScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from daemon.app.tasks import Tasks
from daemon.config import Config
from daemon.roles.leader import LeaderLease
from daemon.roles.leader import make_lease_store
from daemon.roles.leader import state_path
from daemon.roles.leader import write_state
from daemon.runtime import Heartbeat
from daemon.runtime import die_with_parent
from daemon.runtime import parent_alive
from daemon.runtime import setup_logging
from daemon.runtime import supervised
from daemon.store.db import db_session
from daemon.store.db import open_database
from daemon.store.models import JobRun
from daemon.store.models import utcnow
from daemon.store.queue import make_queues

log = logging.getLogger(__name__)

DAY_S = 86400.0
# A tick may come this much earlier than a full period after the last run
# (a new leader's timer phase differs from the old one's) and still fire.
EARLY_TICK_SHARE = 0.5


@dataclass(frozen=True)
class JobSpec:
    name: str
    period_s: float
    # Fired by a cron trigger at 00:00 UTC instead of an interval.
    at_midnight: bool = False

    def last_run_before(self, now: dt.datetime, catch_up: bool) -> dt.datetime:
        """The job fires only if its last run is older than this."""
        if self.at_midnight:
            return now.replace(hour=0, minute=0, second=0, microsecond=0)
        share = 1.0 if catch_up else EARLY_TICK_SHARE
        return now - dt.timedelta(seconds=self.period_s * share)

    @property
    def misfire_grace_s(self) -> int:
        """How late a tick may still run (APScheduler's default is 1 s).

        Half a period, at most an hour: a tick later than that is better
        skipped, as the next one (or the catch-up) comes soon enough.
        """
        return max(1, int(min(self.period_s / 2, 3600)))


def job_specs(cfg: Config) -> tuple[JobSpec, ...]:
    s = cfg.scheduler
    return (
        JobSpec("sync_monitoring", s.sync_monitoring_s),
        JobSpec("reset_daily_monitoring", DAY_S, at_midnight=True),
        JobSpec("cleanup_expired_locks", s.cleanup_expired_locks_s),
        JobSpec("recover_interrupted_campaigns", s.recover_interrupted_campaigns_s),
        JobSpec("sweep", s.sweep_s),
        JobSpec("system_health_check", s.system_health_check_s),
        JobSpec("check_expired_interactions", s.check_expired_interactions_s),
    )


class PeriodicJobs:
    """Leader-gated, once-per-period firing, without APScheduler (testable)."""

    def __init__(
        self,
        specs: tuple[JobSpec, ...],
        lease: LeaderLease,
        enqueue: Callable[[str], object],
        clock: Callable[[], dt.datetime] = utcnow,
    ):
        self.specs = {spec.name: spec for spec in specs}
        self.lease = lease
        self.enqueue = enqueue
        self.clock = clock

    def fire(self, name: str, catch_up: bool = False) -> bool:
        """Enqueue the job if we lead and its period is up; True if enqueued."""
        if not self.lease.is_leader():
            return False
        spec = self.specs[name]
        now = self.clock()
        with db_session():
            JobRun.insert(job=name).on_conflict_ignore().execute()
            claimed = (
                JobRun.update(last_run_at=now)
                .where(
                    JobRun.job == name,
                    JobRun.last_run_at.is_null()
                    | (JobRun.last_run_at < spec.last_run_before(now, catch_up)),
                )
                .execute()
            )
        if not claimed:
            log.debug("job %s already ran this period", name)
            return False
        # Recorded first, enqueued second: a crash in between skips one run
        # (the next period or the catch-up brings it back), never doubles it.
        self.enqueue(name)
        log.info("fired %s%s", name, " (catch-up)" if catch_up else "")
        return True

    def catch_up(self) -> list[str]:
        """Enqueue once every job whose last run is older than its period."""
        fired = []
        for name in self.specs:
            try:
                if self.fire(name, catch_up=True):
                    fired.append(name)
            except Exception:  # noqa: BLE001 - one job's failure skips only it
                log.exception("catch-up of %s failed", name)
        return fired


class Scheduler:
    """The APScheduler loop around a lease and the periodic jobs."""

    def __init__(
        self,
        cfg: Config,
        lease: LeaderLease,
        jobs: PeriodicJobs,
        state_file: Path,
        heartbeat: Heartbeat | None = None,
    ):
        self.cfg = cfg
        self.lease = lease
        self.jobs = jobs
        self.state_file = state_file
        self.heartbeat = heartbeat
        self._stop_requested = False
        self._tick_lock = threading.Lock()
        # stop() only writes a byte here: APScheduler's shutdown takes locks
        # the interrupted main thread may hold, so it must not run inside a
        # signal handler. A thread reading the pipe calls it instead.
        self._wake_r, self._wake_w = os.pipe()
        self.aps = BlockingScheduler(
            timezone=dt.UTC,
            # A thread per job: a firing stuck on a slow database never
            # delays the heartbeat or the lease renewal.
            executors={"default": ThreadPoolExecutor(max_workers=12)},
            job_defaults={"coalesce": True, "max_instances": 1},
        )
        self._add_jobs()

    def _add_jobs(self) -> None:
        now = dt.datetime.now(dt.UTC)
        self.aps.add_job(
            self.leader_tick,
            IntervalTrigger(seconds=self.lease.renew_interval_s, timezone=dt.UTC),
            id="leader",
            next_run_time=now,
            misfire_grace_time=max(1, int(self.lease.renew_interval_s)),
        )
        self.aps.add_job(
            self.beat,
            IntervalTrigger(
                seconds=self.cfg.supervisor.heartbeat_interval_s, timezone=dt.UTC
            ),
            id="heartbeat",
            next_run_time=now,
            misfire_grace_time=1,
        )
        for spec in self.jobs.specs.values():
            trigger = (
                CronTrigger(hour=0, minute=0, timezone=dt.UTC)
                if spec.at_midnight
                else IntervalTrigger(seconds=spec.period_s, timezone=dt.UTC)
            )
            self.aps.add_job(
                self.jobs.fire,
                trigger,
                args=(spec.name,),
                id=spec.name,
                misfire_grace_time=spec.misfire_grace_s,
            )

    def leader_tick(self) -> None:
        with self._tick_lock:
            # A tick still running when run() releases the lease must not
            # take it again behind its back.
            if self._stop_requested:
                return
            was_leader = self.lease.leader
            leader = self.lease.tick()
            self.write_state()
            if leader and not was_leader:
                # Under the lock: a stop waits for it before releasing.
                fired = self.jobs.catch_up()
                if fired:
                    log.info("caught up: %s", ", ".join(fired))

    def beat(self) -> None:
        if not parent_alive():
            log.warning("supervisor is gone; stopping")
            self._stop_requested = True
        if self._stop_requested:
            # Also catches a stop that came just before the loop was running.
            self._shutdown()
            return
        if self.heartbeat is not None:
            self.heartbeat.beat()

    def write_state(self) -> None:
        try:
            write_state(self.state_file, self.lease.state())
        except OSError as exc:
            log.warning("cannot write %s: %s", self.state_file, exc)

    def run(self) -> None:
        """Block until stop(); then give the lease back for a quick takeover."""
        log.info(
            "scheduler started (%s lease, %gs, owner %s)",
            self.lease.store.backend,
            self.lease.lease_s,
            self.lease.owner,
        )
        stopper = threading.Thread(target=self._wait_for_stop, daemon=True)
        stopper.start()
        try:
            if not self._stop_requested:
                self.aps.start()
        finally:
            self._stop_requested = True
            with self._tick_lock:
                self.lease.release()
                self.write_state()
            # Wakes the stopper thread if nothing did. The pipe stays open:
            # a late SIGTERM must not write into a reused fd number.
            self.stop()
            stopper.join(5)
            log.info("scheduler stopped")

    def stop(self) -> None:
        """Ask the loop to stop; safe in a signal handler (flag + one write)."""
        self._stop_requested = True
        try:
            os.write(self._wake_w, b"x")
        except OSError:  # pipe full: a wake-up is pending already
            pass

    def _wait_for_stop(self) -> None:
        try:
            os.read(self._wake_r, 1)
        except OSError:
            return
        self._shutdown()

    def _shutdown(self) -> None:
        self._stop_requested = True
        if self.aps.running:
            self.aps.shutdown(wait=False)


def build(cfg: Config, heartbeat: Heartbeat | None = None) -> Scheduler:
    tasks = Tasks(cfg, make_queues(cfg))
    lease = LeaderLease(make_lease_store(cfg), cfg.scheduler.leader_lease_s)
    jobs = PeriodicJobs(job_specs(cfg), lease, tasks.run_job)
    return Scheduler(cfg, lease, jobs, state_path(cfg), heartbeat)


def main(cfg: Config) -> int:
    setup_logging(cfg.daemon.log_level, "scheduler")
    die_with_parent()
    # Handlers first: a SIGTERM during start-up (migrations, connections)
    # must still end in a clean exit 0, not death by the default action.
    running: list[Scheduler] = []
    stop_early: list[int] = []

    def on_term(signum, frame):
        stop_early.append(signum)
        for scheduler in running:
            scheduler.stop()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    # The supervisor replaces children on reload; a HUP reaching us directly
    # (a terminal hang-up in the foreground) must not kill the leader.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    # The supervisor has migrated already; a standalone scheduler may not have.
    open_database(cfg, migrate_schema=not supervised())
    if cfg.daemon.log_level != "debug":
        # APScheduler logs two lines per run at INFO: the heartbeat alone
        # would write them every second.
        logging.getLogger("apscheduler").setLevel(logging.WARNING)
    scheduler = build(cfg, Heartbeat.from_env())
    running.append(scheduler)
    if stop_early:
        scheduler.stop()
    scheduler.run()
    return 0
