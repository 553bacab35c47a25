"""database.url keeps its options: what the URL says reaches the real server."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time

import peewee as pw
import pytest

from daemon import config as config_mod
from daemon.errors import EXIT_CONFIG
from daemon.errors import ConfigError
from daemon.store.db import make_database
from daemon.store.db import postgres_params
from tests.helpers import dump_toml
from tests.helpers import subprocess_env


def _connect(url: str) -> pw.Database:
    cfg = config_mod.from_dict({"database": {"url": url}}, env={})
    db = make_database(cfg.database_url, cfg)
    db.connect()
    return db


def test_query_options_reach_the_server(pg_url):
    db = _connect(f"{pg_url}?sslmode=disable&application_name=campaignd-test")
    try:
        rows = db.execute_sql(
            "SELECT current_setting('application_name'), ssl FROM pg_stat_ssl"
            " WHERE pid = pg_backend_pid()"
        ).fetchall()
    finally:
        db.close_all()
    assert rows == [("campaignd-test", False)]


def test_sslmode_require_is_obeyed(pg_url):
    with contextlib.closing(_connect(pg_url)) as db:
        server_ssl = db.execute_sql("SHOW ssl").fetchone()[0] == "on"
    url = f"{pg_url}?sslmode=require"
    if server_ssl:
        db = _connect(url)
        try:
            (encrypted,) = db.execute_sql(
                "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
            ).fetchone()
        finally:
            db.close_all()
        assert encrypted is True
    else:
        # The test server has no TLS: a URL that demands it must not connect
        # in clear (as it did when the option was dropped).
        with pytest.raises(pw.OperationalError, match="SSL"):
            _connect(url)


@pytest.fixture
def silent_server():
    """A TCP port that accepts connections and never answers a byte."""
    with socket.create_server(("127.0.0.1", 0), backlog=8) as server:
        yield server.getsockname()[1]


def test_connect_timeout_from_the_url(silent_server):
    # libpq's smallest timeout is 2 s; our default when the URL says none is 5.
    url = f"postgresql://u@127.0.0.1:{silent_server}/db?connect_timeout=2"
    started = time.monotonic()
    with pytest.raises(pw.OperationalError, match="timeout"):
        _connect(url)
    elapsed = time.monotonic() - started
    assert 1.5 < elapsed < 4.5


def test_defaults_where_the_url_is_silent():
    assert postgres_params("postgresql://") == {
        "host": "127.0.0.1",
        "dbname": "postgres",
        "connect_timeout": 5,
    }
    params = postgres_params("postgres://u:p%40ss@db:6432/camp%20d?connect_timeout=9")
    assert params == {
        "user": "u",
        "password": "p@ss",
        "host": "db",
        "port": "6432",
        "dbname": "camp d",
        "connect_timeout": "9",
    }


def test_an_unknown_option_is_a_config_error_naming_the_key():
    with pytest.raises(ConfigError) as info:
        postgres_params("postgresql://db/x?sslmod=require")
    assert str(info.value) == 'database.url: invalid URI query parameter: "sslmod"'


def test_missing_driver_names_the_extra_to_install(tmp_path):
    # A real CLI run in an interpreter where psycopg cannot be imported.
    path = tmp_path / "c.toml"
    path.write_text(
        dump_toml(
            {
                "daemon": {"data_dir": str(tmp_path / "data")},
                "database": {"url": "postgresql://u@127.0.0.1:1/x"},
            }
        )
    )
    code = (
        "import sys; sys.modules['psycopg'] = None; "
        "from daemon.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, "campaign", "list", "-c", str(path)],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=60,
        check=False,
    )
    assert proc.returncode == EXIT_CONFIG, proc.stderr
    assert proc.stderr == (
        "campaignd: config error: database.url: PostgreSQL needs the psycopg "
        "driver, not installed: pip install 'campaignd[postgres]'\n"
    )
