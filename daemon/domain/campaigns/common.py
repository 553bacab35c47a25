"""What every part of the campaign domain shares: constants, the idempotency
key of a message and the opted-out test the claim and the retries use."""

from __future__ import annotations

import datetime as dt
import random
from dataclasses import dataclass

import peewee as pw

from daemon.store.models import Campaign
from daemon.store.models import CampaignStatus
from daemon.store.models import Contact
from daemon.store.models import Message

PRIORITY_MESSAGE_2 = 10
# A row claimed this many times without an answer from the provider keeps
# killing its worker (or the workers keep dying): give up on it.
MAX_INTERRUPTED_ATTEMPTS = 20
# WhatsApp's customer service window: free-form messages (Message 2) only
# within 24 h of the contact's last message (providers.md).
SESSION_WINDOW = dt.timedelta(hours=24)
_CHUNK = 500
_SENT_OR_LATER = ("sent", "delivered", "read")
# A message not settled yet: its campaign cannot complete.
_OPEN_MESSAGE_STATUSES = ("queued", "sending", "unconfirmed")
# Message 1 was attempted at least once: a reply from its contact proves it
# arrived (queued rows count only with attempts > 0: a retry is pending).
_ATTEMPTED = ("sending", "unconfirmed") + _SENT_OR_LATER
# A reply can answer a member in these states. EXPIRED is included because
# the window is judged at the reply's arrival: the expiry job may have run
# between its arrival and its processing.
_REPLYABLE_STATES = ("pending", "message_1_sent", "expired")


def idempotency_key(campaign_id: int, contact_id: int, kind: int) -> str:
    return f"cd-{campaign_id}-{contact_id}-m{kind}"


def contact_opted_out():
    """The row's contact has opted out (a subquery usable in any UPDATE)."""
    return pw.fn.EXISTS(
        Contact.select(Contact.id).where(
            Contact.id == Message.contact, Contact.opted_out_at.is_null(False)
        )
    )


def campaign_cancelled():
    """The row's campaign was cancelled (a subquery usable in any UPDATE)."""
    return Message.campaign.in_(
        Campaign.select(Campaign.id).where(Campaign.status == CampaignStatus.CANCELLED)
    )


@dataclass(frozen=True)
class Backoff:
    base_s: float
    factor: float
    cap_s: float
    jitter: float

    def delay(self, failures: int, rng: random.Random | None = None) -> float:
        """Delay before the retry after the `failures`-th failure (1-based).

        With base 60, factor 2: 60 s, 120 s, 240 s ... capped at cap_s, then
        up to `jitter` of it added at random.
        """
        raw = min(self.cap_s, self.base_s * self.factor ** max(failures - 1, 0))
        return raw * (1 + self.jitter * (rng or random).random())


def session_closed(message, now) -> bool:
    """WhatsApp takes a free-form message only within 24 h of the contact's
    last message. A Message 2 row is created when the reply is taken in (at
    the reply's own time), so its creation time opens that window.
    (campaigns.reply_window_h is another rule: which replies trigger a
    Message 2 at all.)"""
    created = message.created_at
    return created is not None and now > created + SESSION_WINDOW
