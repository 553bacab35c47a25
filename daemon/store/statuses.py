"""A message's statuses: stdlib only, so the CLI's parser (its --status
choices) needs no database driver imported before it knows the mode."""

from __future__ import annotations


class MessageStatus:
    PENDING = "pending"
    QUEUED = "queued"
    SENDING = "sending"
    # The request may have reached the provider (timeout after it was
    # written, worker killed mid-request): never re-sent blindly.
    UNCONFIRMED = "unconfirmed"
    SENT = "sent"
    DELIVERED = "delivered"
    READ = "read"
    FAILED = "failed"
    EXPIRED = "expired"
    CANCELLED = "cancelled"

    # Every status, in the order a message goes through them.
    ALL = (
        PENDING,
        QUEUED,
        SENDING,
        UNCONFIRMED,
        SENT,
        DELIVERED,
        READ,
        FAILED,
        EXPIRED,
        CANCELLED,
    )
    # Statuses only move forward along this rank; failed is terminal.
    RANK = {
        "pending": 0,
        "queued": 1,
        "sending": 2,
        "unconfirmed": 2,
        "sent": 3,
        "delivered": 4,
        "read": 5,
    }
    FINAL = frozenset({"sent", "delivered", "read", "failed", "expired", "cancelled"})
