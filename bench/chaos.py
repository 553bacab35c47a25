"""Chaos: a whole campaign under SIGKILLs and service restarts, then an audit.

The real daemon (`campaignd run`, every role) runs under a restart loop that
stands in for systemd's Restart=always (RestartSec=5). The fake provider
answers in 20 ms, fails 10 % of calls (5 % 500, 5 % 429 with Retry-After: 1),
posts delivery acks 2 s late, and makes 30 % of the contacts reply (a tenth of
those with STOP), each reply before any status of the message it answers. It
does not dedupe references (as at Wassenger and Meta): a send repeated after
a crash is a second message on the phone, and the audit counts messages per
phone and kind. provider.confirm_window_s is 60 s. While the campaign runs:

- a random worker child is SIGKILLed every 0.5 s;
- the web child is SIGKILLed several times while webhooks arrive;
- the supervisor itself is SIGKILLed once (its children follow it through
  PR_SET_PDEATHSIG) and restarted 5 s later;
- cluster mode (our own PostgreSQL + Redis on free ports): Redis is killed
  and restarted empty once (every queued task is gone), PostgreSQL is
  crashed (pg_ctl -m immediate) and restarted once.

Then, once the campaign has completed and every webhook has settled, the rows
are compared with what the fake provider accepted (daemon/testing/audit.py
`Audit` defines each figure). Target: zero in every loss and duplicate column.

    .venv/bin/python -m bench.chaos --mode embedded|cluster|both \
        [--contacts 2000] [--short] [--keep] [--json]

With --json, one JSON document on stdout (`as_json`) instead of the table,
the progress on stderr: tests/e2e/test_chaos.py runs the short run that way.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from daemon import testing as ch  # noqa: E402
from daemon.providers.fake import FakeOptions  # noqa: E402
from daemon.providers.fake import FakeProvider  # noqa: E402

# Fractions of the Message 1 sends accepted at which one-off faults fire.
WEB_KILL_AT = (0.1, 0.25, 0.4, 0.55, 0.7, 0.85)
# Two web kills at least this far apart, even when progress jumps past two
# thresholds at once: each kill must meet webhooks in flight.
WEB_KILL_SPACING_S = 3.0
SUPERVISOR_KILL_AT = 0.45
REDIS_RESTART_AT = 0.2
POSTGRES_RESTART_AT = 0.65
# Statuses come this much later than the fake's own 50/150/300 ms acks.
STATUS_DELAY_MS = 2000.0
# provider.confirm_window_s for the run (300 s by default): longer than the
# slowest evidence here (a status retried by the fake through a web outage,
# then its processing task lost with a killed worker and replayed by the
# sweeper after its 30 s grace), short enough that a send that never reached
# the provider is re-sent within the run.
CONFIRM_WINDOW_S = 60.0
# How long after the supervisor kill its children may still be draining
# (SIGTERM from PDEATHSIG: waitress gives requests 5 s, Huey stop_timeout-2).
ORPHAN_CHECK_AFTER_S = 12.0


@dataclass(frozen=True)
class ChaosSpec:
    mode: str = "embedded"  # embedded (SQLite) or cluster (PostgreSQL + Redis)
    contacts: int = 2000
    worker_kill_every_s: float = 0.5
    web_kills: int = len(WEB_KILL_AT)
    supervisor_kill: bool = True
    service_restarts: bool = True  # cluster mode only
    restart_delay_s: float = 5.0
    # Longer than the worst event-processing delay under chaos: a reply whose
    # processing task died with its worker waits for the sweeper's 30 s grace
    # (see docs/reliability.md on the expiry race).
    reply_window_s: float = 60.0
    seed: int = 7
    deadline_s: float = 900.0
    # Faults go on at least this long, through the replies and Message 2s.
    min_chaos_s: float = 60.0
    keep: bool = False
    log_level: str = "warning"

    @classmethod
    def short(cls, mode: str = "embedded", contacts: int = 200) -> ChaosSpec:
        # 210 s: a send that never reached the provider waits out the 60 s
        # confirm window, then the 40 s reply window of its contact.
        return cls(
            mode=mode,
            contacts=contacts,
            web_kills=3,
            reply_window_s=40.0,
            deadline_s=210.0,
            min_chaos_s=30.0,
        )


@dataclass
class ChaosResult:
    spec: ChaosSpec
    audit: ch.Audit
    worker_kills: int = 0
    web_kills: int = 0
    supervisor_kills: int = 0
    supervisor_starts: int = 0
    redis_restarts: int = 0
    postgres_restarts: int = 0
    orphans_after_supervisor_kill: int = 0
    provider_500: int = 0
    provider_429: int = 0
    chaos_s: float = 0.0
    quiescence_s: float = 0.0  # campaign start -> everything settled
    recovery_s: float = 0.0  # end of chaos -> everything settled
    final_exit_code: int | None = None
    unexpected_exits: list = field(default_factory=list)
    fatal_roles: int = 0
    tracebacks: int = 0
    workdir: str = ""
    timed_out: bool = False

    @property
    def clean(self) -> bool:
        return (
            self.audit.clean
            and not self.timed_out
            and self.final_exit_code == 0
            and self.audit.campaign_status == "completed"
        )


def fake_options(web_port: int, seed: int) -> FakeOptions:
    return FakeOptions(
        latency_ms=20.0,
        fail_rate=0.05,
        rate_limit_rate=0.05,
        retry_after_s=1,
        webhook_url=f"http://127.0.0.1:{web_port}/webhooks/wassenger",
        webhook_secret=ch.WEBHOOK_SECRET,
        # Providers retry webhooks for hours; 12 doublings from 250 ms cover
        # many minutes, far more than our longest outage here.
        webhook_retries=12,
        webhook_backoff_ms=250.0,
        reply_share=0.3,
        opt_out_share=0.1,
        reply_delay_ms=800.0,
        seed=seed,
        # As the real providers behave (issue 13): no dedupe (a repeated
        # reference is a second message on the phone, which the audit counts
        # per phone and kind), statuses a little late, and for a contact who
        # replies, the reply before any status of the message it answers.
        dedupe=False,
        status_delay_ms=STATUS_DELAY_MS,
        reply_before_status=True,
    )


def daemon_tables(
    spec: ChaosSpec, workdir: Path, fake_url: str, web_port: int, pg=None, redis=None
) -> dict:
    tables = ch.fast_tables(workdir, fake_url, web_port)
    extra = {
        "daemon": {"log_level": spec.log_level},
        "campaigns": {"reply_window_h": spec.reply_window_s / 3600.0},
        "provider": {"confirm_window_s": CONFIRM_WINDOW_S},
        # SIGKILLs every 0.5 s are a crash loop by any measure: the policy
        # that would park a role as FATAL for 5 minutes is not what is
        # under test here, data safety is. Respawns stay quick.
        "supervisor": {
            "crash_loop_exits": 1000,
            "backoff_max_s": 0.5,
            "healthy_after_s": 5.0,
            "check_interval_s": 1.0,
        },
    }
    if spec.mode == "cluster":
        extra["database"] = {"url": pg.url}
        extra["queue"] = {"backend": "redis", "url": redis.url, "name_prefix": "chaos"}
    return ch.merge_tables(tables, extra)


class Monkey:
    """Fires the faults from the main loop, by elapsed time and by progress."""

    def __init__(
        self,
        spec: ChaosSpec,
        daemon: ch.DaemonUnderTest,
        result,
        pg=None,
        redis=None,
        log=print,
    ):
        self.spec = spec
        self.daemon = daemon
        self.result = result
        self.pg = pg
        self.redis = redis
        self.log = log
        self.rng = random.Random(spec.seed)
        self.next_worker_kill = 0.0
        self.next_web_kill = 0.0
        self.web_kill_at = list(WEB_KILL_AT[: spec.web_kills])
        self.supervisor_kill_pending = spec.supervisor_kill
        cluster = spec.mode == "cluster" and spec.service_restarts
        self.redis_pending = cluster
        self.postgres_pending = cluster
        self.orphan_check: tuple[float, list[int]] | None = None
        # Who runs what, from the status socket, refreshed in the background:
        # an answer can take up to a second while figures are gathered.
        self.roles: dict[int, str] = {}
        self._stop = threading.Event()
        self._poller = threading.Thread(
            target=self._poll_roles, daemon=True, name="role-poller"
        )
        self._poller.start()

    def _poll_roles(self) -> None:
        while not self._stop.wait(0.2):
            try:
                self.roles = self.daemon.running_roles()
            except Exception as exc:  # noqa: BLE001 - the chaos must go on
                self.log(f"  role poll failed: {type(exc).__name__}: {exc}")
                self.roles = {}

    def close(self) -> None:
        self._stop.set()
        self._poller.join(5)

    def _kill(self, prefix: str):
        killed = self.daemon.kill_role(prefix, self.rng, dict(self.roles))
        if killed:
            self.roles.pop(killed[0], None)
        return killed

    @property
    def one_offs_done(self) -> bool:
        return not (
            self.web_kill_at
            or self.supervisor_kill_pending
            or self.redis_pending
            or self.postgres_pending
            or self.orphan_check
        )

    def step(self, progress: float, now: float) -> None:
        if now >= self.next_worker_kill:
            self.next_worker_kill = now + self.spec.worker_kill_every_s
            if self._kill("worker:"):
                self.result.worker_kills += 1
        if (
            self.web_kill_at
            and progress >= self.web_kill_at[0]
            and now >= self.next_web_kill
        ):
            if self._kill("web"):
                self.next_web_kill = now + WEB_KILL_SPACING_S
                self.web_kill_at.pop(0)
                self.result.web_kills += 1
                self.log(f"  {progress:4.0%} SIGKILL web")
        if self.supervisor_kill_pending and progress >= SUPERVISOR_KILL_AT:
            kids = self.daemon.kill_supervisor()
            if kids:
                self.supervisor_kill_pending = False
                self.result.supervisor_kills += 1
                self.orphan_check = (now + ORPHAN_CHECK_AFTER_S, kids)
                self.log(
                    f"  {progress:4.0%} SIGKILL supervisor "
                    f"({len(kids)} children); restart in "
                    f"{self.spec.restart_delay_s:g}s"
                )
        if self.orphan_check and now >= self.orphan_check[0]:
            left = ch.alive(self.orphan_check[1])
            self.result.orphans_after_supervisor_kill = len(left)
            self.orphan_check = None
        if self.redis_pending and progress >= REDIS_RESTART_AT:
            self.redis_pending = False
            self.log(f"  {progress:4.0%} redis killed (queues lost), back in 2 s")
            self.redis.restart(down_s=2.0)
            self.result.redis_restarts += 1
        if self.postgres_pending and progress >= POSTGRES_RESTART_AT:
            self.postgres_pending = False
            self.log(f"  {progress:4.0%} postgres crashed, back in 3 s")
            self.pg.restart(down_s=3.0)
            self.result.postgres_restarts += 1


def run_scenario(spec: ChaosSpec, log=print) -> ChaosResult:
    """Run one chaos scenario end to end and audit it."""
    workdir = Path(tempfile.mkdtemp(prefix=f"chaos-{spec.mode}-", dir="/tmp"))
    pg = redis = daemon = None
    result = ChaosResult(spec=spec, audit=ch.Audit(), workdir=str(workdir))
    try:
        if spec.mode == "cluster":
            pg = ch.OwnPostgres().start()
            redis = ch.OwnRedis(workdir / "redis").start()
        web_port = ch.free_port()
        options = fake_options(web_port, spec.seed)
        with FakeProvider(options) as fake:
            tables = daemon_tables(spec, workdir, fake.url, web_port, pg, redis)
            cfg = ch.write_config(workdir, tables)
            daemon = ch.DaemonUnderTest(cfg, workdir, spec.restart_delay_s).start()
            daemon.wait_ready(90)
            phones = ch.contact_phones(spec.contacts)
            valid = sum(1 for p in phones if not p.endswith("0000"))
            campaign_id = ch.seed_campaign(cfg, phones)
            started = time.monotonic()
            log(f"[{spec.mode}] campaign {campaign_id}: {spec.contacts} contacts")
            _chaos_phase(spec, daemon, fake, result, valid, started, pg, redis, log)
            chaos_end = time.monotonic()
            result.chaos_s = chaos_end - started
            settled = _wait_quiescent(campaign_id, fake, started + spec.deadline_s)
            result.timed_out = not settled
            end = time.monotonic()
            result.quiescence_s = end - started
            result.recovery_s = end - chaos_end
            result.audit = ch.audit(campaign_id, fake, options)
            stats = fake.stats()
            result.provider_500 = stats["failures_500"]
            result.provider_429 = stats["failures_429"]
            result.unexpected_exits = list(daemon.exits)
            result.supervisor_starts = daemon.starts
            result.final_exit_code = daemon.stop()
            text = daemon.log_text()
            result.fatal_roles = text.count("-> FATAL")
            result.tracebacks = text.count("Traceback (most recent call last)")
    finally:
        if daemon is not None:
            daemon.close()
        if redis is not None:
            redis.close()
        if pg is not None:
            pg.close()
        if not spec.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return result


def _chaos_phase(spec, daemon, fake, result, valid, started, pg, redis, log):
    """Faults until each one-off fired, every valid contact got Message 1, the
    webhooks drained once, and at least `min_chaos_s` passed."""
    monkey = Monkey(spec, daemon, result, pg, redis, log)
    try:
        _run_monkey(monkey, spec, fake, valid, started, log)
    finally:
        monkey.close()


def _run_monkey(monkey, spec, fake, valid, started, log) -> None:
    deadline = started + spec.deadline_s * 0.7
    progress, next_count, next_report = 0.0, 0.0, started + 30.0
    while True:
        now = time.monotonic()
        if now >= next_count:  # the message list is big: not every tick
            next_count = now + 0.5
            progress = min(1.0, _message1_accepted(fake) / max(valid, 1))
        if now >= next_report:
            next_report = now + 30.0
            log(
                f"  {now - started:5.0f}s: Message 1 {progress:4.0%}, "
                f"{monkey.result.worker_kills} worker kills, "
                f"{len(monkey.roles)} roles RUNNING"
            )
        monkey.step(progress, now)
        if (
            monkey.one_offs_done
            and progress >= 1.0
            and now - started >= spec.min_chaos_s
            and fake.stats()["webhooks_pending"] == 0
        ):
            return
        if now > deadline:
            log(f"  chaos phase deadline reached at {progress:.0%}")
            return
        time.sleep(0.05)


def _message1_accepted(fake) -> int:
    return sum(1 for m in fake.messages() if m["message"].startswith(ch.MESSAGE1_MARK))


def _wait_quiescent(campaign_id: int, fake, deadline: float) -> bool:
    """Nothing more will happen (daemon.testing.settled), 3 polls in a row."""
    calm = 0
    while time.monotonic() < deadline:
        calm = calm + 1 if ch.settled(ch.campaign_state(campaign_id), fake) else 0
        if calm >= 3:
            return True
        time.sleep(0.25)
    return False


# ---------------------------------------------------------------------- table


ROWS = (
    ("contacts in the campaign", lambda r: r.audit.members),
    ("Message 1 accepted by the provider", lambda r: r.audit.message1_accepted),
    ("Message 1 failed (not on WhatsApp)", lambda r: r.audit.message1_failed),
    ("contacts who replied (not STOP)", lambda r: r.audit.replying_contacts),
    ("Message 2 accepted by the provider", lambda r: r.audit.message2_accepted),
    ("provider 500 / 429 answers", lambda r: f"{r.provider_500} / {r.provider_429}"),
    ("worker SIGKILLs", lambda r: r.worker_kills),
    ("web SIGKILLs", lambda r: r.web_kills),
    ("supervisor SIGKILLs (restarted after 5 s)", lambda r: r.supervisor_kills),
    (
        "Redis / PostgreSQL restarts",
        lambda r: f"{r.redis_restarts} / {r.postgres_restarts}",
    ),
    (
        "children left 12 s after the supervisor kill",
        lambda r: r.orphans_after_supervisor_kill,
    ),
    ("LOST messages", lambda r: r.audit.lost),
    ("recorded sent, unknown to the provider", lambda r: r.audit.sent_but_unknown),
    (
        "DUPLICATE deliveries (per phone and kind, by text)",
        lambda r: r.audit.duplicate_deliveries,
    ),
    ("DUPLICATES per phone (fake's phone counts)", lambda r: r.audit.phone_duplicates),
    ("max acceptances of one reference", lambda r: r.audit.per_reference_max),
    ("same reference sent again (no dedupe)", lambda r: r.audit.duplicate_requests),
    ("sends ever unconfirmed (outcome unknown)", lambda r: r.audit.unconfirmed),
    ("  re-sent for want of evidence", lambda r: r.audit.resent_no_evidence),
    ("  still unconfirmed at the end", lambda r: r.audit.still_unconfirmed),
    ("repliers without Message 2", lambda r: r.audit.message2_missing),
    ("extra Message 2 (>1, or to a non-replier)", lambda r: r.audit.message2_extra),
    ("acknowledged events never processed", lambda r: r.audit.unprocessed_events),
    ("acknowledged replies not stored", lambda r: r.audit.replies_not_stored),
    ("webhooks the provider gave up on", lambda r: r.audit.webhooks_given_up),
    ("campaign status", lambda r: r.audit.campaign_status),
    (
        "members stuck 'interacted' after Message 2 sent",
        lambda r: r.audit.stuck_members,
    ),
    ("chaos phase (s)", lambda r: f"{r.chaos_s:.1f}"),
    ("start -> quiescent (s)", lambda r: f"{r.quiescence_s:.1f}"),
    ("end of chaos -> quiescent (s)", lambda r: f"{r.recovery_s:.1f}"),
    ("roles that went FATAL", lambda r: r.fatal_roles),
    ("tracebacks in the daemon log", lambda r: r.tracebacks),
    ("final SIGTERM exit code", lambda r: r.final_exit_code),
    ("verdict", lambda r: "CLEAN" if r.clean else "NOT CLEAN"),
)


def table(results: list[ChaosResult]) -> str:
    headers = ["", *(r.spec.mode for r in results)]
    body = [[label, *(str(get(r)) for r in results)] for label, get in ROWS]
    widths = [max(len(row[i]) for row in [headers, *body]) for i in range(len(headers))]

    def line(cells):
        first = cells[0].ljust(widths[0])
        rest = [c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)]
        return "| " + " | ".join([first, *rest]) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), sep, *(line(row) for row in body)])


def as_json(results: list[ChaosResult]) -> str:
    """Every figure of each run, its verdict and the fake provider's options."""
    return json.dumps(
        [
            {
                **dataclasses.asdict(r),
                "clean": r.clean,
                "provider_options": dataclasses.asdict(fake_options(0, r.spec.seed)),
            }
            for r in results
        ],
        indent=1,
        default=str,
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.chaos", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--mode", choices=("embedded", "cluster", "both"), default="embedded"
    )
    parser.add_argument("--contacts", type=int, default=None)
    parser.add_argument(
        "--short",
        action="store_true",
        help="200 contacts, 3 web kills, 40 s reply window",
    )
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--keep", action="store_true", help="keep the work dirs")
    parser.add_argument("--log-level", default="warning", help="the daemon's")
    parser.add_argument(
        "--json", action="store_true", help="print JSON (progress to stderr)"
    )
    args = parser.parse_args(argv)
    out = sys.stderr if args.json else sys.stdout

    def say(*parts) -> None:
        print(*parts, file=out, flush=True)

    modes = ("embedded", "cluster") if args.mode == "both" else (args.mode,)
    if "cluster" in modes and not (
        ch.OwnPostgres.available() and ch.OwnRedis.available()
    ):
        print(
            "chaos: cluster mode needs redis-server and PostgreSQL binaries",
            file=sys.stderr,
        )
        return 2
    results = []
    for mode in modes:
        if args.short:
            spec = ChaosSpec.short(mode, args.contacts or 200)
        else:
            spec = ChaosSpec(mode=mode, contacts=args.contacts or 2000)
        spec = dataclasses.replace(
            spec, seed=args.seed, keep=args.keep, log_level=args.log_level
        )
        results.append(run_scenario(spec, log=say))
        if results[-1].spec.keep:
            say(f"  work dir kept: {results[-1].workdir}")
        for name, examples in results[-1].audit.details.items():
            if examples:
                say(f"  {name}: {examples}")
    say()
    say(table(results))
    if args.json:
        print(as_json(results))
    return 0 if all(r.clean for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
