"""A web port already taken is one line naming web.host:web.port, not a
traceback per respawn."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

ROOT = Path(__file__).resolve().parents[2]


def test_campaignd_web_on_a_taken_port_says_so_in_one_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        cfg = tmp_path / "c.toml"
        cfg.write_text(
            f'[daemon]\ndata_dir = "{tmp_path / "data"}"\n[web]\nport = {port}\n'
        )
        env = {k: v for k, v in os.environ.items() if k != "CAMPAIGND_CONFIG"}
        done = subprocess.run(
            [sys.executable, "-m", "daemon", "web", "-c", str(cfg)],
            capture_output=True,
            text=True,
            timeout=40,
            cwd=ROOT,
            env=env,
        )
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    # (A fresh data dir also logs its migrations at INFO.)
    lines = [x for x in done.stderr.splitlines() if "applied migration" not in x]
    assert len(lines) == 1, done.stderr
    assert lines[0].endswith(
        f"ERROR [web] daemon.roles.web.app: cannot listen on 127.0.0.1:{port}"
        " (web.host, web.port): Address already in use"
    )


def test_under_the_supervisor_the_reason_is_the_roles_last_exit(tmp_path):
    from daemon import status_client
    from tests.helpers import wait_for

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        cfg = tmp_path / "c.toml"
        cfg.write_text(
            f'[daemon]\ndata_dir = "{tmp_path / "data"}"\nlog_level = "warning"\n'
            f"[web]\nport = {port}\n"
        )
        env = {k: v for k, v in os.environ.items() if k != "CAMPAIGND_CONFIG"}
        daemon = subprocess.Popen(
            [sys.executable, "-m", "daemon", "run", "-c", str(cfg)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            cwd=ROOT,
            env=env,
        )
        sock = tmp_path / "data" / "campaignd.sock"

        def web_last_exit():
            try:
                answer = status_client.request(sock, {"cmd": "status"}, timeout=2)
            except OSError:
                return None
            web = next((r for r in answer.get("roles", []) if r["name"] == "web"), {})
            return web.get("last_exit")

        try:
            last = wait_for(web_last_exit, timeout=40, interval=0.2, what="web exit")
        finally:
            daemon.terminate()
            _, err = daemon.communicate(timeout=40)
    assert last == (
        f"exited 1: cannot listen on 127.0.0.1:{port} (web.host, web.port):"
        " Address already in use"
    )
    assert "Traceback" not in err.decode()


def test_a_draining_web_role_frees_its_port_and_answers_what_it_took(tmp_path, pg_url):
    """SIGTERM closes the listener at once; the requests taken are answered
    after.

    A daemon restarted at once after its supervisor died starts a web role
    while the old one (SIGTERMed by the kernel) still drains: the new one
    must be able to bind the port then, not back off until the old is gone.
    PostgreSQL, because the test holds back one webhook's INSERT with an
    uncommitted row of the same dedupe key, which the replacement's own
    start (its migrations) does not wait for.
    """
    import threading

    import psycopg

    from daemon.providers import webhook_parser
    from daemon.roles.web.webhooks import storable_key
    from daemon.testing import free_port
    from tests.event_helpers import wassenger_reply
    from tests.helpers import healthz_ok
    from tests.helpers import post_webhook
    from tests.helpers import wait_for

    port = free_port()
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        f'[daemon]\ndata_dir = "{tmp_path / "data"}"\nlog_level = "warning"\n'
        f'[database]\nurl = "{pg_url}"\n[web]\nport = {port}\n'
        "[supervisor]\nheartbeat_interval_s = 0.1\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "CAMPAIGND_CONFIG"}
    beats = tmp_path / "old-web.beat"
    body = wassenger_reply("+33612345678", "oui", msg_id="DRAIN1")
    ((key, _),) = webhook_parser("wassenger").split(body)
    key = storable_key(key)

    def start_web(**extra_env) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "daemon", "web", "-c", str(cfg)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            cwd=ROOT,
            env={**env, **extra_env},
        )

    answers: list = []

    def healthz() -> bool:
        return healthz_ok(port)

    def post() -> None:
        post_webhook(port, body, answers)

    # The old role beats as under the supervisor: its self-check GETs its
    # own /healthz every 0.1 s.
    old = start_web(CAMPAIGND_HEARTBEAT_FILE=str(beats))
    new = None
    blocker = psycopg.connect(pg_url)  # a transaction, left open
    watcher = psycopg.connect(pg_url, autocommit=True)
    try:
        wait_for(healthz, timeout=30, what="the first web role")
        blocker.execute(
            "INSERT INTO inbound_event (provider, dedupe_key, event_type, payload,"
            " received_at, attempts) VALUES ('wassenger', %s, 'x', '{}', now(), 0)",
            (key,),
        )
        threading.Thread(target=post, daemon=True).start()

        def insert_waiting() -> bool:
            # The web role's INSERT waits for our row's transaction.
            row = watcher.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname ="
                " current_database() AND wait_event_type = 'Lock'"
            ).fetchone()
            return row[0] > 0

        wait_for(insert_waiting, timeout=20, what="the webhook's INSERT waiting")
        old.terminate()
        # The parent-death SIGTERM can come more than once (once per thread
        # of a dying supervisor): a second one changes nothing.
        old.terminate()
        # Only the replacement can answer from now on: the old role's
        # listener is closed.
        wait_for(lambda: not healthz(), timeout=20, what="the old role to stop")
        new = start_web()
        wait_for(
            lambda: healthz() or new.poll() is not None,
            timeout=30,
            what="the replacement web role answering",
        )
        assert new.poll() is None, new.stderr.read().decode()
        assert old.poll() is None, "the old role should still be draining"
        blocker.rollback()
        # Nothing it had taken is lost: its INSERT goes through now.
        wait_for(
            lambda: (
                watcher.execute(
                    "SELECT count(*) FROM inbound_event WHERE dedupe_key = %s", (key,)
                ).fetchone()[0]
                == 1
            ),
            timeout=20,
            what="the old role's event stored",
        )
        # ... and the provider has its answer: the event is not delivered
        # again for want of one (the drain answers every request taken).
        wait_for(lambda: answers, timeout=20, what="the old role's answer")
        assert answers == [(200, "close", b'{"stored":1,"duplicates":0}')]
        assert old.wait(timeout=30) == 0
    finally:
        blocker.close()
        watcher.close()
        for proc in (old, new):
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=30)
    # While it drained, its self-check stopped beating without a warning that
    # its own /healthz failed (the listener was closed on purpose).
    assert beats.read_text(), "the old role never beat"
    assert "self-check" not in old.stderr.read().decode()
