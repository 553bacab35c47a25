"""Secure by default: no unsigned webhooks beyond loopback, no secret printed."""

from __future__ import annotations

import subprocess
import sys
import tomllib

import pytest

from daemon import config as config_mod
from daemon import config_text
from daemon.errors import EXIT_CONFIG
from daemon.errors import ConfigError
from tests.helpers import dump_toml
from tests.helpers import subprocess_env

META = {"kind": "meta", "phone_number_id": "123"}


def _load(raw: dict, **kwargs) -> config_mod.Config:
    return config_mod.from_dict(raw, env={}, **kwargs)


def _check_config(path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "daemon", "check-config", "-c", str(path)],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=60,
        check=False,
    )


# --- unsigned webhooks beyond loopback ----------------------------------------


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            {"web": {"host": "0.0.0.0"}},
            "web.webhook_secret: required when web.host = '0.0.0.0' listens beyond "
            "loopback",
        ),
        ({"web": {"host": "::"}}, "web.webhook_secret: required"),
        ({"web": {"host": ""}}, "web.webhook_secret: required"),
        ({"web": {"host": "10.0.0.5"}}, "web.webhook_secret: required"),
        ({"web": {"host": "campaignd.internal"}}, "web.webhook_secret: required"),
        (
            {"web": {"host": "0.0.0.0"}, "provider": META},
            "provider.app_secret: required when web.host = '0.0.0.0'",
        ),
        # The admin token protects /api/v1, not the webhooks.
        (
            {"web": {"host": "0.0.0.0", "api_token": "t"}},
            "web.webhook_secret: required",
        ),
        # Wassenger's secrets do not sign Meta's webhooks.
        (
            {"web": {"host": "0.0.0.0", "webhook_hmac_secret": "h"}, "provider": META},
            "provider.app_secret: required",
        ),
    ],
)
def test_unsigned_webhooks_beyond_loopback_are_refused(raw, message):
    with pytest.raises(ConfigError) as info:
        _load(raw)
    text = str(info.value)
    assert text.startswith(message)
    assert "web.allow_unsigned_webhooks = true" in text
    assert "\n" not in text


@pytest.mark.parametrize(
    "raw",
    [
        {},
        {"web": {"host": "127.0.0.1"}},
        {"web": {"host": "127.0.0.2"}},
        {"web": {"host": "::1"}},
        {"web": {"host": "[::1]"}},
        {"web": {"host": "localhost"}},
        {"web": {"host": "LOCALHOST"}},
        {"web": {"host": "localhost"}, "provider": META},
        {"web": {"host": "0.0.0.0", "webhook_secret": "s"}},
        {"web": {"host": "0.0.0.0", "webhook_hmac_secret": "h"}},
        {"web": {"host": "0.0.0.0"}, "provider": {**META, "app_secret": "a"}},
        # Meta cannot send headers: the URL's ?token= is its shared secret.
        {"web": {"host": "0.0.0.0", "webhook_secret": "s"}, "provider": META},
        {"web": {"host": "0.0.0.0", "allow_unsigned_webhooks": True}},
        {
            "web": {"host": "::", "allow_unsigned_webhooks": True},
            "provider": META,
        },
    ],
)
def test_authenticated_or_loopback_or_explicitly_allowed_loads(raw):
    _load(raw)


def test_a_secret_from_the_environment_counts():
    cfg = config_mod.from_dict(
        {"web": {"host": "0.0.0.0"}}, env={"CAMPAIGND_WEBHOOK_SECRET": "from-env"}
    )
    assert cfg.web.webhook_secret == "from-env"


def test_a_secret_file_left_unread_counts_as_set(tmp_path):
    # `campaignd status` does not read secret files (an operator may not be
    # allowed to): the file key alone must not make the config look unsigned.
    raw = {"web": {"host": "0.0.0.0", "webhook_secret_file": str(tmp_path / "no")}}
    cfg = _load(raw, read_secrets=False)
    assert cfg.web.webhook_secret == ""
    with pytest.raises(ConfigError, match="web.webhook_secret_file: cannot read"):
        _load(raw)


def test_allow_unsigned_webhooks_must_be_a_boolean():
    with pytest.raises(ConfigError) as info:
        _load({"web": {"allow_unsigned_webhooks": "yes"}})
    assert str(info.value) == (
        "web.allow_unsigned_webhooks: must be a boolean, got a string"
    )


def test_check_config_refuses_unsigned_webhooks_in_one_line(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[web]\nhost = "0.0.0.0"\n')
    proc = _check_config(path)
    assert proc.returncode == EXIT_CONFIG
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1
    assert proc.stderr.startswith(
        "campaignd: config error: web.webhook_secret: required when web.host"
    )


def test_the_cluster_example_with_its_secret_file_loads(tmp_path):
    # docs/cluster.md listens on 0.0.0.0 with webhook_secret_file.
    secret = tmp_path / "webhook_secret"
    secret.write_text("s3cret\n")
    raw = {"web": {"host": "0.0.0.0", "webhook_secret_file": "webhook_secret"}}
    cfg = config_mod.from_dict(raw, env={"CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert cfg.web.webhook_secret == "s3cret"


# --- check-config masks every secret, also inside URLs ------------------------

SECRETS = {
    "pg-pass": "database url password",
    "pg-query-pass": "database url password= option",
    "redis-pass": "redis url password",
    "slack-token": "alert webhook path",
    "hook-query-token": "alert webhook query",
    "ping-uuid": "heartbeat-like URL in the alert command",
    "cmd-token": "URL password in the alert command",
    "base-key": "provider base URL api_key",
}


def test_check_config_masks_passwords_and_tokens_inside_urls(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(
        dump_toml(
            {
                "daemon": {"data_dir": str(tmp_path / "data")},
                "database": {
                    "url": "postgresql://campaignd:pg-pass@db.internal:5432/campaignd"
                    "?sslmode=require&password=pg-query-pass"
                    "&application_name=campaignd-test"
                },
                "queue": {
                    "backend": "redis",
                    "url": "redis://:redis-pass@redis.internal:6379/0",
                },
                "provider": {"base_url": "https://api.example/?api_key=base-key"},
                "alerts": {
                    "webhook_url": "https://hooks.slack.com/services/T0/B0/slack-token"
                    "?token=hook-query-token",
                    "command": "curl -fsS https://hc-ping.com/ping-uuid && "
                    "curl https://ops:cmd-token@alerts.example/notify",
                },
            }
        )
    )
    proc = _check_config(path)
    assert proc.returncode == 0, proc.stderr
    leaked = [what for secret, what in SECRETS.items() if secret in proc.stdout]
    assert leaked == []
    printed = tomllib.loads(proc.stdout)
    # What is not a secret stays readable: user, host, database, options.
    assert printed["database"]["url"] == (
        "postgresql://campaignd:***@db.internal:5432/campaignd"
        "?sslmode=require&password=***&application_name=campaignd-test"
    )
    assert printed["queue"]["url"] == "redis://:***@redis.internal:6379/0"
    assert printed["provider"]["base_url"] == "https://api.example/?api_key=***"
    assert printed["alerts"]["webhook_url"] == "https://hooks.slack.com/***"
    assert printed["alerts"]["command"] == (
        "curl -fsS https://hc-ping.com/*** && curl https://ops:***@alerts.example/***"
    )
    # Still a config that loads.
    _load(printed)


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("postgresql://u@h/db", "postgresql://u@h/db"),
        ("redis://token-as-user@h:6379/0", "redis://***@h:6379/0"),
        ("redis://h:6379/0", "redis://h:6379/0"),
        ("host=db password='a b' dbname=x", "host=db password=*** dbname=x"),
        ("http://127.0.0.1:8099", "http://127.0.0.1:8099"),
        (
            "https://x.io/hook?a=1&secret=s&sig=z",
            "https://x.io/hook?a=1&secret=***&sig=***",
        ),
    ],
)
def test_mask_text(text, shown):
    assert config_text.mask_text(text) == shown


@pytest.mark.parametrize(
    ("command", "shown"),
    [
        ("notify --token abc123 --to ops", "notify --token *** --to ops"),
        ('notify --api-key="k 1" x', "notify --api-key=*** x"),
        (
            'curl -H "Authorization: Bearer xyz" https://a.example/c?x=1',
            'curl -H "Authorization: Bearer ***" https://a.example/***',
        ),
        ("SLACK_TOKEN=abc /usr/bin/alert", "SLACK_TOKEN=*** /usr/bin/alert"),
        ("mail -s alert ops@example.com", "mail -s alert ops@example.com"),
    ],
)
def test_alert_command_credentials_are_masked(command, shown):
    assert config_text.mask_command(command) == shown


def test_check_config_masks_a_token_given_to_the_alert_command(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(
        dump_toml(
            {
                "daemon": {"data_dir": str(tmp_path / "data")},
                "alerts": {"command": "/usr/local/bin/page --token pager-secret-1"},
            }
        )
    )
    proc = _check_config(path)
    assert proc.returncode == 0, proc.stderr
    assert "pager-secret-1" not in proc.stdout
    assert tomllib.loads(proc.stdout)["alerts"]["command"] == (
        "/usr/local/bin/page --token ***"
    )
