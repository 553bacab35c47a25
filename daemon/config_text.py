"""What a Config looks like as text: `campaignd check-config`'s masked view,
and TOML for the config files that the demo, tests and benches write.

Kept apart from daemon/config.py, which reads and checks the file.
"""

from __future__ import annotations

import dataclasses
import re
import urllib.parse

from daemon.config import Config
from daemon.config import table_types


def masked(cfg: Config) -> dict:
    """The effective config as a dict, secrets replaced by '***'.

    Secrets also hide inside other values: a URL's password
    (postgresql://u:***@db/x), a query parameter named like a credential
    (?token=***), a libpq `password=`. Alert URLs are credentials as a whole
    (Slack, Discord, healthchecks.io put the token in the path), so only
    their scheme and host are shown.
    """
    out = {}
    for name in table_types():
        section = getattr(cfg, name)
        table = {}
        for sf in dataclasses.fields(section):
            value = getattr(section, sf.name)
            if sf.metadata.get("secret") and value:
                value = "***"
            elif name == "alerts" and sf.name == "command":
                value = mask_command(value)
            elif isinstance(value, str):
                value = mask_text(value, whole_url=name == "alerts")
            table[sf.name] = value
        out[name] = table
    return out


# Query parameters whose value is a credential ("sslmode" stays visible).
_SECRET_PARAM = re.compile(r"pass|pwd|secret|token|key|sig|auth|code|cred", re.I)
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"]+")
_CONNINFO_PASSWORD = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s&]+)", re.I)


def mask_text(text: str, *, whole_url: bool = False) -> str:
    """`text` with the credentials of every URL (and libpq password) in it masked."""
    text = _CONNINFO_PASSWORD.sub(r"\1***", text)
    return _URL.sub(lambda m: _mask_url(m.group(0), whole_url), text)


# In a shell command: an option named like a credential and its value
# (--token abc, --api-key=abc, -p abc is not caught), an Authorization
# header's credentials, an environment assignment (SLACK_TOKEN=abc cmd).
_QUOTED_OR_WORD = r"""('(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*"|[^\s'"]+)"""
_SECRET_OPTION = re.compile(
    r"(--?[A-Za-z0-9_-]*(?:pass|pwd|secret|token|key|auth|cred)[A-Za-z0-9_-]*)"
    r"(=|\s+)" + _QUOTED_OR_WORD,
    re.I,
)
_AUTH_HEADER = re.compile(
    r"(Authorization:\s*(?:Bearer\s+|Basic\s+|Token\s+)?)[^'\"\s]+", re.I
)
_SECRET_ASSIGNMENT = re.compile(
    r"(\b[A-Za-z0-9_]*(?:PASS|PWD|SECRET|TOKEN|KEY|AUTH|CRED)[A-Za-z0-9_]*=)"
    + _QUOTED_OR_WORD,
    re.I,
)


def mask_command(command: str) -> str:
    """alerts.command as check-config shows it: URLs shown up to their host
    (as the alert URLs), and the credentials a command line carries hidden."""
    command = _AUTH_HEADER.sub(r"\1***", command)
    command = _SECRET_OPTION.sub(r"\1\2***", command)
    command = _SECRET_ASSIGNMENT.sub(r"\1***", command)
    return mask_text(command, whole_url=True)


def _mask_url(url: str, whole_url: bool) -> str:
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "***"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        user, colon, _ = userinfo.partition(":")
        # A user alone is a login name for a database, a token elsewhere.
        if colon:
            userinfo = f"{user}:***"
        elif not parts.scheme.startswith("postgres"):
            userinfo = "***"
        netloc = f"{userinfo}@{hostport}"
    if whole_url:
        rest = "/***" if parts.path.strip("/") or parts.query else parts.path
        return f"{parts.scheme}://{netloc}{rest}"
    query = "&".join(
        f"{name}=***" if _SECRET_PARAM.search(urllib.parse.unquote(name)) else pair
        for pair in parts.query.split("&")
        for name in [pair.partition("=")[0]]
    )
    return urllib.parse.urlunsplit(
        (parts.scheme, netloc, parts.path, query, parts.fragment)
    )


def to_toml(data: dict) -> str:
    """TOML for a dict of tables of scalars and string lists (masked(cfg), or
    the config files that tests, benches and the demo write)."""
    lines = []
    for table, values in data.items():
        lines.append(f"[{table}]")
        for key, value in values.items():
            lines.append(f"{key} = {toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    escaped = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'
