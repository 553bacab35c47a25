"""Fixtures for real services: a PostgreSQL database and a Redis prefix per test.

Addresses come from CAMPAIGND_TEST_PG and CAMPAIGND_TEST_REDIS (defaults: the
local servers). When a service does not answer, its tests are skipped, unless
CAMPAIGND_TEST_REQUIRE_SERVICES=1 (set by .ci/run), which makes them fail
(tests.helpers.require). Every database and key this run creates is removed at
the end. Tests using these services get the `postgres` / `redis` marker
automatically, so `-m "not postgres"` leaves them out.
"""

from __future__ import annotations

import itertools
import os
import signal
import uuid
from pathlib import Path
from urllib.parse import urlparse
from urllib.parse import urlunparse

import pytest

from daemon import config as config_mod
from daemon.providers.fake import FakeOptions
from daemon.providers.fake import FakeProvider
from daemon.runtime import FIRST_BEAT_SIGNAL
from tests.helpers import merge
from tests.helpers import require
from tests.helpers import write_config

PG_URL = os.environ.get(
    "CAMPAIGND_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test"
)
REDIS_URL = os.environ.get("CAMPAIGND_TEST_REDIS", "redis://127.0.0.1:6379/0")
RUN_ID = uuid.uuid4().hex[:8]
_counter = itertools.count()


@pytest.fixture(autouse=True, scope="session")
def _take_first_beat_signals():
    """Tests that start a role naming this process as its supervisor get the
    role's first-beat signal (runtime.FIRST_BEAT_SIGNAL), whose default
    action would end the test run. A Python handler, not SIG_IGN: ignored
    signals stay ignored across exec, handlers do not."""
    previous = signal.signal(FIRST_BEAT_SIGNAL, lambda *_: None)
    yield
    signal.signal(FIRST_BEAT_SIGNAL, previous)


def _missing(service: str, why: str):
    require(False, f"{service} not reachable ({why})")


# Fixtures that need a service, and the storage modes (the parameter values of
# the mode fixtures, which fetch pg_url / redis_prefix with getfixturevalue).
SERVICE_FIXTURES = {"pg_url": ("postgres",), "redis_prefix": ("redis",)}
SERVICE_MODES = {
    "cluster": ("postgres", "redis"),
    "pgqueue": ("postgres",),
    "postgres": ("postgres",),
    "redis": ("redis",),
}


def pytest_collection_modifyitems(config, items):
    """Mark every test that uses PostgreSQL or Redis with `postgres` / `redis`."""
    for item in items:
        needs: set[str] = set()
        for name in getattr(item, "fixturenames", ()):
            needs.update(SERVICE_FIXTURES.get(name, ()))
        callspec = getattr(item, "callspec", None)
        for value in callspec.params.values() if callspec else ():
            if isinstance(value, str):
                needs.update(SERVICE_MODES.get(value, ()))
        for marker in sorted(needs):
            if item.get_closest_marker(marker) is None:
                item.add_marker(marker)


def _pg_admin():
    import psycopg

    return psycopg.connect(PG_URL, autocommit=True, connect_timeout=3)


def _with_db(url: str, dbname: str) -> str:
    parts = urlparse(url)
    return urlunparse(parts._replace(path=f"/{dbname}"))


@pytest.fixture(scope="session")
def pg_available():
    try:
        with _pg_admin() as conn:
            conn.execute("SELECT 1")
    except Exception as exc:  # noqa: BLE001 - any failure means "not here"
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return None


@pytest.fixture
def pg_url(pg_available):
    """A fresh, empty PostgreSQL database for this test, dropped afterwards."""
    if pg_available is not None:
        _missing("PostgreSQL", pg_available)
    name = f"cdt_{RUN_ID}_{next(_counter)}"
    with _pg_admin() as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield _with_db(PG_URL, name)
    with _pg_admin() as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def redis_available():
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except Exception as exc:  # noqa: BLE001
        return str(exc) or type(exc).__name__
    return None


@pytest.fixture
def redis_prefix(redis_available):
    """A queue name prefix unique to this test; its keys are deleted afterwards."""
    if redis_available is not None:
        _missing("Redis", redis_available)
    import redis

    prefix = f"cdt_{RUN_ID}_{next(_counter)}"
    yield prefix
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=f"*{prefix}*", count=1000))
    if keys:
        client.delete(*keys)


@pytest.fixture
def base_config(tmp_path) -> dict:
    """Embedded-mode settings for tests: fast polling, no pacing limits."""
    return {
        "daemon": {"data_dir": str(tmp_path / "data"), "stop_timeout_s": 10.0},
        "pacing": {"per_minute": 0.0, "daily_cap": 0},
        "retry": {"base_s": 0.2, "cap_s": 2.0, "jitter": 0.0},
    }


@pytest.fixture
def make_config(tmp_path, base_config):
    """Build a Config (and its TOML file) for a mode: sqlite, cluster, pgqueue."""

    def build(mode: str = "sqlite", extra: dict | None = None, *, pg=None, redis=None):
        data = merge(base_config, extra or {})
        if mode in ("cluster", "pgqueue"):
            data = merge(data, {"database": {"url": pg}})
        if mode == "cluster":
            data = merge(
                data,
                {"queue": {"backend": "redis", "url": REDIS_URL, "name_prefix": redis}},
            )
        if mode == "pgqueue":
            data = merge(data, {"queue": {"backend": "postgres"}})
        path = write_config(tmp_path / f"campaignd-{next(_counter)}.toml", data)
        return config_mod.load(path)

    return build


@pytest.fixture(params=["sqlite", "cluster"])
def any_mode_config(request, make_config):
    """A Config in each storage mode (cluster = PostgreSQL + Redis)."""
    if request.param == "sqlite":
        return make_config("sqlite")
    pg = request.getfixturevalue("pg_url")
    prefix = request.getfixturevalue("redis_prefix")
    return make_config("cluster", pg=pg, redis=prefix)


@pytest.fixture
def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


@pytest.fixture
def fake_options() -> FakeOptions:
    """The `fake` provider's options: as the real providers, no dedupe (a
    repeated reference is a second message); a test module overrides this
    fixture for others (a token, replies, latency)."""
    return FakeOptions(ack_delays_ms=())


@pytest.fixture
def fake(fake_options):
    """A fake provider on loopback for the test's duration."""
    with FakeProvider(fake_options) as server:
        yield server
