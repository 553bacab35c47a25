"""Load the one TOML config file into frozen dataclasses, once.

Every key has a default, so no file at all still runs (embedded mode, data in
./campaignd-data, web on 127.0.0.1:8080). Errors name the key:
``web.port: must be 1-65535, got 70000``. Secrets may come from the file, from
an environment variable (``CAMPAIGND_PROVIDER_TOKEN``...) or from a ``*_file``
key (e.g. ``token_file``, relative paths resolve in $CREDENTIALS_DIRECTORY
first, for systemd credentials).
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from zoneinfo import ZoneInfo
from zoneinfo import ZoneInfoNotFoundError

from daemon.config_senders import check_webhook_secrets
from daemon.errors import ConfigError

CONFIG_ENV = "CAMPAIGND_CONFIG"
# Where a config is looked for when neither -c nor $CAMPAIGND_CONFIG names
# one: the packaged service's file, then one in the current directory.
SEARCH_PATHS = ("/etc/campaignd/campaignd.toml", "campaignd.toml")


def _opt(default, *, lo=None, hi=None, choices=None, secret=False, env=None):
    """A config field with its validation rules kept next to its default."""
    meta = {"lo": lo, "hi": hi, "choices": choices, "secret": secret, "env": env}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class DaemonConfig:
    data_dir: str = _opt("./campaignd-data")
    log_level: str = _opt(
        "info", choices=("debug", "info", "warning", "error", "critical")
    )
    # Grace given to children on shutdown before SIGKILL; the unit's
    # TimeoutStopSec must stay above it.
    stop_timeout_s: float = _opt(20.0, lo=1.0, hi=600.0)


@dataclass(frozen=True)
class DatabaseConfig:
    # Empty means sqlite:///<data_dir>/campaignd.db
    url: str = _opt("")
    # PostgreSQL pool size per process.
    max_connections: int = _opt(8, lo=1, hi=200)
    # SQLite busy timeout: how long a writer waits for the lock.
    busy_timeout_s: float = _opt(10.0, lo=0.1, hi=300.0)


@dataclass(frozen=True)
class QueueConfig:
    backend: str = _opt("sqlite", choices=("sqlite", "redis", "postgres"))
    # sqlite: empty means <data_dir>/queue.db; redis: redis://host:port/db;
    # postgres: a libpq URL (empty means the database url).
    url: str = _opt("")
    # Prefix of every queue name, so several deployments (or test runs) can
    # share one Redis without seeing each other's tasks.
    name_prefix: str = _opt("campaignd")
    # After a failed queue read a consumer waits poll_initial_s, growing to
    # poll_max_s (Huey's default grows to 10 s: a Message 2 seconds late).
    poll_initial_s: float = _opt(0.01, lo=0.001, hi=10.0)
    poll_max_s: float = _opt(0.25, lo=0.01, hi=60.0)
    # SQLite: an enqueue wakes idle consumers at once (daemon/store/wakeup.py);
    # they also look this often, so a lost wake-up costs at most this.
    idle_poll_s: float = _opt(2.0, lo=0.01, hi=60.0)


@dataclass(frozen=True)
class ProviderConfig:
    kind: str = _opt("wassenger", choices=("wassenger", "meta"))
    # Wassenger: the API root without /v1. Meta: https://graph.facebook.com
    base_url: str = _opt("http://127.0.0.1:8099")
    token: str = _opt("", secret=True, env="CAMPAIGND_PROVIDER_TOKEN")
    device: str = _opt("")
    timeout_s: float = _opt(15.0, lo=0.1, hi=300.0)
    connect_timeout_s: float = _opt(5.0, lo=0.1, hi=60.0)
    check_timeout_s: float = _opt(60.0, lo=0.1, hi=600.0)
    # A send whose outcome is unknown (timeout after the request was written,
    # worker killed mid-request) is `unconfirmed`: it waits this long for
    # evidence (a status webhook, a reply) before `unconfirmed` applies.
    # Providers report the first status within seconds; 5 min leaves room
    # for their webhook retries without holding a contact for hours.
    confirm_window_s: float = _opt(300.0, lo=5.0, hi=86400.0)
    # After the window with no evidence: "resend" (same reference) or "fail"
    # (never risk a second message; `campaign retry-failed` re-sends).
    unconfirmed: str = _opt("resend", choices=("resend", "fail"))
    phone_number_id: str = _opt("")
    api_version: str = _opt("v21.0")
    app_secret: str = _opt("", secret=True, env="CAMPAIGND_PROVIDER_APP_SECRET")
    verify_token: str = _opt("", secret=True, env="CAMPAIGND_PROVIDER_VERIFY_TOKEN")
    template_name: str = _opt("")
    template_language: str = _opt("fr")


@dataclass(frozen=True)
class WebConfig:
    host: str = _opt("127.0.0.1")
    port: int = _opt(8080, lo=1, hi=65535)
    # Webhook requests wait for their event's group commit: more threads
    # make bigger batches (bench/webhook_ingest.py).
    threads: int = _opt(32, lo=1, hi=256)
    # Shared secret expected in X-Webhook-Secret or ?token= on webhooks.
    # Empty disables the check: refused beyond loopback (see below).
    webhook_secret: str = _opt("", secret=True, env="CAMPAIGND_WEBHOOK_SECRET")
    # Optional HMAC-SHA256 key for X-Wassenger-Signature.
    webhook_hmac_secret: str = _opt(
        "", secret=True, env="CAMPAIGND_WEBHOOK_HMAC_SECRET"
    )
    # A web role reachable beyond loopback without the configured provider's
    # webhook secret lets anyone post fake replies and opt-outs: refused at
    # load unless this says the operator checks them elsewhere.
    allow_unsigned_webhooks: bool = _opt(False)
    # Bearer token for /api/v1; empty disables the admin API.
    api_token: str = _opt("", secret=True, env="CAMPAIGND_API_TOKEN")
    # Meta batches up to 1,000 updates in one POST (up to 3 MB).
    max_body_bytes: int = _opt(4 * 1_048_576, lo=1024, hi=64 * 1_048_576)
    # A stored event that fails processing this many times becomes a dead
    # letter: out of the sweeper's replays, listed for the operator.
    event_max_attempts: int = _opt(5, lo=1, hi=1000)
    # Longest the web role spends handing a batch of stored events to the
    # queue; what is not enqueued by then is left to the sweeper.
    enqueue_timeout_s: float = _opt(2.0, lo=0.05, hi=60.0)


@dataclass(frozen=True)
class StatusConfig:
    # Empty means <data_dir>/campaignd.sock
    socket: str = _opt("")
    # Group allowed to connect (socket mode 0660); empty keeps our own group.
    group: str = _opt("")


@dataclass(frozen=True)
class WorkersConfig:
    messages_threads: int = _opt(2, lo=1, hi=64)
    # The GIL makes two processes of two threads beat one of four.
    messages_processes: int = _opt(2, lo=1, hi=16)
    retry_threads: int = _opt(1, lo=1, hi=64)
    verification_threads: int = _opt(1, lo=1, hi=64)
    default_threads: int = _opt(2, lo=1, hi=64)
    # One process (worker:background) consumes the default, retry and
    # verification queues, a thread group each: two interpreters fewer
    # (docs/benchmarks.md, W5). false: one role per queue.
    shared_background: bool = _opt(True)
    # Every network call times out below the soft limit; past the hard limit
    # the supervisor kills the child and the message leases bring work back.
    soft_time_limit_s: float = _opt(60.0, lo=1.0, hi=3600.0)
    hard_time_limit_s: float = _opt(90.0, lo=1.0, hi=7200.0)
    rss_limit_mb: int = _opt(512, lo=32, hi=65536)


@dataclass(frozen=True)
class RetryConfig:
    base_s: float = _opt(60.0, lo=0.0, hi=86400.0)
    factor: float = _opt(2.0, lo=1.0, hi=10.0)
    # The first send and three retries (60 s, 120 s, 240 s), as the
    # original system did.
    max_attempts: int = _opt(4, lo=1, hi=100)
    cap_s: float = _opt(3600.0, lo=0.0, hi=7 * 86400.0)
    # Share of the delay added at random, so retries do not stampede.
    jitter: float = _opt(0.1, lo=0.0, hi=1.0)


@dataclass(frozen=True)
class PacingConfig:
    # Message 1 sends per minute per device; 0 means no limit.
    per_minute: float = _opt(12.0, lo=0.0, hi=60000.0)
    # Message 1 sends per day per device; 0 means no limit.
    daily_cap: int = _opt(1000, lo=0, hi=10_000_000)
    # Send window in `timezone`, "HH:MM"; equal values mean always open.
    window_start: str = _opt("00:00")
    window_end: str = _opt("00:00")
    timezone: str = _opt("UTC")
    # Random extra spacing between sends, in seconds.
    jitter_s: float = _opt(0.0, lo=0.0, hi=3600.0)


@dataclass(frozen=True)
class CampaignsConfig:
    reply_window_h: float = _opt(24.0, lo=0.001, hi=24.0 * 30)
    opt_out_keywords: list = _opt(
        ["STOP", "ARRET", "ARRÊT", "DESINSCRIRE", "DÉSINSCRIRE", "UNSUBSCRIBE"]
    )
    # Leave contacts known not to be on WhatsApp out of new campaigns.
    skip_invalid_numbers: bool = _opt(True)
    # 2000: a link waits for a free worker thread (~0.1 s with sends running
    # on a busy machine) whatever its size; at 500 that wait was half of a
    # million-member fan-out (docs/benchmarks.md).
    fanout_batch: int = _opt(2000, lo=1, hi=100_000)
    verify_per_minute: float = _opt(20.0, lo=0.1, hi=6000.0)


@dataclass(frozen=True)
class AlertsConfig:
    down_after_s: float = _opt(300.0, lo=0.1, hi=86400.0)
    webhook_url: str = _opt("")
    command: str = _opt("")
    # A role that dies now and then never stays down long and never reaches
    # the crash-loop count: alert on its unplanned exits within an hour.
    restarts_per_hour: int = _opt(10, lo=1, hi=100_000)
    # Dead man's switch: POSTed every heartbeat_every_s while every role runs
    # and the database and queue answer; an outside service (healthchecks.io
    # style) alerts when the pings stop, which covers a dead host.
    heartbeat_url: str = _opt("")
    heartbeat_every_s: float = _opt(60.0, lo=1.0, hi=86400.0)


@dataclass(frozen=True)
class SupervisorConfig:
    backoff_initial_s: float = _opt(0.1, lo=0.0, hi=60.0)
    backoff_max_s: float = _opt(60.0, lo=0.1, hi=3600.0)
    # A child that stays up this long is healthy again: backoff resets.
    healthy_after_s: float = _opt(60.0, lo=0.1, hi=3600.0)
    crash_loop_exits: int = _opt(10, lo=1, hi=1000)
    crash_loop_window_s: float = _opt(300.0, lo=1.0, hi=86400.0)
    fatal_cooldown_s: float = _opt(300.0, lo=0.1, hi=86400.0)
    # Each beat wakes every child (the web role checks itself over HTTP):
    # 5 s leaves six beats inside the timeout and keeps an idle tree idle.
    heartbeat_interval_s: float = _opt(5.0, lo=0.05, hi=60.0)
    heartbeat_timeout_s: float = _opt(30.0, lo=0.5, hi=3600.0)
    check_interval_s: float = _opt(5.0, lo=0.1, hi=300.0)
    # How long children get to start before READY=1 is held back as failed.
    start_timeout_s: float = _opt(30.0, lo=1.0, hi=600.0)


@dataclass(frozen=True)
class SchedulerConfig:
    sync_monitoring_s: float = _opt(3600.0, lo=1.0, hi=86400.0)
    cleanup_expired_locks_s: float = _opt(600.0, lo=1.0, hi=86400.0)
    recover_interrupted_campaigns_s: float = _opt(300.0, lo=1.0, hi=86400.0)
    sweep_s: float = _opt(30.0, lo=0.5, hi=3600.0)
    system_health_check_s: float = _opt(120.0, lo=1.0, hi=86400.0)
    check_expired_interactions_s: float = _opt(3600.0, lo=1.0, hi=86400.0)
    leader_lease_s: float = _opt(15.0, lo=1.0, hi=3600.0)


@dataclass(frozen=True)
class Config:
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)
    provider: ProviderConfig = field(default_factory=ProviderConfig)
    web: WebConfig = field(default_factory=WebConfig)
    status: StatusConfig = field(default_factory=StatusConfig)
    workers: WorkersConfig = field(default_factory=WorkersConfig)
    retry: RetryConfig = field(default_factory=RetryConfig)
    pacing: PacingConfig = field(default_factory=PacingConfig)
    campaigns: CampaignsConfig = field(default_factory=CampaignsConfig)
    alerts: AlertsConfig = field(default_factory=AlertsConfig)
    supervisor: SupervisorConfig = field(default_factory=SupervisorConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    # Where this config came from ("" when built from defaults only); the
    # supervisor passes it on to its children.
    source: str = ""
    # daemon.data_dir was relative (resolved against the working directory):
    # the CLI says so when that finds no database, as a wrong directory would.
    data_dir_relative: bool = False

    @property
    def data_path(self) -> Path:
        return Path(self.daemon.data_dir)

    @property
    def database_url(self) -> str:
        return self.database.url or f"sqlite:///{self.data_path / 'campaignd.db'}"

    @property
    def queue_url(self) -> str:
        if self.queue.url:
            return self.queue.url
        if self.queue.backend == "sqlite":
            return str(self.data_path / "queue.db")
        if self.queue.backend == "postgres":
            return self.database_url
        return "redis://127.0.0.1:6379/0"

    @property
    def status_socket(self) -> Path:
        return Path(self.status.socket or self.data_path / "campaignd.sock")


def load(
    path: str | os.PathLike | None = None, env=None, *, read_secrets: bool = True
) -> Config:
    """Read the config from `path`, $CAMPAIGND_CONFIG, or defaults only.

    `read_secrets=False` leaves `*_file` secrets unread: `campaignd status`
    needs only paths, and an operator cannot read the service's credentials.
    """
    env = os.environ if env is None else env
    path = find_config(path, env)
    raw = _read_toml(path)
    source = str(Path(path).resolve()) if path else ""
    return from_dict(raw, env=env, source=source, read_secrets=read_secrets)


def _read_toml(path: str | None) -> dict:
    if path is None:
        return {}
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except PermissionError:
        raise ConfigError(f"{path}: config file not readable") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None


def find_config(path=None, env=None) -> str | None:
    """The config file to read: `path` (-c), then $CAMPAIGND_CONFIG, then the
    first of SEARCH_PATHS that exists; None means defaults only."""
    env = os.environ if env is None else env
    if path:
        return str(path)
    if env.get(CONFIG_ENV):
        return env[CONFIG_ENV]
    return next((p for p in SEARCH_PATHS if os.path.exists(p)), None)


def load_alerts(path: str | os.PathLike | None = None, env=None) -> AlertsConfig:
    """Only the [alerts] table of the config, whatever is wrong elsewhere.

    A daemon that cannot start because of its config, and systemd's
    OnFailure unit after it, still reach the operator's alert channels.
    """
    env = os.environ if env is None else env
    raw = _read_toml(find_config(path, env))
    section = raw.get("alerts", {})
    if not isinstance(section, dict):
        raise ConfigError(f"alerts: must be a table, got {_kind(section)}")
    return _build(AlertsConfig, "alerts", section, env)


def from_dict(
    raw: dict, env=None, source: str = "", *, read_secrets: bool = True
) -> Config:
    """Build and validate a Config from parsed TOML."""
    env = os.environ if env is None else env
    hints = typing.get_type_hints(Config)
    unknown = sorted(set(raw) - {f.name for f in _tables()})
    if unknown:
        raise ConfigError(f"{_key_text(unknown[0])}: unknown table")
    tables = {}
    for f in _tables():
        section = raw.get(f.name, {})
        if not isinstance(section, dict):
            raise ConfigError(f"{f.name}: must be a table, got {_kind(section)}")
        tables[f.name] = _build(hints[f.name], f.name, section, env, read_secrets)
    tables = _systemd_directories(tables, raw, env)
    # Children run with the same cwd today, but a relative data dir would
    # silently move if anyone changed that; resolve it once here.
    data_dir = tables["daemon"].data_dir
    if not data_dir or "\0" in data_dir:
        raise ConfigError("daemon.data_dir: must be a directory path")
    tables["daemon"] = dataclasses.replace(
        tables["daemon"], data_dir=str(Path(data_dir).resolve())
    )
    relative = not Path(data_dir).is_absolute()
    cfg = Config(**tables, source=source, data_dir_relative=relative)
    _check_cross_fields(cfg)
    # `read_secrets=False` leaves `*_file` secrets empty: they count as set.
    unread = set() if read_secrets else _file_keys(raw)
    check_webhook_secrets(cfg, unread)
    return cfg


def _systemd_directories(tables: dict, raw: dict, env) -> dict:
    """Under systemd, what the file leaves unset goes where the unit says:
    daemon.data_dir in $STATE_DIRECTORY, the status socket in
    $RUNTIME_DIRECTORY (each the first of its colon-separated list)."""
    state = env.get("STATE_DIRECTORY", "").split(":")[0]
    if state and "data_dir" not in raw.get("daemon", {}):
        tables["daemon"] = dataclasses.replace(tables["daemon"], data_dir=state)
    runtime = env.get("RUNTIME_DIRECTORY", "").split(":")[0]
    if runtime and not tables["status"].socket:
        socket_path = os.path.join(runtime, "campaignd.sock")
        tables["status"] = dataclasses.replace(tables["status"], socket=socket_path)
    return tables


_NOT_TABLES = ("source", "data_dir_relative")


def _tables():
    return [f for f in dataclasses.fields(Config) if f.name not in _NOT_TABLES]


def table_types() -> dict[str, type]:
    """{table name: its dataclass} for every [table] of the file."""
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in _tables()}


def _build(cls, table: str, section: dict, env, read_secrets: bool = True):
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    file_keys = {
        f"{name}_file": name for name, f in fields.items() if f.metadata.get("secret")
    }
    for key in section:
        if key not in fields and key not in file_keys:
            raise ConfigError(f"{table}.{_key_text(key)}: unknown key")
    values = {}
    for name, f in fields.items():
        key = f"{table}.{name}"
        meta = f.metadata
        if name in section:
            value = _coerce(key, hints[name], section[name])
        elif f"{name}_file" in section:
            if not read_secrets:
                continue
            value = _read_secret_file(f"{key}_file", section[f"{name}_file"], env)
        elif meta.get("env") and env.get(meta["env"]):
            value = env[meta["env"]]
        else:
            continue
        _check_range(key, value, meta)
        values[name] = value
    return cls(**values)


def _coerce(key: str, hint, value):
    expected = typing.get_origin(hint) or hint
    if isinstance(expected, types.UnionType):
        expected = typing.get_args(hint)[0]
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is list:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{key}: must be a list of strings, got {_kind(value)}")
        return list(value)
    if expected is int and isinstance(value, bool):
        raise ConfigError(f"{key}: must be an integer, got a boolean")
    if not isinstance(value, expected):
        raise ConfigError(f"{key}: must be {_article(expected)}, got {_kind(value)}")
    return value


def _check_range(key: str, value, meta) -> None:
    lo, hi, choices = meta.get("lo"), meta.get("hi"), meta.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"{key}: must be one of {', '.join(choices)}, got {value!r}")
    if lo is not None and hi is not None and not lo <= value <= hi:
        raise ConfigError(f"{key}: must be {_num(lo)}-{_num(hi)}, got {_num(value)}")


def _key_text(key: str) -> str:
    """A key as typed, or quoted when it holds characters that would break
    the one-line error (a quoted TOML key may contain anything)."""
    return key if key.isprintable() and " " not in key else repr(key)


def _read_secret_file(key: str, value, env) -> str:
    if not isinstance(value, str) or not value or "\0" in value:
        raise ConfigError(f"{key}: must be a file path")
    path = Path(value)
    creds = env.get("CREDENTIALS_DIRECTORY")
    if not path.is_absolute() and creds:
        # A systemd credential (LoadCredential=) of that name first. Read, not
        # tested with exists(), which raises on a directory we may not search
        # (the error then was a traceback and exit 1, which systemd restarts).
        credential = Path(creds) / path
        try:
            return credential.read_text().strip()
        except (FileNotFoundError, NotADirectoryError):
            pass  # no such credential: the path as written
        except OSError as exc:
            raise ConfigError(
                f"{key}: cannot read {credential}: {exc.strerror}"
            ) from None
    try:
        return path.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path}: {exc.strerror}") from None


def _check_cross_fields(cfg: Config) -> None:
    for key, value in (
        ("pacing.window_start", cfg.pacing.window_start),
        ("pacing.window_end", cfg.pacing.window_end),
    ):
        parse_hhmm(key, value)
    try:
        ZoneInfo(cfg.pacing.timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(
            f"pacing.timezone: unknown time zone {cfg.pacing.timezone!r}"
        ) from None
    if cfg.workers.soft_time_limit_s >= cfg.workers.hard_time_limit_s:
        raise ConfigError(
            "workers.soft_time_limit_s: must be below workers.hard_time_limit_s"
        )
    if cfg.provider.timeout_s >= cfg.workers.soft_time_limit_s:
        raise ConfigError("provider.timeout_s: must be below workers.soft_time_limit_s")
    if (
        cfg.queue.backend == "redis"
        and cfg.queue.url
        and not cfg.queue.url.startswith(("redis://", "rediss://", "unix://"))
    ):
        raise ConfigError(f"queue.url: not a redis:// URL: {cfg.queue.url!r}")
    if cfg.database.url and not cfg.database.url.startswith(
        ("sqlite:///", "postgresql://", "postgres://")
    ):
        raise ConfigError(
            "database.url: must start with sqlite:/// or postgresql://, "
            f"got {cfg.database.url!r}"
        )
    if cfg.provider.kind == "meta" and not cfg.provider.phone_number_id:
        raise ConfigError(
            "provider.phone_number_id: required when provider.kind = meta"
        )


def _file_keys(raw: dict) -> set[str]:
    """The secrets given as `<key>_file`, as "table.key"."""
    return {
        f"{table}.{key.removesuffix('_file')}"
        for table, section in raw.items()
        if isinstance(section, dict)
        for key in section
        if key.endswith("_file")
    }


def parse_hhmm(key: str, value: str) -> tuple[int, int]:
    try:
        hours, minutes = value.split(":")
        h, m = int(hours), int(minutes)
    except ValueError:
        raise ConfigError(f"{key}: must be HH:MM, got {value!r}") from None
    if not (0 <= h <= 24 and 0 <= m < 60) or (h == 24 and m):
        raise ConfigError(f"{key}: must be HH:MM, got {value!r}")
    return h, m


def _kind(value) -> str:
    if isinstance(value, bool):
        return "a boolean"
    return {
        int: "an integer",
        float: "a float",
        str: "a string",
        list: "a list",
        dict: "a table",
    }.get(type(value), type(value).__name__)


def _article(t) -> str:
    return {
        int: "an integer",
        float: "a number",
        str: "a string",
        bool: "a boolean",
    }.get(t, t.__name__)


def _num(v) -> str:
    return str(int(v)) if isinstance(v, float) and v.is_integer() else str(v)
