"""`campaignd campaign show ID --watch`: the funnel as bars, redrawn until the
campaign completes (or is cancelled), with the ETA of its last Message 1.

The figures are the console's (campaigns.campaign_summary, insights.funnel,
insights.eta_text over pacing.message1_eta). Lines fit 80 columns. On a
terminal each snapshot replaces the last (cursor home, clear); anywhere else
(a pipe, a log) each interval prints one plain snapshot after the other, no
escape code.
"""

from __future__ import annotations

import datetime as dt
import sys
import textwrap
import time

from daemon.config import Config
from daemon.domain import campaigns
from daemon.domain import insights
from daemon.errors import EXIT_OK
from daemon.store.models import utcnow

WIDTH = 80
LABEL = 16  # the longest funnel label, "Message 2 sent", and a margin
BAR = WIDTH - LABEL - 8 - 6  # count column (7 and a space), percent (6)
CLEAR = "\x1b[H\x1b[J"  # cursor home, clear to the end of the screen


def watch(cfg: Config, campaign_id: int, interval_s: float, out=None) -> int:
    """Draw the campaign every `interval_s` until it is completed or cancelled."""
    out = out or sys.stdout
    tty = out.isatty()
    while True:
        now = utcnow()
        summary = campaigns.campaign_summary(campaign_id)
        text = render(summary, insights.eta_text(cfg, summary, now), now)
        if tty:
            out.write(CLEAR + text + "\n")
        else:
            out.write(text + "\n\n")
        out.flush()
        if summary["status"] in insights.DONE:
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


def _bar(label: str, count: int, top: int) -> str:
    share = count / top if top else 0.0
    filled = round(share * BAR)
    bar = "#" * filled + "." * (BAR - filled)
    return f"{label:<{LABEL}}{count:>7} {bar}{share:>6.0%}"


def _fit(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."
