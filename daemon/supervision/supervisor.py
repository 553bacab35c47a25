"""The supervisor: one process tree that heals itself, talks to systemd and
answers on a status socket (design sections 1 and 6).

`Supervisor.run()` is one selector loop woken by signals (set_wakeup_fd), the
status socket, finished background jobs, or the next deadline any step asked
for; there is no fixed tick. Each pass runs named steps:

    wait -> handle_signals -> reap_children -> check_heartbeats ->
    check_resources -> manage_children -> collect_jobs -> check_alerts ->
    notify_systemd -> serve_status

Signal handlers only record the signal; `handle_<name>` methods act on it, and
status-socket commands reach the same methods. Children are exec'ed
(posix_spawn), reaped only here with waitpid(-1, WNOHANG). Database work
(lease release, alert rows, status figures) and alert webhooks run in small
thread pools, so the loop never waits on a database lock or a slow receiver.

This module holds the loop, the signals and the children; the rest of the
supervisor's work is one module each, mixed into `Supervisor`: reload.py
(config snapshot, roles replaced one by one), alerting.py (role and
dependency alerts), status_requests.py (status socket answers), jobs.py
(background work), systemd.py (READY, STATUS, WATCHDOG), and hooks.py (what
it does to the application's rows, wired by the CLI).

Roles are forked, not exec'd, by the zygote (zygote.py): one exec'd process
(``child --zygote``) that has imported every role's code. The supervisor
starts it first, lets the first spawns wait for its imports (up to
zygote.START_WAIT_S), then asks it for each role, at start and at every
respawn (one line each way on a socketpair, a few ms). The roles share its
pages copy-on-write and are re-parented to the supervisor, a child subreaper,
which reaps them like any child. Without a ready zygote (starting, dead,
broken) a role is exec'd as before.
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import os
import selectors
import signal
import socket
import time
from pathlib import Path

from daemon import __version__
from daemon import config as config_mod
from daemon.domain import alerts
from daemon.errors import EXIT_CONFIG
from daemon.errors import EXIT_FAILURE
from daemon.errors import EXIT_OK
from daemon.runtime import FIRST_BEAT_SIGNAL
from daemon.runtime import inflight_dir
from daemon.runtime import setup_logging
from daemon.supervision.alerting import DEPENDENCY_CHECK_S
from daemon.supervision.alerting import Alerting
from daemon.supervision.child import Child
from daemon.supervision.child import ChildPolicy
from daemon.supervision.child import OsProcesses
from daemon.supervision.child import RoleSpec
from daemon.supervision.child import describe_exit
from daemon.supervision.hooks import SupervisorHooks
from daemon.supervision.hooks import lease_releaser
from daemon.supervision.hooks import log_released
from daemon.supervision.jobs import BackgroundJobs
from daemon.supervision.jobs import nonblocking_pipe
from daemon.supervision.jobs import thread_pool
from daemon.supervision.reload import Reloading
from daemon.supervision.role_alerts import DependencyAlerts
from daemon.supervision.role_alerts import RoleAlerts
from daemon.supervision.states import ChildState
from daemon.supervision.status import AlreadyRunning
from daemon.supervision.status import FigureGatherer
from daemon.supervision.status import StatusServer
from daemon.supervision.status import hold_data_dir
from daemon.supervision.status_requests import StatusRequests
from daemon.supervision.systemd import Notifier
from daemon.supervision.systemd import SystemdReporting
from daemon.supervision.tree import METRICS_ENV
from daemon.supervision.tree import children_environment
from daemon.supervision.tree import default_roles
from daemon.supervision.tree import default_zygote
from daemon.supervision.tree import metrics_directory
from daemon.supervision.tree import prepare_metrics_directory
from daemon.supervision.waiting import close_database
from daemon.supervision.waiting import open_and_migrate
from daemon.supervision.waiting import wait_for_database
from daemon.supervision.zygote import Preforked
from daemon.supervision.zygote import RoleCode
from daemon.supervision.zygote import Zygote
from daemon.supervision.zygote import become_subreaper
from daemon.supervision.zygote import prefork
from daemon.supervision.zygote import serve
from daemon.supervision.zygote import stray_roles

log = logging.getLogger("daemon.supervision.supervisor")

# A child signals its first heartbeat (runtime.FIRST_BEAT_SIGNAL), so a
# respawn is seen RUNNING at once. While a child is STARTING its heartbeat
# file is also polled this often, in case a signal could not be sent.
STARTING_POLL_S = 0.1
# After the stop deadline's SIGKILLs, how long to wait for the reaping.
KILL_WAIT_S = 5.0
# A dead worker's release the database refused: tried again this much later.
RELEASE_RETRY_S = 2.0
# And released once more this long after its death: PostgreSQL finishes a
# statement whose client died, so a claim the worker had sent can commit
# after the first release and hold its row, never sent, until the lease ran
# out (minutes, and then as unconfirmed).
LATE_RELEASE_S = 5.0


def main(
    cfg: config_mod.Config,
    roles=None,
    hooks: SupervisorHooks | None = None,
    zygote=None,
    role_code: RoleCode | None = None,
) -> int:
    """`campaignd run`: migrate once, then supervise until told to stop.

    `hooks` carries what the supervisor does to the application's rows (the
    leases of dead workers) without importing it; the CLI wires them.
    `role_code` (from the CLI too) lets it fork the first zygote from itself
    (zygote.prefork); without it the zygote is exec'd.
    """
    hooks = hooks or SupervisorHooks()
    setup_logging(cfg.daemon.log_level, "supervisor")
    # Set before anything imports prometheus_client (it picks its storage at
    # import): the releases of dead workers' leases count unconfirmed rows in
    # this process, and only a file in the children's directory reaches
    # /metrics. Here, not in Supervisor: tests build those in their process.
    os.environ[METRICS_ENV] = str(metrics_directory(cfg, os.environ))
    try:
        lock = hold_data_dir(cfg.data_path)
    except AlreadyRunning as exc:
        log.error("%s", exc)
        return EXIT_FAILURE
    # Ours now (the data dir's lock): the metrics directory, before the
    # migration writes the first metric.
    prepare_metrics_directory(Path(os.environ[METRICS_ENV]))
    me = os.getpid()
    try:
        return _supervise(cfg, roles, hooks, zygote, role_code, lock)
    finally:
        if os.getpid() == me:  # the zygote and its roles closed it at fork
            os.close(lock)


def _supervise(cfg, roles, hooks: SupervisorHooks, zygote, role_code, lock) -> int:
    try:
        db = wait_for_database(cfg, lambda: open_and_migrate(cfg, hooks.on_start))
    except AlreadyRunning as exc:
        log.error("%s", exc)
        return EXIT_FAILURE
    if db is None:  # told to stop while waiting
        return EXIT_OK
    close_database(db)
    first = None
    if role_code is not None and zygote is None and roles is None:
        # After the migration: the objects it left are shared pages too.
        env = children_environment(cfg, os.environ)
        first = prefork(cfg, role_code.imports, env, close=(lock,))
        if first is not None and first.pid == 0:  # we are the zygote
            return serve(cfg, role_code.run_role, role_code.imports, first.channel)
    try:
        supervisor = Supervisor(
            cfg, roles, hooks=hooks, zygote=zygote, first_zygote=first
        )
    except AlreadyRunning as exc:
        log.error("%s", exc)
        return EXIT_FAILURE
    return supervisor.run()


class Supervisor(Reloading, Alerting, StatusRequests, BackgroundJobs, SystemdReporting):
    """Owns the children, the respawn policy, the status socket and sd_notify."""

    def __init__(
        self,
        cfg: config_mod.Config,
        roles=None,
        env=None,
        zygote=None,
        hooks: SupervisorHooks | None = None,
        first_zygote: Preforked | None = None,
    ):
        env = dict(os.environ if env is None else env)
        self.role_factory = roles or default_roles
        # The zygote runs the real roles: none for other role factories
        # (tests' fixture roles) unless one is given.
        self.zygote_factory = zygote or (None if roles else default_zygote)
        self.host = socket.gethostname()
        run_base = env.get("RUNTIME_DIRECTORY", "").split(":")[0]
        self.run_dir = Path(run_base) if run_base else cfg.data_path / "run"
        self.metrics_dir = metrics_directory(cfg, env)
        self.config_path = ""
        # Bound first: AlreadyRunning must stop us before we touch run_dir.
        self.status_server = StatusServer(
            cfg.status_socket, cfg.status.group, self.on_status_request
        )
        self.cfg = self._snapshot_config(cfg)
        self.policy = ChildPolicy.from_config(self.cfg)
        self.ops = OsProcesses(children_environment(cfg, env))
        self.systemd = Notifier(env)
        self.children: list[Child] = []
        self.retired: list[Child] = []  # roles gone from the config, stopping
        self.selector = selectors.DefaultSelector()
        self.zygote = Zygote(self.ops, self.selector, self.policy)
        self._first_zygote = first_zygote
        self._subreaper = False  # set by start(): forking needs it
        self._signals: list[int] = []
        self._jobs: list[tuple[concurrent.futures.Future, object]] = []
        self._db_pool = thread_pool("supervisor-db")
        self._figures_pool = thread_pool("supervisor-figures")
        self._notify_pool = thread_pool("supervisor-notify")
        self._figures: dict | None = None
        self._figures_at = 0.0
        # Unreachable dependencies: since when (monotonic), and alerted ones.
        self._figures_job: concurrent.futures.Future | None = None
        self._gatherer = FigureGatherer(self.cfg)
        self._requeuer = lease_releaser(
            hooks or SupervisorHooks(), self.cfg, inflight_dir(self.cfg.data_path, env)
        )
        self._parked: list[tuple[object, float]] = []
        # Dead workers' pids to release, each with when to try (monotonic).
        self._to_release: list[tuple[float, int]] = []
        self.role_alerts = RoleAlerts(
            self.host, self.cfg.alerts.down_after_s, self.cfg.alerts.restarts_per_hour
        )
        self.dependency_alerts = DependencyAlerts(self.cfg.alerts.down_after_s)
        self._helpers: dict[int, tuple[str, float]] = {}  # alert commands
        self._replace: list[str] = []  # names to replace one by one
        self._replacing: tuple[Child, float] | None = None
        self.reloading = False
        self.ready_sent = False
        self.stopping_since: float | None = None
        self.stop_deadline = 0.0
        self.escalated = False
        self.exit_code = 0
        self.started_at = time.monotonic()
        self.started_wall = time.time()
        self._next_beat_check = 0.0
        self._next_resource_check = 0.0
        self._next_watchdog = 0.0
        self._last_status_line = ""

    # ----------------------------------------------------------------- loop

    def run(self) -> int:
        """Start every role and supervise until stopped; the exit code."""
        self.start()
        try:
            while not self.finished(time.monotonic()):
                self.wait()
                self.handle_signals()
                self.reap_children()
                now, wall = time.monotonic(), time.time()
                self.check_heartbeats(now, wall)
                self.check_resources(now)
                self.manage_children(now)
                self.collect_jobs()
                self.check_alerts(now)
                self.notify_systemd(now)
                self.serve_status(now)
        except Exception:
            log.exception("supervisor failed: stopping every child")
            self.exit_code = EXIT_FAILURE
            self._kill_all("supervisor failure")
            raise
        finally:
            self.close()
        log.info("stopped (exit code %s)", self.exit_code)
        return self.exit_code

    def start(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        prepare_metrics_directory(self.metrics_dir)
        self._sig_r, self._sig_w = nonblocking_pipe()
        self._jobs_r, self._jobs_w = nonblocking_pipe()
        self.selector.register(self._sig_r, selectors.EVENT_READ, self._drain)
        self.selector.register(self._jobs_r, selectors.EVENT_READ, self._drain)
        signal.set_wakeup_fd(self._sig_w, warn_on_full_buffer=False)
        for sig in (
            signal.SIGCHLD,
            signal.SIGTERM,
            signal.SIGINT,
            signal.SIGHUP,
            signal.SIGUSR1,
            FIRST_BEAT_SIGNAL,
        ):
            signal.signal(sig, self._record_signal)
        self.status_server.register(self.selector)
        # Forked roles are re-parented to us when their intermediate exits.
        self._subreaper = become_subreaper()
        if self._first_zygote is not None:
            now = time.monotonic()
            self.zygote.adopt(self._first_zygote, now)
            self._first_zygote = None
            if not self._subreaper:
                self.zygote.retire(now, "no subreaper to adopt its roles")
        self.children = [self._new_child(s) for s in self._role_specs()]
        if self._requeuer is not None:
            self._submit(self._db_pool, self._requeuer.prepare)
        self._submit(
            self._db_pool,
            alerts.active_keys,
            *self.role_alerts.prefixes(),
            on_done=self._adopt_alerts,
        )
        log.info(
            "campaignd %s supervising %d roles (pid %s, status socket %s)",
            __version__,
            len(self.children),
            os.getpid(),
            self.cfg.status_socket,
        )

    def _record_signal(self, signum, frame) -> None:
        # NO LOGGING, NO I/O: just queue the signal for the loop.
        self._signals.append(signum)

    def wait(self) -> None:
        """Sleep until a signal, a client, a finished job or the next deadline."""
        now = time.monotonic()
        deadline = self.next_wakeup(now)
        timeout = None if deadline is None else max(0.0, deadline - now)
        for key, mask in self.selector.select(timeout):
            key.data(mask)

    def _drain(self, _mask: int) -> None:
        for fd in (self._sig_r, self._jobs_r):
            try:
                while os.read(fd, 4096):
                    pass
            except BlockingIOError:
                pass

    def next_wakeup(self, now: float) -> float | None:
        candidates = [c.next_deadline(now) for c in self.children + self.retired]
        candidates.append(self.zygote.next_deadline(now))
        if any(c.alive for c in self.children + self.retired):
            candidates.append(self._next_beat_check)
            candidates.append(self._next_resource_check)
        if self.systemd.watchdog_interval_s:
            candidates.append(self._next_watchdog)
        if self.stopping_since is None:
            candidates.append(self.role_alerts.next_deadline(self.children))
            if self._figures_job is None or self._figures_job.done():
                # While a refresh runs its end wakes us (the jobs pipe): its
                # past-due deadline would make the loop spin until then.
                candidates.append(self._figures_at + DEPENDENCY_CHECK_S)
            candidates.append(self.next_ping())
        else:
            candidates.append(self.stop_deadline + KILL_WAIT_S)
        candidates += [deadline for _, deadline in self._parked]
        candidates += [deadline for _, deadline in self._helpers.values()]
        candidates += [at for at, _ in self._to_release]
        candidates.append(self.status_server.next_deadline())
        return min((c for c in candidates if c is not None), default=None)

    def finished(self, now: float) -> bool:
        if self.stopping_since is None:
            return False
        alive = [c for c in self.children + self.retired if c.alive]
        if not alive and not self.zygote.alive:
            return True
        if now > self.stop_deadline + KILL_WAIT_S:
            log.critical("giving up on %s: not reaped after SIGKILL", alive)
            return True
        return False

    # -------------------------------------------------------------- signals

    def handle_signals(self) -> None:
        while self._signals:
            signum = self._signals.pop(0)
            name = signal.Signals(signum).name[3:].lower()
            getattr(self, f"handle_{name}")()

    def handle_chld(self) -> None:
        """A child changed state: reap_children() runs next anyway."""

    def handle_term(self) -> None:
        """Graceful stop: SIGTERM every child, SIGKILL at the stop timeout."""
        self.begin_stop("SIGTERM")

    def handle_int(self) -> None:
        """Like TERM; a second INT kills what is left at once."""
        if self.stopping_since is None:
            self.begin_stop("SIGINT")
        elif not self.escalated:
            self.escalated = True
            self._kill_all("second interrupt")

    def handle_usr1(self) -> None:
        """Log every role's state (a poor operator's `campaignd status`)."""
        now = time.monotonic()
        for child in self.children:
            log.info("status: %s", child.status(now))
        if self.zygote_factory is not None:
            log.info("status: zygote %s", self.zygote.status(now))

    def handle_usr2(self) -> None:
        """A child wrote its first heartbeat (FIRST_BEAT_SIGNAL): read the
        heartbeat files now; STARTING_POLL_S is only the fallback."""
        self._next_beat_check = 0.0

    def begin_stop(self, reason: str, exit_code: int = 0) -> None:
        if self.stopping_since is not None:
            return
        now = time.monotonic()
        self.stopping_since = now
        self.exit_code = exit_code
        grace = self.cfg.daemon.stop_timeout_s
        self.stop_deadline = now + grace
        self._replace.clear()
        self._replacing = None
        alive = sum(1 for c in self.children if c.alive)
        log.info(
            "stopping (%s): SIGTERM to %d children, %gs to finish", reason, alive, grace
        )
        self.systemd.notify("STOPPING=1", f"STATUS=stopping: {reason}")
        for child in self.children + self.retired:
            child.stop(now, f"daemon stopping ({reason})", grace, restart=False)
        self.zygote.retire(now, "daemon stopping")

    def _kill_all(self, reason: str) -> None:
        now = time.monotonic()
        for child in self.children + self.retired:
            child.kill(now, reason, restart=False)
        self.zygote.retire(now, reason)

    # ------------------------------------------------------------- children

    def reap_children(self) -> None:
        """Collect every exited child (waitpid(-1, WNOHANG) until empty)."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:  # no children at all: normal
                return
            if pid == 0:
                return
            child = next(
                (c for c in self.children + self.retired if c.pid == pid), None
            )
            if child is not None:
                self._child_gone(child, status)
            elif self.zygote.owns(pid):
                self.zygote.finish(pid, status, time.monotonic())
            elif pid in self._helpers:
                what, _ = self._helpers.pop(pid)
                log.info("%s %s", what, describe_exit(status)[0])
            else:
                log.info("reaped unknown pid %s (%s)", pid, describe_exit(status)[0])

    def _released(self, pid: int, result) -> None:
        """A release the database refused is tried again until it answers:
        the rows must not wait minutes for their leases to expire."""
        if result is None:
            self._to_release.append((time.monotonic() + RELEASE_RETRY_S, pid))
        else:
            log_released(result)

    def _child_gone(self, child: Child, status: int) -> None:
        pid = child.pid
        child.finish(status, time.monotonic())
        successor = self._child(child.name)
        if successor not in (None, child):
            # A web role replaced while it drained: its exit is the role's last.
            successor.last_exit = child.last_exit
        if child.name.startswith("worker:") and self._requeuer is not None:
            self._to_release += [(0.0, pid), (time.monotonic() + LATE_RELEASE_S, pid)]
        if (
            child.state is ChildState.EXITED
            and child.last_exit_code == EXIT_CONFIG
            and self.stopping_since is None
        ):
            log.critical(
                "%s exited with the config-error code %d: stopping the daemon",
                child.name,
                EXIT_CONFIG,
            )
            self.begin_stop(f"{child.name}: config error", exit_code=EXIT_CONFIG)

    def check_heartbeats(self, now: float, wall: float) -> None:
        """First beat -> RUNNING; stale beat -> stop; stuck task -> kill."""
        if now < self._next_beat_check:
            return
        for child in self.children:
            child.check_heartbeat(now, wall)
        starting = any(c.state is ChildState.STARTING for c in self.children)
        interval = min(self.cfg.supervisor.heartbeat_interval_s, 1.0)
        self._next_beat_check = now + (STARTING_POLL_S if starting else interval)

    def check_resources(self, now: float) -> None:
        """psutil every check_interval_s: zombies, RSS limit, CPU for status."""
        if now < self._next_resource_check:
            return
        self._next_resource_check = now + self.cfg.supervisor.check_interval_s
        for child in self.children:
            if child.inspect(now) == "zombie":
                log.warning("%s: pid %s is a zombie: reaping", child.name, child.pid)
                self.reap_children()
        self._kill_strays()

    def _kill_strays(self) -> None:
        """SIGKILL roles forked by the zygote whose pid never reached us."""
        if self.zygote_factory is None:
            return
        tracked = self.children + self.retired
        known = {c.pid for c in tracked if c.pid is not None}
        known |= {p for p in (self.zygote.pid, *self.zygote.retired) if p is not None}
        known |= set(self._helpers)
        for pid, role in stray_roles(known, {c.name for c in tracked}):
            log.warning(
                "pid %s runs %s but was never reported forked (a lost zygote "
                "answer): SIGKILL, the tracked %s stays",
                pid,
                role,
                role,
            )
            self.ops.signal(pid, signal.SIGKILL)

    def manage_children(self, now: float) -> None:
        """Apply the respawn policy, roll replacements, end stray helpers."""
        respawn = self.stopping_since is None
        if respawn:
            self._keep_zygote(now)
        # The first spawns wait for the first zygote's imports: exec'ing
        # them meanwhile would import the same modules on the same CPUs.
        hold = self.zygote.holds_first_start(now)
        for child in self.children:
            if not (hold and child.state is ChildState.STOPPED):
                child.transition(now, respawn)
        for child in list(self.retired):
            child.transition(now, respawn=False)
            if not child.alive:
                self.retired.remove(child)
        if respawn:
            self._replace_next(now)
        # Only now, after the respawn: the release's thread would hold the
        # GIL while the replacement is asked of the zygote (3-8 ms later).
        due = [pid for at, pid in self._to_release if at <= now]
        self._to_release = [(at, pid) for at, pid in self._to_release if at > now]
        mine = {c.pid for c in self.children + self.retired}
        for pid in set(due) - mine:  # (a child of ours took its pid: its leases)
            self._submit(
                self._db_pool,
                self._requeuer.release,
                pid,
                on_done=functools.partial(self._released, pid),
            )
        if any(c.state is ChildState.STARTING for c in self.children):
            # A child just (re)spawned: poll for its first beat from now on,
            # not from the next regular heartbeat check (up to 1 s away).
            self._next_beat_check = min(self._next_beat_check, now + STARTING_POLL_S)
        for pid, (what, deadline) in list(self._helpers.items()):
            if now >= deadline:
                log.warning("%s: too slow, SIGKILL", what)
                self.ops.signal(pid, signal.SIGKILL)
                self._helpers[pid] = (what, now + KILL_WAIT_S)

    def _keep_zygote(self, now: float) -> None:
        """Exec a zygote when there is none (and the backoff allows)."""
        if self.zygote_factory is None or not self._subreaper:
            return
        self.zygote.check(now)
        if self.zygote.due(now):
            self.zygote.start(now, self.zygote_factory(self.cfg, self.config_path))

    def _child(self, name: str) -> Child | None:
        return next((c for c in self.children if c.name == name), None)

    def _new_child(self, spec: RoleSpec) -> Child:
        safe = spec.name.replace(":", "-").replace("#", "-")
        child = Child(
            spec,
            self.policy,
            self.run_dir / f"{safe}.heartbeat",
            self.ops,
            zygote=self.zygote,
        )
        child.down_since = time.monotonic()
        return child

    def _role_specs(self) -> list[RoleSpec]:
        return list(self.role_factory(self.cfg, self.config_path))

    def close(self) -> None:
        self.status_server.close()
        self.zygote.close_channel()
        signal.set_wakeup_fd(-1)
        for pool in (self._figures_pool, self._db_pool, self._notify_pool):
            pool.shutdown(wait=False)
        self.selector.close()
        for fd in (self._sig_r, self._sig_w, self._jobs_r, self._jobs_w):
            os.close(fd)
