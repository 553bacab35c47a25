"""A replaced web role (reload, `campaignd restart web`) is served by its
successor while the old process still drains what it took.

The real `campaignd run` on PostgreSQL: the test holds back one webhook's
INSERT with an uncommitted row of the same dedupe key, so the old web role
has a request in flight when it is asked to stop.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import psutil
import pytest

from daemon import status as status_mod
from tests.helpers import free_port
from tests.helpers import healthz_ok
from tests.helpers import post_webhook
from tests.helpers import subprocess_env
from tests.helpers import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_a_restarted_web_role_serves_while_the_old_one_drains(tmp_path, pg_url):
    import psycopg

    from daemon.providers import webhook_parser
    from daemon.roles.web.webhooks import storable_key
    from tests.event_helpers import wassenger_reply

    port = free_port()
    sock = Path(tempfile.mkdtemp(prefix="cdweb", dir="/tmp")) / "s.sock"
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        f'[daemon]\ndata_dir = "{tmp_path / "data"}"\nlog_level = "warning"\n'
        f'[database]\nurl = "{pg_url}"\n[web]\nport = {port}\n'
        f'[status]\nsocket = "{sock}"\n'
        "[supervisor]\nheartbeat_interval_s = 0.2\ncheck_interval_s = 0.5\n"
    )
    body = wassenger_reply("+33612345678", "oui", msg_id="REPLACE1")
    ((key, _),) = webhook_parser("wassenger").split(body)
    key = storable_key(key)

    def status() -> dict | None:
        try:
            return status_mod.request(sock, {"cmd": "status"})
        except (OSError, ValueError):
            return None

    def web() -> dict:
        roles = (status() or {"roles": []})["roles"]
        return next((r for r in roles if r["name"] == "web"), {})

    answers: list = []

    def healthz() -> bool:
        return healthz_ok(port)

    def post() -> None:
        post_webhook(port, body, answers)

    daemon = subprocess.Popen(
        [sys.executable, "-m", "daemon", "run", "-c", str(cfg)],
        cwd=REPO_ROOT,
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    blocker = watcher = None
    try:
        wait_for(
            lambda: (
                (s := status()) and all(r["state"] == "RUNNING" for r in s["roles"])
            ),
            timeout=60,
            what="every role RUNNING",
        )
        old = web()["pid"]
        blocker = psycopg.connect(pg_url)  # a transaction, left open
        watcher = psycopg.connect(pg_url, autocommit=True)
        blocker.execute(
            "INSERT INTO inbound_event (provider, dedupe_key, event_type, payload,"
            " received_at, attempts) VALUES ('wassenger', %s, 'x', '{}', now(), 0)",
            (key,),
        )
        threading.Thread(target=post, daemon=True).start()
        wait_for(
            lambda: watcher.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname ="
                " current_database() AND wait_event_type = 'Lock'"
            ).fetchone()[0],
            timeout=20,
            what="the webhook's INSERT waiting",
        )

        answer = status_mod.request(sock, {"cmd": "restart", "role": "web"})
        assert answer == {"ok": True, "restarting": ["web"]}

        # The successor runs and answers while the old process still drains.
        new = wait_for(
            lambda: (w := web()).get("state") == "RUNNING" and w["pid"] != old and w,
            timeout=30,
            what="the successor RUNNING",
        )
        assert psutil.pid_exists(old), "the old web role should still be draining"
        wait_for(healthz, timeout=10, what="/healthz answered by the successor")
        assert not answers, "the held webhook should still be in flight"

        blocker.rollback()
        wait_for(lambda: answers, timeout=20, what="the old role's answer")
        assert answers == [(200, "close", b'{"stored":1,"duplicates":0}')]
        wait_for(lambda: not psutil.pid_exists(old), timeout=20, what="the old exit")
        back = wait_for(
            lambda: (w := web()).get("last_exit") == "exited 0" and w,
            timeout=10,
            what="the old role's exit shown as the role's last",
        )
        assert (back["pid"], back["restarts"]) == (new["pid"], 0)
    finally:
        for conn in (blocker, watcher):
            if conn is not None:
                conn.close()
        daemon.terminate()
        _, err = daemon.communicate(timeout=60)
    assert daemon.returncode == 0, err.decode()[-2000:]
    assert "Traceback" not in err.decode()
