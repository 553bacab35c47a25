"""The web console's HTML: a layout, the pages, and inline SVG pictures.

Plain functions returning strings: no template engine, no JavaScript, no
file to ship. Every value that reaches the page goes through `esc`. Figures a
test (or a script) may want to read carry `data-figure="name"`.
"""

from __future__ import annotations

import datetime as dt
import html

from daemon.domain.insights import Funnel
from daemon.domain.insights import SendSeries
from daemon.store.models import duration_text

CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#1d2433;background:#f5f6f8}
header{background:#1d2433;color:#fff;padding:.6em 1.2em;display:flex;gap:1.5em;
 align-items:center}
header a{color:#c8d3ea;text-decoration:none}header a.on{color:#fff;font-weight:600}
header form{margin-left:auto}main{padding:1em 1.2em;max-width:1100px}
h1{font-size:1.3em;margin:.2em 0 .6em}h2{font-size:1.05em;margin:1.4em 0 .4em}
table{border-collapse:collapse;background:#fff;margin:.3em 0}
td,th{padding:.25em .7em;border-bottom:1px solid #e3e6ec;text-align:left}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
.ok{color:#1a7f37}.bad{color:#c0262d;font-weight:600}.muted{color:#6b7385}
.note{background:#fff6d6;border:1px solid #e8d48a;padding:.5em .8em;margin:.5em 0}
.error{background:#fde8e8;border:1px solid #e6a3a3;padding:.5em .8em;margin:.5em 0}
.row{display:flex;gap:2em;flex-wrap:wrap;align-items:flex-start}
svg text{font:12px system-ui,sans-serif}button{cursor:pointer}
.bar{display:inline-block;width:120px;height:.8em;background:#e3e6ec;vertical-align:middle}
.bar span{display:block;height:100%;background:#3b6fd6}
"""

NAV = (
    ("overview", "/ui", "Overview"),
    ("campaigns", "/ui/campaigns", "Campaigns"),
    ("events", "/ui/events", "Events"),
)


def esc(value) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def layout(title: str, body: str, *, nav: str = "", csrf: str = "") -> str:
    """A whole page; `csrf` given means logged in (the nav and logout show)."""
    top = ""
    if csrf:
        links = "".join(
            f'<a href="{href}"{" class=on" if key == nav else ""}>{label}</a>'
            for key, href, label in NAV
        )
        top = (
            f"<header><strong>campaignd</strong>{links}"
            '<form method="post" action="/ui/logout">'
            f'<input type="hidden" name="csrf" value="{esc(csrf)}">'
            "<button>Log out</button></form></header>"
        )
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{esc(title)} - campaignd</title><style>{CSS}</style></head>"
        f"<body>{top}<main>{body}</main></body></html>"
    )


def refusal(title: str, reason: str) -> str:
    """A page that says why nothing else is shown (console disabled, ...)."""
    return layout(title, f"<h1>{esc(title)}</h1><p class=error>{esc(reason)}</p>")


def login_page(next_path: str, error: str = "") -> str:
    message = f'<p class="error" id="login-error">{esc(error)}</p>' if error else ""
    return layout(
        "Log in",
        "<h1>campaignd console</h1>"
        f"{message}"
        '<form method="post" action="/ui/login">'
        f'<input type="hidden" name="next" value="{esc(next_path)}">'
        "<p><label>API token (web.api_token)<br>"
        '<input type="password" name="token" id="token" size="40" '
        'autocomplete="current-password" required autofocus></label></p>'
        '<p><button id="login">Log in</button></p></form>',
    )


def table(headers: list[str], rows: list[list[str]], *, empty: str, numeric=()) -> str:
    """A table of already-escaped cells; `numeric` columns align right."""
    if not rows:
        return f'<p class="muted">{esc(empty)}</p>'
    head = "".join(
        f"<th{' class=n' if i in numeric else ''}>{esc(h)}</th>"
        for i, h in enumerate(headers)
    )
    body = "".join(
        "<tr>"
        + "".join(
            f"<td{' class=n' if i in numeric else ''}>{cell}</td>"
            for i, cell in enumerate(row)
        )
        + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def figure(name: str, value) -> str:
    return f'<span data-figure="{esc(name)}">{esc(value)}</span>'


def when(iso: str | None) -> str:
    """'2026-12-03T15:21:14.560091Z' as '2026-12-03 15:21:14' (UTC)."""
    if not iso:
        return "-"
    return esc(iso.replace("T", " ").partition(".")[0].removesuffix("Z"))


def _num(value, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


# ------------------------------------------------------------------ overview


def overview_page(
    status: dict | None,
    status_error: str,
    queues: dict | None,
    active: list[dict],
    resolved: list[dict],
    csrf: str,
) -> str:
    parts = ["<h1>Overview</h1>"]
    if status is None:
        parts.append(
            f'<p class="error" id="status-error">The supervisor does not answer: '
            f"{esc(status_error)}. Roles are not shown; the figures below come "
            "from the database and the queues.</p>"
        )
    else:
        d = status.get("daemon", {})
        state = d.get("state", "?")
        cls = "ok" if state == "running" else "bad"
        parts.append(
            f"<p>campaignd {esc(d.get('version', '?'))} on {esc(d.get('host', '?'))}:"
            f' <span class="{cls}" data-figure="daemon-state">{esc(state)}</span>,'
            f" supervisor pid {esc(d.get('pid'))},"
            f" up {duration_text(d.get('uptime_s'))},"
            f" leader {figure('leader', d.get('leader') or 'none')}</p>"
        )
        rows = []
        for r in status.get("roles", []):
            state = r.get("state", "?")
            beat = r.get("heartbeat_age_s")
            rows.append(
                [
                    esc(r.get("name")),
                    f'<span class="{"ok" if state == "RUNNING" else "bad"}" '
                    f'data-role-state="{esc(r.get("name"))}">{esc(state)}</span>',
                    esc(r.get("pid") or "-"),
                    duration_text(r.get("uptime_s")),
                    esc(r.get("restarts", 0)),
                    _num(r.get("rss_mb")),
                    "-" if beat is None else f"{beat:.1f}s",
                    esc(r.get("last_exit") or "-"),
                ]
            )
        parts.append("<h2>Roles</h2>")
        parts.append(
            table(
                ["role", "state", "pid", "up", "restarts", "RSS MB", "heartbeat"]
                + ["last exit"],
                rows,
                empty="no roles",
                numeric=(2, 3, 4, 5, 6),
            )
        )
    parts.append("<h2>Queues</h2>")
    if queues:
        parts.append(
            table(
                ["queue", "waiting"],
                [[esc(k), figure(f"queue-{k}", v)] for k, v in queues.items()],
                empty="",
                numeric=(1,),
            )
        )
    else:
        parts.append('<p class="bad">queue depths unavailable</p>')
    parts.append(f"<h2>Active alerts ({figure('alerts-active', len(active))})</h2>")
    parts.append(
        table(
            ["severity", "key", "since", "message"],
            [
                [
                    f'<span class="bad">{esc(a["severity"].upper())}</span>',
                    esc(a["key"]),
                    when(a["raised_at"]),
                    esc(a["message"]),
                ]
                for a in active
            ],
            empty="none",
        )
    )
    parts.append("<h2>Resolved lately</h2>")
    parts.append(
        table(
            ["key", "raised", "resolved", "message"],
            [
                [
                    esc(a["key"]),
                    when(a["raised_at"]),
                    when(a["resolved_at"]),
                    esc(a["message"]),
                ]
                for a in resolved
            ],
            empty="none",
        )
    )
    return layout("Overview", "".join(parts), nav="overview", csrf=csrf)


# ----------------------------------------------------------------- campaigns


def progress_bar(done: int, total: int) -> str:
    share = done / total if total else 0.0
    return (
        f'<span class="bar" title="{done} of {total}">'
        f'<span style="width:{share * 100:.1f}%"></span></span> {share:.0%}'
    )


def campaigns_page(rows: list[dict], hidden: int, csrf: str) -> str:
    cells = [
        [
            esc(c["id"]),
            f'<a href="/ui/campaigns/{esc(c["id"])}">{esc(c["name"])}</a>',
            esc(c["status"])
            + (
                f' <span class="muted">({esc(c["status_reason"])})</span>'
                if c.get("status_reason")
                else ""
            ),
            figure(f"contacts-{c['id']}", c["contacts"]),
            progress_bar(c["out"], c["contacts"]),
            figure(f"settled-{c['id']}", c["settled"]),
            when(c["started_at"]),
            when(c["finished_at"]),
        ]
        for c in rows
    ]
    more = (
        f'<p class="muted">{hidden} older campaigns not shown '
        "(campaignd campaign list shows all)</p>"
        if hidden
        else ""
    )
    body = (
        "<h1>Campaigns</h1>"
        + table(
            ["id", "name", "status", "contacts", "past Message 1", "settled"]
            + ["started", "finished"],
            cells,
            empty="no campaigns yet",
            numeric=(0, 3, 5),
        )
        + more
    )
    return layout("Campaigns", body, nav="campaigns", csrf=csrf)


def campaign_page(
    summary: dict,
    funnel: Funnel,
    series: SendSeries,
    failures: list[dict],
    eta: str,
    csrf: str,
) -> str:
    status = esc(summary["status"])
    if summary.get("status_reason"):
        status += f' <span class="muted">({esc(summary["status_reason"])})</span>'
    times = ", ".join(
        f"{key.removesuffix('_at')} {when(summary[key])}"
        for key in ("created_at", "started_at", "finished_at")
        if summary.get(key)
    )
    unsure = summary["unconfirmed"]
    parts = [
        f"<h1>Campaign {esc(summary['id'])}: {esc(summary['name'])}</h1>",
        f'<p>status <strong data-figure="status">{status}</strong>; {times} UTC</p>',
        f'<p data-figure="eta">{esc(eta)}</p>',
        "<h2>Funnel</h2>",
        '<div class="row">',
        funnel_svg(funnel),
        funnel_table(funnel),
        "</div>",
    ]
    if unsure["resent"] or unsure["failed"]:
        parts.append(
            f'<p class="note">{unsure["resent"]} sends re-sent without a '
            f"confirmation (each may be a second message on a phone), "
            f"{unsure['failed']} failed for want of one (provider.unconfirmed)</p>"
        )
    peak = max(
        (a + b for a, b in zip(series.message1, series.message2, strict=True)),
        default=0,
    )
    parts += [
        "<h2>Sends per minute</h2>",
        sends_svg(series),
        f'<p class="muted">{figure("sends-total", series.total)} sends accepted by '
        f"the provider (Message 1 and 2), in buckets of {series.bucket_s} s "
        f"from {series.start:%Y-%m-%d %H:%M} UTC; "
        f"peak {series.per_minute(peak):.1f} per minute</p>",
        "<h2>Last failures</h2>",
        table(
            ["message", "kind", "phone", "failed at", "attempts", "reason"],
            [
                [
                    esc(m["id"]),
                    f"Message {esc(m['kind'])}",
                    esc(m["phone"]),
                    when(m["failed_at"]),
                    esc(m["attempts"]),
                    f'<span data-failure-reason="{esc(m["id"])}">'
                    f"{esc(m['error'] or '-')}</span>",
                ]
                for m in failures
            ],
            empty="no failed message",
            numeric=(0, 4),
        ),
        f"<h2>Messages</h2><p>Message 1: {esc(summary['message1'])}</p>"
        f"<p>Message 2: {esc(summary['message2'])}</p>",
    ]
    title = f"Campaign {summary['id']}"
    return layout(title, "".join(parts), nav="campaigns", csrf=csrf)


def funnel_table(funnel: Funnel) -> str:
    rows = [[esc(label), figure(key, n)] for key, label, n in funnel.stages]
    rows += [
        [f'<span class="muted">{esc(label)}</span>', figure(key, n)]
        for key, label, n in funnel.beside
    ]
    return table(["stage", "contacts"], rows, empty="", numeric=(1,))


FUNNEL_COLORS = ("#1d2433", "#3b6fd6", "#4f86e8", "#6fa0f0", "#1a7f37", "#2da44e")


def funnel_svg(funnel: Funnel) -> str:
    """Horizontal bars, each as long as its share of the targeted contacts."""
    width, bar_h, gap, label_w, bar_w = 600, 22, 6, 170, 330
    total = max(funnel.stages[0][2], 1)
    rows = [
        (label, n, FUNNEL_COLORS[i]) for i, (_, label, n) in enumerate(funnel.stages)
    ]
    rows += [(label, n, "#c0262d") for _, label, n in funnel.beside]
    height = len(rows) * (bar_h + gap) + gap + 12
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="campaign funnel">'
    ]
    y = gap
    for i, (label, n, color) in enumerate(rows):
        if i == len(funnel.stages):
            y += 12  # the "beside" rows, set apart
        w = max(bar_w * n / total, 1 if n else 0)
        out.append(
            f'<text x="{label_w - 6}" y="{y + bar_h * 0.7:.0f}" '
            f'text-anchor="end">{esc(label)}</text>'
            f'<rect x="{label_w}" y="{y}" width="{w:.1f}" height="{bar_h}" '
            f'fill="{color}"/>'
            f'<text x="{label_w + w + 6:.1f}" y="{y + bar_h * 0.7:.0f}">'
            f"{n} ({n / total:.0%})</text>"
        )
        y += bar_h + gap
    out.append("</svg>")
    return "".join(out)


def sends_svg(series: SendSeries) -> str:
    """Stacked bars per bucket: Message 1 (blue) under Message 2 (green)."""
    width, height, left, bottom, top = 760, 200, 44, 22, 10
    n = len(series.message1)
    peak = max(
        (
            series.per_minute(a + b)
            for a, b in zip(series.message1, series.message2, strict=True)
        ),
        default=0,
    )
    scale = (height - bottom - top) / peak if peak else 0.0
    step = (width - left - 4) / max(n, 1)
    base = height - bottom
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="sends per minute" '
        f'data-buckets="{n}">',
        f'<line x1="{left}" y1="{base}" x2="{width - 2}" y2="{base}" stroke="#999"/>',
        f'<text x="{left - 4}" y="{top + 10}" text-anchor="end">{peak:.0f}</text>',
        f'<text x="{left - 4}" y="{base}" text-anchor="end">0</text>',
    ]
    for i, (m1, m2) in enumerate(zip(series.message1, series.message2, strict=True)):
        x = left + i * step + 1
        h1 = series.per_minute(m1) * scale
        h2 = series.per_minute(m2) * scale
        w = max(step - 2, 1)
        title = f"<title>{m1} Message 1, {m2} Message 2</title>"
        if m1:
            out.append(
                f'<rect x="{x:.1f}" y="{base - h1:.1f}" width="{w:.1f}" '
                f'height="{h1:.1f}" fill="#3b6fd6">{title}</rect>'
            )
        if m2:
            out.append(
                f'<rect x="{x:.1f}" y="{base - h1 - h2:.1f}" width="{w:.1f}" '
                f'height="{h2:.1f}" fill="#2da44e">{title}</rect>'
            )
    end = series.start + dt.timedelta(seconds=series.bucket_s * n)
    clock = "%H:%M:%S" if series.bucket_s < 60 else "%H:%M"
    out.append(
        f'<text x="{left}" y="{height - 6}">{series.start.strftime(clock)}</text>'
        f'<text x="{width - 2}" y="{height - 6}" text-anchor="end">'
        f"{end.strftime(clock)} UTC"
        "</text>"
        f'<text x="{width / 2:.0f}" y="{height - 6}" text-anchor="middle" '
        'fill="#3b6fd6">■ Message 1 <tspan fill="#2da44e">■ Message 2</tspan></text>'
        "</svg>"
    )
    return "".join(out)


# -------------------------------------------------------------------- events


def events_page(
    counts: list[dict],
    dead: list[dict],
    dead_total: int,
    csrf: str,
    notice: str = "",
    error: str = "",
) -> str:
    parts = ["<h1>Webhook events</h1>"]
    if notice:
        parts.append(f'<p class="note" id="notice">{esc(notice)}</p>')
    if error:
        parts.append(f'<p class="error" id="notice">{esc(error)}</p>')
    parts.append("<h2>By type</h2>")
    parts.append(
        table(
            ["provider", "type", "total", "processed", "pending", "dead"],
            [
                [
                    esc(c["provider"]),
                    esc(c["event_type"]),
                    figure(f"events-{c['provider']}-{c['event_type']}", c["total"]),
                    esc(c["processed"]),
                    esc(c["pending"]),
                    esc(c["dead"]),
                ]
                for c in counts
            ],
            empty="no webhook events yet",
            numeric=(2, 3, 4, 5),
        )
    )
    parts.append(f"<h2>Dead letters ({figure('dead-letters', dead_total)})</h2>")
    parts.append(
        '<p class="muted">Events whose processing failed web.event_max_attempts '
        "times. Replay one after the fix (same as <code>campaignd events replay "
        "ID</code>).</p>"
    )
    rows = [
        [
            esc(e["id"]),
            esc(e["provider"]),
            esc(e["event_type"]),
            when(e["received_at"]),
            esc(e["attempts"]),
            esc(e["last_error"] or "-"),
            f'<form method="post" action="/ui/events/{esc(e["id"])}/replay">'
            f'<input type="hidden" name="csrf" value="{esc(csrf)}">'
            f'<button id="replay-{esc(e["id"])}">Replay</button></form>',
        ]
        for e in dead
    ]
    parts.append(
        table(
            ["id", "provider", "type", "received", "attempts", "last error", ""],
            rows,
            empty="no dead letters",
            numeric=(0, 4),
        )
    )
    return layout("Events", "".join(parts), nav="events", csrf=csrf)
