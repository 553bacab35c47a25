"""The leader lease: exactly one scheduler fires the periodic jobs.

Every daemon sharing a database runs a scheduler; they all contend for one
named lease and only its holder fires jobs. The holder renews it every third
of the lease. When the holder dies its lease expires at most one lease
period after its last renewal, and a follower, ticking every third of the
lease too, takes it over at its next tick (so within 4/3 of a lease of the
death at worst). A holder that fails to renew steps down at once, and one
that could not renew in time (a stall) stops firing before its lease can
expire.

Two backends, chosen by the queue backend:

- Redis (``queue.backend = "redis"``): ``SET key owner NX PX lease`` to take
  it, a compare-and-extend script to renew it, a compare-and-delete script to
  release it. Expiry is Redis's own clock, so host clocks do not matter.
- A row of the ``lease`` table (SQLite and PostgreSQL): one
  ``UPDATE lease SET owner=me, expires_at=now+lease WHERE name=? AND
  (owner=me OR expires_at IS NULL OR expires_at < now)``. The statement is
  atomic on both databases (SQLite's single writer, PostgreSQL's row lock),
  so two contenders can never both see one row updated.

Why a lease row and not a PostgreSQL advisory lock: an advisory lock belongs
to a database session, and our PostgreSQL connections come from a pool. The
pool hands the connection to other code, closes it when stale and reopens it,
and each of those silently drops (or strands) the lock without us knowing.
A session that dies with its host keeps the lock until the server notices the
dead TCP connection, which can take minutes: takeover would not be bounded by
one lease period. A row with an expiry has none of these problems, shows who
leads in plain SQL, and is the same code on SQLite (embedded mode, several
daemons on one host sharing a data dir).

The row variant compares host wall clocks with each other (expires_at is
written by the holder and read by the followers): hosts must run NTP. A skew
below two thirds of the lease is harmless, because a renewed lease always has
at least that much left.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from daemon import owners
from daemon.config import Config
from daemon.store.db import db_session
from daemon.store.models import Lease
from daemon.store.models import iso_z
from daemon.store.models import utcnow

log = logging.getLogger(__name__)

LEADER_LEASE_NAME = "leader:scheduler"
# Stop firing this long before the lease could expire, so a stalled leader
# has stopped before a follower can have started.
SAFETY_MARGIN = 0.1

# KEYS[1] = lease key, ARGV[1] = owner, ARGV[2] = lease in ms.
_EXTEND = """
if redis.call('get', KEYS[1]) == ARGV[1] then
    return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
    return redis.call('del', KEYS[1])
end
return 0
"""


def make_owner_id() -> str:
    """hostname:pid plus a random suffix (pids repeat across restarts and hosts)."""
    return owners.make(socket.gethostname(), os.getpid(), random_bytes=3)


class LeaseStore(Protocol):
    """One attempt at the lease: take it or renew it, or give it back."""

    backend: str

    def try_acquire(self, owner: str, lease_s: float) -> bool: ...

    def release(self, owner: str) -> None: ...

    def holder(self) -> str | None: ...


class DatabaseLeaseStore:
    """The lease as a row of the `lease` table (SQLite or PostgreSQL)."""

    backend = "database"

    def __init__(
        self, name: str = LEADER_LEASE_NAME, clock: Callable[[], dt.datetime] = utcnow
    ):
        self.name = name
        self.clock = clock

    def try_acquire(self, owner: str, lease_s: float) -> bool:
        now = self.clock()
        with db_session():
            # A missing row (first start, or removed by cleanup) is created
            # free; the UPDATE below is then the one contested step.
            Lease.insert(
                name=self.name, owner="", expires_at=None
            ).on_conflict_ignore().execute()
            expires_at = now + dt.timedelta(seconds=lease_s)
            taken = (
                Lease.update(owner=owner, expires_at=expires_at)
                .where(
                    Lease.name == self.name,
                    (Lease.owner == owner)
                    | Lease.expires_at.is_null()
                    | (Lease.expires_at < now),
                )
                .execute()
            )
        return taken == 1

    def release(self, owner: str) -> None:
        with db_session():
            Lease.update(owner="", expires_at=None).where(
                Lease.name == self.name, Lease.owner == owner
            ).execute()

    def holder(self) -> str | None:
        now = self.clock()
        with db_session():
            row = Lease.get_or_none(Lease.name == self.name)
        if row is None or not row.owner or row.expires_at is None:
            return None
        return row.owner if row.expires_at >= now else None


class RedisLeaseStore:
    """The lease as a Redis key with a TTL."""

    backend = "redis"

    def __init__(self, client, key: str):
        self.client = client
        self.key = key
        self._extend = client.register_script(_EXTEND)
        self._release = client.register_script(_RELEASE)

    @classmethod
    def from_config(cls, cfg: Config) -> RedisLeaseStore:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        lease_s = cfg.scheduler.leader_lease_s
        # A renewal must fail well inside one renewal period (lease / 3),
        # never hang past the lease as the client's defaults (5 s timeouts,
        # 10 retries) would: two tries of lease / 8 at most.
        timeout = max(0.1, min(2.0, lease_s / 8))
        client = redis.Redis.from_url(
            cfg.queue_url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 1),
        )
        return cls(client, f"{cfg.queue.name_prefix}:leader:scheduler")

    def try_acquire(self, owner: str, lease_s: float) -> bool:
        ms = max(1, int(lease_s * 1000))
        if self._extend(keys=[self.key], args=[owner, ms]):
            return True
        return bool(self.client.set(self.key, owner, nx=True, px=ms))

    def release(self, owner: str) -> None:
        self._release(keys=[self.key], args=[owner])

    def holder(self) -> str | None:
        value = self.client.get(self.key)
        return value.decode() if isinstance(value, bytes) else value

    def close(self) -> None:
        self.client.close()


def make_lease_store(cfg: Config) -> LeaseStore:
    if cfg.queue.backend == "redis":
        return RedisLeaseStore.from_config(cfg)
    return DatabaseLeaseStore()


def current_holder(cfg: Config) -> str | None:
    """Owner id of the cluster's scheduler leader, whichever host it is on.

    For the status socket and the API: reads the lease where it lives (the
    Redis key or the `lease` row); None when nobody holds it.
    """
    store = make_lease_store(cfg)
    try:
        return store.holder()
    finally:
        close = getattr(store, "close", None)
        if close:
            close()


class LeaderLease:
    """This process's side of the election: renew, step down, say who leads.

    Call `tick()` every `renew_interval_s`; `is_leader()` says whether to
    fire a job right now. Both take an injectable monotonic clock for tests.
    """

    def __init__(
        self,
        store: LeaseStore,
        lease_s: float,
        owner: str | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ):
        self.store = store
        self.lease_s = lease_s
        self.owner = owner or make_owner_id()
        self.monotonic = monotonic
        self.leader = False
        self.since: dt.datetime | None = None
        # Local deadline past which we must assume the lease is gone.
        self._valid_until = 0.0

    @property
    def renew_interval_s(self) -> float:
        return self.lease_s / 3

    def tick(self) -> bool:
        """Take or renew the lease once; True if we lead after it."""
        started = self.monotonic()
        try:
            held = self.store.try_acquire(self.owner, self.lease_s)
        except Exception as exc:  # noqa: BLE001 - any failure means "not renewed"
            if self.leader:
                log.warning("leader lease renewal failed (%s): stepping down", exc)
            else:
                log.debug("leader lease not taken: %s", exc)
            held = False
        if held:
            # Counted from before the call: the store may have set the
            # expiry at any moment during it.
            self._valid_until = started + self.lease_s * (1 - SAFETY_MARGIN)
            if not self.leader:
                self.leader = True
                self.since = utcnow()
                log.info("became scheduler leader (%s)", self.owner)
        elif self.leader:
            self._step_down("lease lost")
        return self.leader

    def is_leader(self) -> bool:
        """Leader and the last renewal is recent enough to still be ours."""
        if self.leader and self.monotonic() >= self._valid_until:
            self._step_down("lease not renewed in time")
        return self.leader

    def release(self) -> None:
        """Give the lease back (clean shutdown) so a follower takes over at once."""
        was_leader = self.leader
        self.leader = False
        self._valid_until = 0.0
        try:
            self.store.release(self.owner)
        except Exception as exc:  # noqa: BLE001 - it expires by itself anyway
            log.warning("could not release the leader lease: %s", exc)
        if was_leader:
            log.info("released the scheduler leader lease")

    def _step_down(self, why: str) -> None:
        self.leader = False
        self.since = None
        self._valid_until = 0.0
        log.warning("no longer scheduler leader: %s", why)

    def state(self) -> dict:
        return {
            "leader": self.leader,
            "owner": self.owner,
            "since": iso_z(self.since, "seconds") if self.leader else None,
            "backend": self.store.backend,
            "lease_s": self.lease_s,
        }


def state_path(cfg: Config) -> Path:
    """Where the scheduler says whether it leads: <data_dir>/run/scheduler.json."""
    return cfg.data_path / "run" / "scheduler.json"


def write_state(path: Path, state: dict) -> None:
    """Replace the state file atomically (readers never see half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {**state, "pid": os.getpid(), "updated_at": time.time()}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(body, sort_keys=True) + "\n")
    os.replace(tmp, path)


def read_state(path: Path, max_age_s: float | None = None) -> dict | None:
    """The scheduler's last state, or None if missing, unreadable or too old.

    A SIGKILLed scheduler leaves its last word behind: pass `max_age_s` (for
    instance two lease periods) to ignore a file nobody refreshes any more.
    """
    try:
        state = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(state, dict):
        return None
    if max_age_s is not None and time.time() - state.get("updated_at", 0) > max_age_s:
        return None
    return state
