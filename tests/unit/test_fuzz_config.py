"""Config fuzzing: any TOML document gives a Config or a ConfigError naming a key.

Random tables (known and unknown names), random keys (real ones, their
``*_file`` secret variants, and junk) and every TOML value type (integers of
any size, floats with nan and inf, booleans, strings, dates and times, arrays,
nested tables). `config.from_dict` must never raise anything else: the
daemon turns ConfigError into one line and exit code 2, anything else into a
traceback.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import tomllib

import pytest
from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from daemon import config as config_mod
from daemon.errors import ConfigError

TABLES = {name: cls.__name__ for name, cls in config_mod.table_types().items()}
FIELDS = {
    name: [f.name for f in dataclasses.fields(getattr(config_mod, cls))]
    for name, cls in (
        ("daemon", "DaemonConfig"),
        ("database", "DatabaseConfig"),
        ("queue", "QueueConfig"),
        ("provider", "ProviderConfig"),
        ("web", "WebConfig"),
        ("status", "StatusConfig"),
        ("workers", "WorkersConfig"),
        ("retry", "RetryConfig"),
        ("pacing", "PacingConfig"),
        ("campaigns", "CampaignsConfig"),
        ("alerts", "AlertsConfig"),
        ("supervisor", "SupervisorConfig"),
        ("scheduler", "SchedulerConfig"),
    )
}
SECRET_FILE_KEYS = {
    "provider": ["token_file", "app_secret_file", "verify_token_file"],
    "web": ["webhook_secret_file", "webhook_hmac_secret_file", "api_token_file"],
}

FUZZ = settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

text = st.text(st.characters(codec="utf-8"), max_size=40)
# Odd names (line breaks, spaces) come back repr()'d in the error.
names = st.text(st.characters(blacklist_categories=["Cs"]), max_size=40)
scalars = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    text,
    st.sampled_from(
        [
            "",
            "0",
            "00:00",
            "24:00",
            "25:61",
            "UTC",
            "Europe/Paris",
            "redis://x",
            "sqlite:///x.db",
            "postgresql://u@h/db",
            "wassenger",
            "meta",
            "debug",
            "redis",
            "postgres",
        ]
    ),
    st.datetimes(),
    st.dates(),
    st.times(),
)
values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(names, children, max_size=4),
    ),
    max_leaves=12,
)


@st.composite
def table_body(draw, table: str):
    known = FIELDS.get(table, []) + SECRET_FILE_KEYS.get(table, [])
    keys = draw(
        st.lists(
            st.one_of(st.sampled_from(known) if known else names, names),
            max_size=6,
            unique=True,
        )
    )
    body = {}
    for key in keys:
        if key.endswith("_file"):
            # A relative name that does not exist: never /dev/zero or a FIFO.
            body[key] = draw(
                st.one_of(st.just(""), st.integers(), st.just("no-such-secret-file"))
            )
        else:
            body[key] = draw(values)
    return body


@st.composite
def documents(draw):
    tables = draw(
        st.lists(
            st.one_of(st.sampled_from(sorted(TABLES)), names), max_size=5, unique=True
        )
    )
    doc = {}
    for name in tables:
        if draw(st.integers(0, 9)) == 0:
            doc[name] = draw(values)  # a table that is not a table
        else:
            doc[name] = draw(table_body(name))
    return doc


def assert_names_a_key(exc: ConfigError, doc: dict) -> None:
    names = set()
    for table in set(doc) | set(TABLES):
        names |= {table, repr(table)}
        body = doc.get(table)
        keys = list(body) if isinstance(body, dict) else []
        keys += FIELDS.get(table, []) + SECRET_FILE_KEYS.get(table, [])
        names |= {f"{table}.{key}" for key in keys}
        names |= {f"{table}.{key!r}" for key in keys}
    message = str(exc)
    assert any(message.startswith(f"{name}:") for name in names), (
        f"no key named in {exc!r}"
    )
    assert "\n" not in message, "errors must be one line"


@FUZZ
@given(documents())
def test_random_documents_give_a_config_or_a_config_error(doc):
    try:
        cfg = config_mod.from_dict(doc, env={})
    except ConfigError as exc:
        assert_names_a_key(exc, doc)
    else:
        assert isinstance(cfg, config_mod.Config)


@FUZZ
@given(st.sampled_from(sorted(FIELDS)), st.data())
def test_every_known_key_with_any_value(table, data):
    key = data.draw(st.sampled_from(FIELDS[table]))
    value = data.draw(values)
    doc = {table: {key: value}}
    try:
        config_mod.from_dict(doc, env={})
    except ConfigError as exc:
        assert str(exc).startswith(f"{table}."), exc


@settings(max_examples=80, deadline=None, database=None)
@given(st.text(max_size=200))
def test_any_text_as_a_file_is_loaded_or_refused_in_one_line(tmp_path_factory, raw):
    path = tmp_path_factory.mktemp("cfg") / "campaignd.toml"
    path.write_text(raw, encoding="utf-8")
    try:
        config_mod.load(path, env={})
    except ConfigError as exc:
        assert "\n" not in str(exc)


def test_toml_can_carry_a_nul_character():
    """Why the NUL cases below matter: a real config file can hold one."""
    assert tomllib.loads('data_dir = "a\\u0000b"')["data_dir"] == "a\x00b"


def test_nul_in_data_dir_is_a_config_error():
    with pytest.raises(ConfigError, match=r"^daemon\.data_dir"):
        config_mod.from_dict({"daemon": {"data_dir": "a\x00b"}}, env={})


def test_nul_in_a_secret_file_path_is_a_config_error():
    with pytest.raises(ConfigError, match=r"^web\.webhook_secret_file"):
        config_mod.from_dict({"web": {"webhook_secret_file": "a\x00b"}}, env={})


def test_an_unknown_key_with_a_line_break_stays_one_line():
    with pytest.raises(ConfigError) as info:
        config_mod.from_dict({"web": {"po\nrt": 1}}, env={})
    assert "\n" not in str(info.value)


def test_toml_dates_and_times_are_refused_by_name():
    for value in (dt.date(2024, 1, 1), dt.time(1, 2), dt.datetime(2024, 1, 1)):
        with pytest.raises(ConfigError, match=r"^retry\.base_s: must be a number"):
            config_mod.from_dict({"retry": {"base_s": value}}, env={})
