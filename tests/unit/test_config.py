"""The config: config.example.toml matches the code, and every error names its key."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import tomllib

import pytest

from daemon import config as config_mod
from daemon.config import Config
from daemon.errors import EXIT_CONFIG
from daemon.errors import ConfigError
from tests.helpers import dump_toml
from tests.helpers import subprocess_env
from tests.helpers import write_config


def _tables():
    """(table name, dataclass) for every table of Config."""
    return list(config_mod.table_types().items())


SECRET_KEYS = [
    (table, f.name, f.metadata["env"])
    for table, cls in _tables()
    for f in dataclasses.fields(cls)
    if f.metadata.get("secret")
]


def _load_dict(raw: dict, env: dict | None = None) -> Config:
    return config_mod.from_dict(raw, env=env or {})


# --- config.example.toml ------------------------------------------------------


@pytest.fixture(scope="module")
def example(request) -> dict:
    path = request.config.rootpath / "config.example.toml"
    with open(path, "rb") as f:
        return tomllib.load(f)


def test_example_documents_every_key_and_nothing_else(example):
    for table, cls in _tables():
        keys = {f.name for f in dataclasses.fields(cls)}
        assert table in example, f"[{table}] missing from config.example.toml"
        documented = set(example[table])
        assert keys - documented == set(), f"[{table}] keys not documented"
        assert documented - keys == set(), f"[{table}] keys unknown to config.py"
    assert set(example) == {table for table, _ in _tables()}


def test_example_values_are_the_defaults_key_by_key(example):
    defaults = _load_dict({})
    loaded = _load_dict(example)
    for table, cls in _tables():
        for f in dataclasses.fields(cls):
            got = getattr(getattr(loaded, table), f.name)
            want = getattr(getattr(defaults, table), f.name)
            assert got == want, f"{table}.{f.name}: example {got!r} != default {want!r}"
            assert type(example[table][f.name]) is type(_raw_default(f)), (
                f"{table}.{f.name}: written as {type(example[table][f.name]).__name__}"
            )


def _raw_default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()


def test_example_comments_every_table_key(request):
    """Each key line is directly under a comment or another commented key."""
    text = (request.config.rootpath / "config.example.toml").read_text()
    previous = ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith(("#", "[")):
            key = stripped.split("=")[0].strip()
            assert previous.startswith("#") or "=" in previous, f"{key} has no comment"
        if stripped:
            previous = stripped


# --- errors name the key --------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"nope": {}}, "nope: unknown table"),
        ({"web": {"prot": 80}}, "web.prot: unknown key"),
        ({"web": 3}, "web: must be a table, got an integer"),
        ({"web": {"port": "80"}}, "web.port: must be an integer, got a string"),
        ({"web": {"port": True}}, "web.port: must be an integer, got a boolean"),
        ({"web": {"port": 80.0}}, "web.port: must be an integer, got a float"),
        ({"web": {"port": 70000}}, "web.port: must be 1-65535, got 70000"),
        ({"web": {"port": 0}}, "web.port: must be 1-65535, got 0"),
        (
            {"daemon": {"stop_timeout_s": "20"}},
            "daemon.stop_timeout_s: must be a number, got a string",
        ),
        ({"retry": {"jitter": 1.5}}, "retry.jitter: must be 0-1, got 1.5"),
        (
            {"campaigns": {"skip_invalid_numbers": "yes"}},
            "campaigns.skip_invalid_numbers: must be a boolean, got a string",
        ),
        (
            {"campaigns": {"opt_out_keywords": "STOP"}},
            "campaigns.opt_out_keywords: must be a list of strings, got a string",
        ),
        (
            {"campaigns": {"opt_out_keywords": ["STOP", 1]}},
            "campaigns.opt_out_keywords: must be a list of strings",
        ),
        (
            {"queue": {"backend": "kafka"}},
            "queue.backend: must be one of sqlite, redis, postgres, got 'kafka'",
        ),
        (
            {"daemon": {"log_level": "verbose"}},
            "daemon.log_level: must be one of debug, info, warning, error, critical",
        ),
        (
            {"pacing": {"timezone": "Mars/Olympus"}},
            "pacing.timezone: unknown time zone 'Mars/Olympus'",
        ),
        (
            {"pacing": {"window_start": "25:00"}},
            "pacing.window_start: must be HH:MM, got '25:00'",
        ),
        (
            {"pacing": {"window_end": "9h"}},
            "pacing.window_end: must be HH:MM, got '9h'",
        ),
        (
            {"pacing": {"window_end": "24:30"}},
            "pacing.window_end: must be HH:MM, got '24:30'",
        ),
        (
            {"pacing": {"window_start": "08:60"}},
            "pacing.window_start: must be HH:MM, got '08:60'",
        ),
        (
            {"workers": {"soft_time_limit_s": 90.0}},
            "workers.soft_time_limit_s: must be below workers.hard_time_limit_s",
        ),
        (
            {"provider": {"timeout_s": 60.0}},
            "provider.timeout_s: must be below workers.soft_time_limit_s",
        ),
        (
            {"database": {"url": "mysql://db/x"}},
            "database.url: must start with sqlite:/// or postgresql://",
        ),
        (
            {"queue": {"backend": "redis", "url": "http://localhost"}},
            "queue.url: not a redis:// URL",
        ),
        (
            {"provider": {"kind": "meta"}},
            "provider.phone_number_id: required when provider.kind = meta",
        ),
        (
            {"provider": {"device_file": "/etc/passwd"}},
            "provider.device_file: unknown key",
        ),
    ],
)
def test_errors_name_the_key(raw, message):
    with pytest.raises(ConfigError) as info:
        _load_dict(raw)
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)


def test_valid_edge_values_load():
    cfg = _load_dict(
        {
            "web": {"port": 65535},
            "daemon": {"stop_timeout_s": 5},  # an integer where a float is expected
            "pacing": {
                "window_start": "22:00",
                "window_end": "24:00",
                "timezone": "Europe/Paris",
            },
        }
    )
    assert cfg.web.port == 65535
    assert cfg.daemon.stop_timeout_s == 5.0
    assert isinstance(cfg.daemon.stop_timeout_s, float)
    assert cfg.pacing.timezone == "Europe/Paris"


def test_no_file_runs_with_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = config_mod.load(None, env={})
    assert cfg.source == ""
    assert (
        cfg.database_url == f"sqlite:///{tmp_path / 'campaignd-data' / 'campaignd.db'}"
    )
    assert cfg.web.host == "127.0.0.1"
    assert cfg.queue.backend == "sqlite"


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        config_mod.load(tmp_path / "missing.toml", env={})
    bad = tmp_path / "bad.toml"
    bad.write_text("[web\nport = 1\n")
    with pytest.raises(ConfigError, match="bad.toml: invalid TOML"):
        config_mod.load(bad, env={})


def test_config_path_from_environment(tmp_path):
    path = write_config(tmp_path / "c.toml", {"web": {"port": 9999}})
    cfg = config_mod.load(None, env={"CAMPAIGND_CONFIG": str(path)})
    assert cfg.web.port == 9999
    assert cfg.source == str(path.resolve())


# --- secrets ----------------------------------------------------------------------


def test_every_secret_has_an_environment_variable():
    assert SECRET_KEYS, "config.py marks no secret"
    for table, key, env in SECRET_KEYS:
        assert env and env.startswith("CAMPAIGND_"), f"{table}.{key}"


@pytest.mark.parametrize(("table", "key", "env"), SECRET_KEYS)
def test_secret_from_environment_variable(table, key, env):
    cfg = _load_dict({}, env={env: "from-env"})
    assert getattr(getattr(cfg, table), key) == "from-env"
    # The file's own value wins over the environment.
    cfg = _load_dict({table: {key: "from-file"}}, env={env: "from-env"})
    assert getattr(getattr(cfg, table), key) == "from-file"


def test_secret_from_file_key_wins_over_environment(tmp_path):
    secret = tmp_path / "token"
    secret.write_text("s3cret\n")
    cfg = _load_dict(
        {"provider": {"token_file": str(secret)}},
        env={"CAMPAIGND_PROVIDER_TOKEN": "from-env"},
    )
    assert cfg.provider.token == "s3cret"


def test_secret_file_relative_to_credentials_directory(tmp_path):
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "api-token").write_text("from-systemd")
    cfg = _load_dict(
        {"web": {"api_token_file": "api-token"}},
        env={"CREDENTIALS_DIRECTORY": str(creds)},
    )
    assert cfg.web.api_token == "from-systemd"


def _load_as_unprivileged(raw: dict, env: dict) -> str:
    """from_dict in a forked child that cannot bypass file permissions (root
    drops to nobody): the outcome as text, "ok" or the ConfigError."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        outcome = "ok"
        try:
            if os.geteuid() == 0:
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
            _load_dict(raw, env=env)
        except ConfigError as exc:
            outcome = f"ConfigError: {exc}"
        except BaseException as exc:  # noqa: BLE001 - what the CLI would crash on
            outcome = f"{type(exc).__name__}: {exc}"
        os.write(write, outcome.encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        outcome = pipe.read().decode()
    os.waitpid(pid, 0)
    return outcome


def test_credentials_directory_we_may_not_search_names_the_key(tmp_path):
    # Under systemd, $CREDENTIALS_DIRECTORY exists but may refuse us (seen
    # under a nested systemd 252): the answer must be the one-line config
    # error naming the key (exit 2, not restarted), not a traceback.
    tmp_path.chmod(0o755)
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "provider_token").write_text("tok")
    creds.chmod(0o700 if os.geteuid() == 0 else 0o000)
    try:
        outcome = _load_as_unprivileged(
            {"provider": {"token_file": "provider_token"}},
            env={"CREDENTIALS_DIRECTORY": str(creds)},
        )
    finally:
        creds.chmod(0o700)
    assert outcome == (
        "ConfigError: provider.token_file: cannot read "
        f"{creds / 'provider_token'}: Permission denied"
    )


def test_unreadable_secret_file_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"^web.webhook_secret_file: cannot read"):
        _load_dict({"web": {"webhook_secret_file": str(tmp_path / "nope")}})
    with pytest.raises(ConfigError, match=r"^web.api_token_file: must be a file path"):
        _load_dict({"web": {"api_token_file": ""}})


# --- campaignd check-config (subprocess) ----------------------------------------


def _check_config(path, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "daemon", "check-config", "-c", str(path)],
        capture_output=True,
        text=True,
        env=subprocess_env(**env),
        timeout=60,
        check=False,
    )


def test_check_config_prints_toml_with_secrets_masked(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("tok-from-file")
    path = tmp_path / "c.toml"
    path.write_text(
        dump_toml(
            {
                "daemon": {"data_dir": str(tmp_path / "data")},
                "provider": {"token_file": str(token_file)},
                "web": {"port": 9000, "webhook_secret": "hook-secret"},
            }
        )
    )
    proc = _check_config(path, CAMPAIGND_API_TOKEN="api-from-env")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    printed = tomllib.loads(proc.stdout)
    assert printed["web"]["port"] == 9000
    assert printed["provider"]["token"] == "***"
    assert printed["web"]["webhook_secret"] == "***"
    assert printed["web"]["api_token"] == "***"
    # An unset secret shows as empty, so "not configured" is visible.
    assert printed["web"]["webhook_hmac_secret"] == ""
    for secret in ("tok-from-file", "hook-secret", "api-from-env"):
        assert secret not in proc.stdout
    # What it prints is itself a valid config with the same values.
    assert _load_dict(printed).web.port == 9000


def test_check_config_error_is_one_line_naming_the_key(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[web]\nport = 70000\n")
    proc = _check_config(path)
    assert proc.returncode == EXIT_CONFIG
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1
    assert "web.port: must be 1-65535, got 70000" in proc.stderr


def test_check_config_of_the_example_succeeds(request):
    proc = _check_config(request.config.rootpath / "config.example.toml")
    assert proc.returncode == 0, proc.stderr
    assert tomllib.loads(proc.stdout)["web"]["port"] == 8080
