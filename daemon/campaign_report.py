"""`campaignd campaign show` (and the other campaign commands' report): the
counters, then how sending goes (retries waiting, the next attempt, the last
failure and why, the ETA of the last Message 1 at the pacing limits), and
the members' number checks (counts by status, when the pending ones are done
at campaigns.verify_per_minute)."""

from __future__ import annotations

import datetime as dt
import json

from daemon.app import service
from daemon.config import Config
from daemon.domain import campaigns
from daemon.domain import insights
from daemon.store.models import duration_text
from daemon.store.models import utcnow


def with_sending(cfg: Config, summary: dict) -> dict:
    """The summary plus `sending`, `eta` and `verification` (what `campaign
    show` prints)."""
    now = utcnow()
    return {
        **summary,
        "sending": campaigns.sending_details(summary["id"]),
        "eta": insights.eta_text(cfg, summary, now),
        "verification": service.campaign_verification(cfg, summary, now),
    }


def verification_text(figures: dict, now: dt.datetime) -> str:
    """Number checks in words: '2 pending, 1 on WhatsApp, ...; all checked
    by 2026-05-01 12:00:30 UTC (in 30s)'."""
    text = (
        f"{figures['pending']} pending, {figures['valid']} on WhatsApp, "
        f"{figures['invalid']} not on WhatsApp, {figures['unknown']} unknown, "
        f"{figures['unchecked']} never checked"
    )
    if figures.get("eta"):
        eta = dt.datetime.fromisoformat(figures["eta"].removesuffix("Z"))
        left = max(0.0, (eta - now).total_seconds())
        text += (
            f"; all checked by {eta:%Y-%m-%d %H:%M:%S} UTC (in {duration_text(left)})"
        )
    return text


def _sending_lines(summary: dict) -> list[str]:
    sending = summary.get("sending")
    if not sending:
        return []
    lines = []
    if sending["retrying"]:
        lines.append(
            f"  retrying    {plural(sending['retrying'], 'message')}, next attempt "
            f"{sending['next_attempt_at'] or 'when due'}"
        )
    elif sending["next_attempt_at"]:
        lines.append(f"  next send   {sending['next_attempt_at']}")
    last = sending["last_failure"]
    if last:
        lines.append(
            f"  last failed {last['at']} {last['phone']} (message {last['kind']}): "
            f"{shorten(last['error'] or '', 60)}"
        )
    lines.append(f"  eta         {summary['eta']}")
    return lines


def print_summary(args, summary: dict) -> None:
    if args.json:
        print(json.dumps(summary, ensure_ascii=False))
        return
    lines = [f"campaign {summary['id']}: {summary['name']}"]
    status = summary["status"]
    if summary.get("status_reason"):
        status += f" ({summary['status_reason']})"
    lines.append(f"  status      {status}")
    for key in ("created_at", "started_at", "finished_at"):
        if summary.get(key):
            lines.append(f"  {key.removesuffix('_at'):<11} {summary[key]}")
    lines.append(f"  contacts    {summary.get('contacts', 0)}")
    for label in ("members", "messages"):
        if summary.get(label):
            lines.append(f"  {label:<11} {_counts(summary[label])}")
    unsure = summary.get("unconfirmed")
    if unsure and any(unsure.values()):
        lines.append(
            f"  unconfirmed {unsure['waiting']} waiting for evidence, "
            f"{unsure['resent']} re-sent without it, {unsure['failed']} failed"
        )
    if "retried" in summary:
        lines.append(f"  retried     {summary['retried']} failed messages")
    if "imported" in summary:
        done = summary["imported"]
        lines.append(
            f"  imported    {plural(done['created'], 'new contact')}, "
            f"{done['updated']} updated, "
            f"{plural(done['duplicates_merged'], 'duplicate')} merged"
            + (
                f", {plural(len(done['rejected']), 'row')} rejected"
                if done.get("rejected")
                else ""
            )
        )
    lines += _sending_lines(summary)
    if summary.get("verification"):
        figures = verification_text(summary["verification"], utcnow())
        lines.append(f"  numbers     {figures}")
    lines.append(f"  message 1   {shorten(summary.get('message1', ''), 60)}")
    lines.append(f"  message 2   {shorten(summary.get('message2', ''), 60)}")
    print("\n".join(lines))


def _counts(counts: dict) -> str:
    """'pending 3, sent 2' from {"pending": 3, ...}; nested dicts as 'a: (...)'."""
    parts = []
    for key, value in counts.items():
        if isinstance(value, dict):
            if value:
                parts.append(f"{key} ({_counts(value)})")
        else:
            parts.append(f"{key} {value}")
    return ", ".join(parts) or "none"


def shorten(text: str, width: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")
