"""The domain: campaigns, the send state machine, replies and Message 2.

Every function here works on the database alone (no queue, no HTTP), so the
same rules hold wherever they are called from: a worker thread, the web role,
the CLI or a test. Guarantees are carried by single SQL statements and unique
constraints, never by check-then-act:

- a claim is one ``UPDATE ... WHERE status ... RETURNING``: a second claim of
  the same row finds nothing, so a task enqueued twice sends once;
- Message 1 and Message 2 are unique per (campaign, contact, kind);
- statuses only move forward (``UPDATE ... WHERE status IN (lower ranks)``).

The package by section (each module imports only those above it):

- common: constants, the idempotency key, the opted-out test;
- templates: template fields and rendering;
- lifecycle: create, start, pause, resume, cancel, retry failed, complete;
- views: summaries, lists, message dicts;
- fanout: the Message 1 rows of a running campaign, a batch at a time;
- sending: claim, release, record the provider's answer, backoff, leases;
- sweep: lost rows and events, members behind their messages, expiry;
- replies: replies, opt-outs, provider statuses.

Callers use the package (`from daemon.domain import campaigns`); the names
below are its public interface.
"""

from daemon.domain.campaigns.common import MAX_INTERRUPTED_ATTEMPTS
from daemon.domain.campaigns.common import PRIORITY_MESSAGE_2
from daemon.domain.campaigns.common import SESSION_WINDOW
from daemon.domain.campaigns.common import Backoff
from daemon.domain.campaigns.common import campaign_cancelled
from daemon.domain.campaigns.common import contact_opted_out
from daemon.domain.campaigns.common import idempotency_key
from daemon.domain.campaigns.common import session_closed
from daemon.domain.campaigns.fanout import fan_out
from daemon.domain.campaigns.fanout import fan_out_batch
from daemon.domain.campaigns.fanout import fanout_ranges
from daemon.domain.campaigns.lifecycle import cancel_campaign
from daemon.domain.campaigns.lifecycle import create_campaign
from daemon.domain.campaigns.lifecycle import due_message_ids
from daemon.domain.campaigns.lifecycle import get_campaign
from daemon.domain.campaigns.lifecycle import maybe_complete
from daemon.domain.campaigns.lifecycle import pause_campaign
from daemon.domain.campaigns.lifecycle import resume_campaign
from daemon.domain.campaigns.lifecycle import retry_failed
from daemon.domain.campaigns.lifecycle import start_campaign
from daemon.domain.campaigns.replies import ReplyOutcome
from daemon.domain.campaigns.replies import apply_status
from daemon.domain.campaigns.replies import find_message
from daemon.domain.campaigns.replies import fold_keyword
from daemon.domain.campaigns.replies import handle_reply
from daemon.domain.campaigns.replies import is_opt_out
from daemon.domain.campaigns.replies import opt_out_contact
from daemon.domain.campaigns.sending import AcceptedSend
from daemon.domain.campaigns.sending import ClaimedMessage
from daemon.domain.campaigns.sending import cancel_if_withdrawn
from daemon.domain.campaigns.sending import cancel_unclaimable
from daemon.domain.campaigns.sending import claim
from daemon.domain.campaigns.sending import claim_many
from daemon.domain.campaigns.sending import expire_message2
from daemon.domain.campaigns.sending import hand_back
from daemon.domain.campaigns.sending import held_by
from daemon.domain.campaigns.sending import held_by_process
from daemon.domain.campaigns.sending import member_failed
from daemon.domain.campaigns.sending import record_failure
from daemon.domain.campaigns.sending import record_retryable
from daemon.domain.campaigns.sending import record_sent
from daemon.domain.campaigns.sending import record_sent_many
from daemon.domain.campaigns.sending import release
from daemon.domain.campaigns.sending import release_leases
from daemon.domain.campaigns.sending import replied_meanwhile
from daemon.domain.campaigns.sending import still_sendable
from daemon.domain.campaigns.sending import unconfirmed_values
from daemon.domain.campaigns.sweep import SweepResult
from daemon.domain.campaigns.sweep import expire_interactions
from daemon.domain.campaigns.sweep import repair_members
from daemon.domain.campaigns.sweep import running_campaign_ids
from daemon.domain.campaigns.sweep import sweep
from daemon.domain.campaigns.templates import render
from daemon.domain.campaigns.templates import template_fields
from daemon.domain.campaigns.templates import template_parameter_values
from daemon.domain.campaigns.templates import template_values
from daemon.domain.campaigns.views import campaign_summary
from daemon.domain.campaigns.views import list_campaigns
from daemon.domain.campaigns.views import list_messages
from daemon.domain.campaigns.views import message_dict
from daemon.domain.campaigns.views import sending_details
from daemon.owners import process_key

__all__ = [
    "PRIORITY_MESSAGE_2",
    "MAX_INTERRUPTED_ATTEMPTS",
    "SESSION_WINDOW",
    "session_closed",
    "idempotency_key",
    "contact_opted_out",
    "campaign_cancelled",
    "template_fields",
    "template_parameter_values",
    "template_values",
    "render",
    "create_campaign",
    "get_campaign",
    "start_campaign",
    "pause_campaign",
    "resume_campaign",
    "cancel_campaign",
    "retry_failed",
    "maybe_complete",
    "due_message_ids",
    "campaign_summary",
    "list_campaigns",
    "list_messages",
    "message_dict",
    "sending_details",
    "fan_out",
    "fan_out_batch",
    "fanout_ranges",
    "ClaimedMessage",
    "claim",
    "claim_many",
    "still_sendable",
    "hand_back",
    "cancel_if_withdrawn",
    "cancel_unclaimable",
    "release",
    "held_by",
    "record_sent",
    "record_sent_many",
    "AcceptedSend",
    "record_failure",
    "replied_meanwhile",
    "expire_message2",
    "member_failed",
    "Backoff",
    "record_retryable",
    "process_key",
    "held_by_process",
    "unconfirmed_values",
    "release_leases",
    "SweepResult",
    "sweep",
    "running_campaign_ids",
    "expire_interactions",
    "repair_members",
    "fold_keyword",
    "is_opt_out",
    "ReplyOutcome",
    "handle_reply",
    "opt_out_contact",
    "find_message",
    "apply_status",
]
