"""Messaging providers: build the configured client or webhook parser by kind."""

from __future__ import annotations

from daemon.config import ProviderConfig
from daemon.errors import ConfigError
from daemon.providers.base import Provider
from daemon.providers.base import WebhookParser
from daemon.providers.meta import MetaProvider
from daemon.providers.meta import MetaWebhookParser
from daemon.providers.wassenger import WassengerProvider
from daemon.providers.wassenger import WassengerWebhookParser

__all__ = ["make_provider", "webhook_parser"]


def make_provider(cfg: ProviderConfig) -> Provider:
    """A thread-safe client for ``cfg.kind``; call close() when done."""
    if cfg.kind == "wassenger":
        return WassengerProvider(cfg)
    if cfg.kind == "meta":
        if not cfg.phone_number_id:
            raise ConfigError("provider.phone_number_id: required for meta")
        return MetaProvider(cfg)
    raise ConfigError(f"provider.kind: unknown provider {cfg.kind!r}")


def webhook_parser(kind: str) -> WebhookParser:
    """The stateless parser of ``kind``'s webhook payloads."""
    if kind == "wassenger":
        return WassengerWebhookParser()
    if kind == "meta":
        return MetaWebhookParser()
    raise ConfigError(f"provider.kind: unknown provider {kind!r}")
