"""`campaignd campaign show ID --watch`: the funnel as bars, redrawn until the
campaign completes (or is cancelled), with the ETA of its last Message 1.

The figures are the console's (campaigns.campaign_summary, insights.funnel);
the ETA is pacing.message1_eta. Lines fit 80 columns. On a terminal each
snapshot replaces the last (cursor home, clear); anywhere else (a pipe, a
log) each interval prints one plain snapshot after the other, no escape code.
"""

from __future__ import annotations

import datetime as dt
import sys
import textwrap
import time

from daemon.config import Config
from daemon.domain import campaigns
from daemon.domain import insights
from daemon.domain import pacing
from daemon.errors import EXIT_OK
from daemon.store.models import CampaignStatus
from daemon.store.models import MemberState
from daemon.store.models import utcnow

WIDTH = 80
LABEL = 16  # the longest funnel label, "Message 2 sent", and a margin
BAR = WIDTH - LABEL - 8 - 6  # count column (7 and a space), percent (6)
CLEAR = "\x1b[H\x1b[J"  # cursor home, clear to the end of the screen
DONE = (CampaignStatus.COMPLETED, CampaignStatus.CANCELLED)


def watch(cfg: Config, campaign_id: int, interval_s: float, out=None) -> int:
    """Draw the campaign every `interval_s` until it is completed or cancelled."""
    out = out or sys.stdout
    tty = out.isatty()
    while True:
        now = utcnow()
        summary = campaigns.campaign_summary(campaign_id)
        text = render(summary, eta_line(cfg, summary, now), now)
        if tty:
            out.write(CLEAR + text + "\n")
        else:
            out.write(text + "\n\n")
        out.flush()
        if summary["status"] in DONE:
            return EXIT_OK
        time.sleep(interval_s)


def render(summary: dict, eta: str, now: dt.datetime) -> str:
    """One snapshot: a title, the funnel's bars, where the others went, the ETA."""
    funnel = insights.funnel(summary)
    status = summary["status"]
    if summary.get("status_reason"):
        status += f" ({summary['status_reason']})"
    title = f"campaign {summary['id']}: {summary['name']}"
    clock = now.strftime("%H:%M:%S UTC")
    lines = [_fit(title, WIDTH - len(clock) - 1).ljust(WIDTH - len(clock)) + clock]
    lines.append(_fit(f"status {status}", WIDTH))
    lines.append("")
    top = funnel.stages[0][2]
    for _key, label, count in funnel.stages:
        lines.append(_bar(label, count, top))
    lines.append("")
    beside = ", ".join(f"{label} {count}" for _key, label, count in funnel.beside)
    lines.extend(textwrap.wrap(beside, WIDTH))
    lines.extend(textwrap.wrap(eta, WIDTH, subsequent_indent="  "))
    return "\n".join(lines)


def eta_line(cfg: Config, summary: dict, now: dt.datetime) -> str:
    """Message 1 still to send, and when the last goes out at the pacing limits."""
    left = summary["members"].get(MemberState.PENDING, 0)
    status = summary["status"]
    if status in DONE:
        finished = summary.get("finished_at") or ""
        # "2026-12-03T15:58:03.066696Z" -> "2026-12-03 15:58:03 UTC"
        return status + (
            f" at {finished[:19].replace('T', ' ')} UTC" if finished else ""
        )
    limits = _limits(cfg)
    if left == 0:
        return (
            "every Message 1 is out: waiting for replies and Message 2 (members "
            f"expire {cfg.campaigns.reply_window_h:g} h after their Message 1)"
        )
    if status != CampaignStatus.RUNNING:
        return f"{left} Message 1 to send; no ETA while {status} ({limits})"
    used = pacing.sent_today(cfg.provider.device, now) if cfg.pacing.daily_cap else 0
    eta = pacing.message1_eta(cfg.pacing, left, now, used)
    if eta is None:
        when = f"not within {pacing.ETA_HORIZON_DAYS} days"
    elif eta - now < dt.timedelta(seconds=1):
        when = "now: no pacing limit holds them back"
    else:
        when = f"{_clock(eta, now)} (in {_duration(eta - now)})"
    return f"{left} Message 1 to send, the last by {when}; {limits}"


def _limits(cfg: Config) -> str:
    p = cfg.pacing
    parts = [f"{p.per_minute:g}/min" if p.per_minute else "no rate limit"]
    parts.append(f"cap {p.daily_cap}/day" if p.daily_cap else "no daily cap")
    if p.window_start != p.window_end:
        parts.append(f"window {p.window_start}-{p.window_end} {p.timezone}")
    return ", ".join(parts)


def _bar(label: str, count: int, top: int) -> str:
    share = count / top if top else 0.0
    filled = round(share * BAR)
    bar = "#" * filled + "." * (BAR - filled)
    return f"{label:<{LABEL}}{count:>7} {bar}{share:>6.0%}"


def _fit(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _clock(at: dt.datetime, now: dt.datetime) -> str:
    if at.date() == now.date():
        return at.strftime("%H:%M:%S UTC")
    return at.strftime("%Y-%m-%d %H:%M UTC")


def _duration(delta: dt.timedelta) -> str:
    seconds = int(delta.total_seconds())
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"
