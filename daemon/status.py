"""`campaignd status` and `campaignd restart`: ask the supervisor over its
status socket (daemon/supervision/status.py serves it) and print the answer.
"""

from __future__ import annotations

import json
import sys

from daemon.errors import EXIT_FAILURE
from daemon.errors import EXIT_NOT_RUNNING
from daemon.errors import EXIT_OK
from daemon.errors import EXIT_UNKNOWN
from daemon.status_client import request
from daemon.store.models import duration_text


def client_main(cfg, args) -> int:
    """`campaignd status [--json]`, `campaignd restart ROLE`, `campaignd reload`."""
    path = cfg.status_socket
    if args.command == "restart":
        payload = {"cmd": "restart", "role": args.role}
    elif args.command == "reload":
        payload = {"cmd": "reload"}
    else:
        payload = {"cmd": "status"}
    try:
        answer = request(path, payload)
    except (FileNotFoundError, ConnectionRefusedError):
        print(f"campaignd: not running (nothing answers on {path})", file=sys.stderr)
        return EXIT_NOT_RUNNING
    except PermissionError:
        print(
            f"campaignd: permission denied on {path} (are you in status.group?)",
            file=sys.stderr,
        )
        return EXIT_UNKNOWN
    except (OSError, ValueError) as exc:
        print(f"campaignd: no valid answer on {path}: {exc}", file=sys.stderr)
        return EXIT_UNKNOWN
    if not isinstance(answer, dict) or not (
        "error" in answer
        or "daemon" in answer
        or "restarting" in answer
        or "reloading" in answer
    ):
        print(f"campaignd: no valid answer on {path}: {answer!r:.80}", file=sys.stderr)
        return EXIT_UNKNOWN
    if "error" in answer:
        print(f"campaignd: error: {answer['error']}", file=sys.stderr)
        return EXIT_FAILURE
    if args.command == "restart":
        print("restarting: " + ", ".join(answer.get("restarting", [])))
        return EXIT_OK
    if args.command == "reload":
        # The supervisor re-reads its file; an invalid one is logged and the
        # running config kept (journalctl -u campaignd says which).
        print("reloading: roles are replaced one by one")
        return EXIT_OK
    if getattr(args, "json", False):
        print(json.dumps(answer, indent=2, sort_keys=True))
    else:
        print(format_status(answer))
    return EXIT_OK if is_healthy(answer) else EXIT_FAILURE


def is_healthy(answer: dict) -> bool:
    """Running, every role RUNNING, database and queue reachable, no alert."""
    daemon = answer.get("daemon", {})
    roles = answer.get("roles", [])
    return (
        daemon.get("state") == "running"
        and bool(roles)
        and all(r.get("state") == "RUNNING" for r in roles)
        and not answer.get("alerts")
        and not answer.get("db_error")
        and answer.get("queues_error") in (None, "still gathering")
    )


def format_status(answer: dict) -> str:
    """The status answer as a readable table."""
    d = answer.get("daemon", {})
    lines = [
        f"campaignd {d.get('version', '?')} on {d.get('host', '?')}: "
        f"{d.get('state', '?')}, pid {d.get('pid')}, "
        f"up {duration_text(d.get('uptime_s'))}"
        + (f", leader {d['leader']}" if d.get("leader") else ""),
        "",
        f"{'ROLE':<22}{'STATE':<10}{'PID':>8}{'UP':>9}{'RESTARTS':>10}"
        f"{'RSS MB':>8}{'CPU%':>7}{'BEAT':>7}  LAST EXIT",
    ]
    for r in answer.get("roles", []):
        beat = r.get("heartbeat_age_s")
        lines.append(
            f"{r['name']:<22}{r['state']:<10}{_s(r.get('pid')):>8}"
            f"{duration_text(r.get('uptime_s')):>9}{r.get('restarts', 0):>10}"
            f"{_num(r.get('rss_mb'), 0):>8}{_num(r.get('cpu_percent'), 1):>7}"
            f"{(_num(beat, 1) + 's') if beat is not None else '-':>7}"
            f"  {r.get('last_exit') or '-'}"
        )
    zygote = answer.get("zygote")
    if zygote:
        lines.append(
            f"zygote {zygote.get('state', '?')}, pid {zygote.get('pid') or '-'}"
            f" ({zygote.get('started') or 'not started'}), "
            f"roles forked {zygote.get('roles_forked', 0)}"
        )
    lines.append("")
    queues = answer.get("queues")
    if isinstance(queues, dict) and queues:
        lines.append("queues: " + ", ".join(f"{k} {v}" for k, v in queues.items()))
    else:
        lines.append(f"queues: UNREACHABLE ({answer.get('queues_error') or 'unknown'})")
    if answer.get("db_error"):
        lines.append(f"database: UNREACHABLE ({answer['db_error']})")
    campaigns = answer.get("campaigns")
    if campaigns:
        lines.append(
            "campaigns: " + ", ".join(f"{k} {v}" for k, v in campaigns.items())
        )
    messages = answer.get("messages") or {}
    if messages.get("unconfirmed"):
        lines.append(
            f"unconfirmed sends: {messages['unconfirmed']} (waiting for a status "
            "webhook or a reply; provider.unconfirmed applies after "
            "provider.confirm_window_s)"
        )
    dead = answer.get("dead_letters")
    if dead is not None:
        hint = " (campaignd events list --dead)" if dead else ""
        lines.append(f"webhook dead letters: {dead}{hint}")
    check = answer.get("last_health_check")
    if check:
        verdict = "ok" if check.get("ok") else "FAILING"
        lines.append(f"last health check: {check.get('checked_at')} {verdict}")
    if answer.get("data_age_s") is not None:
        lines.append(f"(queue and campaign figures {answer['data_age_s']:.1f}s old)")
    alerts = answer.get("alerts") or []
    lines.append(f"alerts: {len(alerts) or 'none'}")
    for a in alerts:
        lines.append(f"  {a.get('severity', '?').upper()} {a['key']}: {a['message']}")
    return "\n".join(lines)


def _num(value, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _s(value) -> str:
    return "-" if value is None else str(value)
