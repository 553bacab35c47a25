"""Who may post to the webhook routes: the config keys that let each
provider's route check its sender, and the refusal of a web role reachable
from outside that would take unsigned webhooks (checked when the config is
loaded, daemon/config.py)."""

from __future__ import annotations

import ipaddress

from daemon.errors import ConfigError


def is_loopback(host: str) -> bool:
    """True when `host` only accepts connections from this machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        # A host name other than localhost, "" (every interface): not loopback.
        return False


# The keys that let each provider's webhook route check its sender; any one
# of them is enough (the first is the one that provider's docs name).
WEBHOOK_SENDER_KEYS = {
    "wassenger": ("web.webhook_secret", "web.webhook_hmac_secret"),
    "meta": ("provider.app_secret", "web.webhook_secret"),
}
_SENDER_HINTS = {
    "wassenger": "or web.webhook_hmac_secret",
    "meta": "or web.webhook_secret as the webhook URL's ?token=",
}


def webhook_route_served(cfg, provider: str, unread: frozenset = frozenset()) -> bool:
    """Whether the web role serves `provider`'s webhook route: always on
    loopback or with web.allow_unsigned_webhooks, otherwise only when the
    route can check who posts to it. An unused provider's route without a
    check would let anyone post fake replies (and get Message 2 sent)."""
    if cfg.web.allow_unsigned_webhooks or is_loopback(cfg.web.host):
        return True
    for name in WEBHOOK_SENDER_KEYS[provider]:
        table, attr = name.split(".")
        if getattr(getattr(cfg, table), attr) or name in unread:
            return True
    return False


def check_webhook_secrets(cfg, unread: set[str]) -> None:
    """Refuse a web role reachable from outside that takes unsigned webhooks
    from the configured provider (the other provider's route is simply not
    served then: webhook_route_served). The error names the key the
    provider's docs tell you to set."""
    provider = "meta" if cfg.provider.kind == "meta" else "wassenger"
    if webhook_route_served(cfg, provider, frozenset(unread)):
        return
    key, hint = WEBHOOK_SENDER_KEYS[provider][0], _SENDER_HINTS[provider]
    raise ConfigError(
        f"{key}: required when web.host = {cfg.web.host!r} listens beyond "
        f"loopback, or anyone can post fake webhooks; set it ({hint}), "
        "or set web.allow_unsigned_webhooks = true if something in front checks them"
    )
