"""The application service: what the CLI and the admin API both call.

Today the campaign actions. Create-with-contacts and import still live in
daemon/commands.py and daemon/roles/web/api.py with their own rules (the CLI
refuses a file with a bad row, the API imports the good rows): issue 14
asks for one function and one rule here.
"""

from __future__ import annotations

from daemon.domain import campaigns
from daemon.errors import InputError

CAMPAIGN_ACTIONS = ("start", "pause", "resume", "cancel", "retry-failed")


def campaign_action(campaign_id: int, action: str, tasks, reason: str = "") -> dict:
    """start | pause | resume | cancel | retry-failed; extra figures (retried)."""
    if action == "start":
        campaigns.start_campaign(campaign_id, tasks)
    elif action == "pause":
        campaigns.pause_campaign(campaign_id, reason=reason)
    elif action == "resume":
        campaigns.resume_campaign(campaign_id, tasks)
    elif action == "cancel":
        campaigns.cancel_campaign(campaign_id)
    elif action == "retry-failed":
        return {"retried": campaigns.retry_failed(campaign_id, tasks)}
    else:
        raise InputError(f"unknown campaign action {action!r}")
    return {}
