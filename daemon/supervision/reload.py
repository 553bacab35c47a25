"""The supervisor's reload: a validated config snapshot, then every role
replaced one at a time (SIGHUP, or "reload" on the status socket); and
`campaignd restart ROLE`, the same replacement for one role.

A mixin of `Supervisor` (daemon/supervision/supervisor.py), whose state it
uses: cfg, policy, children, retired, zygote, reloading, systemd.
"""

from __future__ import annotations

import logging
import os
import time
import tomllib
from pathlib import Path

from daemon import config as config_mod
from daemon.errors import ConfigError
from daemon.supervision.child import Child
from daemon.supervision.child import ChildPolicy
from daemon.supervision.states import WAITING_STATES
from daemon.supervision.states import ChildState
from daemon.supervision.status import FigureGatherer

log = logging.getLogger("daemon.supervision.supervisor")  # one name for its whole log

# Roles whose replacement (reload, `campaignd restart`) starts while the old
# process still drains: the web role frees its port at SIGTERM
# (daemon/roles/web/app.py), and a new one retries its bind for a moment.
OVERLAPPING_ROLES = frozenset({"web"})


class Reloading:
    """Reload the config; replace roles gracefully, one by one."""

    _replace: list[str]  # names to replace one by one
    _replacing: tuple[Child, float] | None

    def handle_hup(self) -> None:
        """Reload the config; replace the children one by one."""
        if self.stopping_since is not None:
            return
        self.systemd.reloading()
        try:
            new_cfg = self._snapshot_config(self.cfg, reload=True)
        except ConfigError as exc:
            log.error("reload failed, keeping the running config: %s", exc)
            self.systemd.notify("READY=1", f"STATUS=reload failed: {exc}")
            return
        self._warn_restart_only_changes(new_cfg)
        self.cfg = new_cfg
        self.policy = ChildPolicy.from_config(new_cfg)
        self.zygote.policy = self.policy
        self._gatherer = FigureGatherer(new_cfg)
        self.role_alerts.down_after_s = new_cfg.alerts.down_after_s
        self.role_alerts.restarts_per_hour = new_cfg.alerts.restarts_per_hour
        self._sync_roles()
        # The zygote loaded the old config: only a new one may fork roles
        # (until it is ready the replacements are exec'd).
        self.zygote.retire(time.monotonic(), "config reloaded")
        self.reloading = True
        self._replace = [c.name for c in self.children]
        log.info(
            "config reloaded from %s: replacing %d roles one by one",
            new_cfg.source,
            len(self._replace),
        )

    def restart_role(self, role: str) -> list[str]:
        """Queue a graceful replacement of a role (or all its instances)."""
        names = [
            c.name
            for c in self.children
            if c.name == role or c.name.split("#")[0] == role
        ]
        self._replace += [n for n in names if n not in self._replace]
        return names

    def _replace_next(self, now: float) -> None:
        if self._replacing:
            child, since = self._replacing
            replaced = child.state is ChildState.RUNNING and child.spawned_at > since
            if not (replaced or child.state in WAITING_STATES):
                return
            self._replacing = None
        while self._replace:
            child = self._child(self._replace.pop(0))
            if child is None:
                continue
            if child.alive and child.name in OVERLAPPING_ROLES:
                # Its replacement starts at once, beside it: the old process
                # closes its listener at SIGTERM and then drains, which can
                # take up to the stop timeout; the port must not wait that.
                child.stop(
                    now, "replacing", self.cfg.daemon.stop_timeout_s, restart=False
                )
                successor = child.successor("replacing")
                self.children[self.children.index(child)] = successor
                self.retired.append(child)
                self._replacing = (successor, now)
                return
            if child.alive:
                child.stop(now, "replacing", self.cfg.daemon.stop_timeout_s)
                self._replacing = (child, now)
                return
            if child.state in (ChildState.BACKOFF, ChildState.FATAL):
                child.retry_at = now  # an operator asked: try now
        if self.reloading:
            self.reloading = False
            log.info("reload complete: every role replaced")
            self.systemd.notify("READY=1", f"STATUS={self.status_line()}")

    def _sync_roles(self) -> None:
        specs = {s.name: s for s in self._role_specs()}
        kept = []
        now = time.monotonic()
        for child in self.children:
            if child.name in specs:
                child.spec = specs.pop(child.name)
                child.policy = self.policy
                kept.append(child)
            else:
                child.stop(
                    now,
                    "role removed by reload",
                    self.cfg.daemon.stop_timeout_s,
                    restart=False,
                )
                self.retired.append(child)
        kept += [self._new_child(s) for s in specs.values()]
        self.children = kept

    def _snapshot_config(self, cfg, reload: bool = False) -> config_mod.Config:
        """Validate the config file's bytes and give children exactly those.

        Children load the copy in run_dir, not the original: an operator's
        half-edited file must not reach a child respawned later (it would
        exit with the config-error code and stop the whole daemon).
        """
        if not cfg.source:
            return cfg
        try:
            data = Path(cfg.source).read_bytes()
        except OSError as exc:
            raise ConfigError(f"{cfg.source}: cannot read: {exc.strerror}") from None
        try:
            raw = tomllib.loads(data.decode())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{cfg.source}: invalid TOML: {exc}") from None
        new = config_mod.from_dict(raw, source=cfg.source)
        if not reload:
            new = cfg
        self.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        snapshot = self.run_dir / "config.toml"
        tmp = snapshot.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, snapshot)
        self.config_path = str(snapshot)
        return new

    def _warn_restart_only_changes(self, new_cfg) -> None:
        for what, old, new in (
            ("daemon.data_dir", self.cfg.daemon.data_dir, new_cfg.daemon.data_dir),
            ("status.socket", self.cfg.status_socket, new_cfg.status_socket),
        ):
            if old != new:
                log.warning("%s changed: takes effect on the next daemon start", what)
