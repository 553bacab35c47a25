"""The `campaignd` command line: parse, load the config once, dispatch.

Errors are one line on stderr and a non-zero exit: 2 for usage and config
errors, 1 for other failures, 3 from `status` when no daemon answers, 4 from
`status` when the answer cannot be read (permission, garbage).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from daemon import __version__
from daemon import config as config_mod
from daemon import config_text
from daemon.errors import EXIT_CONFIG
from daemon.errors import EXIT_FAILURE
from daemon.errors import ConfigError
from daemon.errors import DaemonError

ROLES_HELP = "web | worker:background | worker:default | worker:messages | "
ROLES_HELP += "worker:retry | worker:verification | scheduler"
CAMPAIGN_ACTIONS = {
    "show": "a campaign's counters (members, messages by status, unconfirmed)",
    "start": "draft -> running: Message 1 goes out at the pacing",
    "pause": "running -> paused: no new sends (those on the wire finish)",
    "resume": "paused -> running",
    "cancel": "stop for good: messages not yet sent are cancelled",
    "retry-failed": "queue the failed messages again (never to opted-out contacts)",
}
# The commands that work on the database: each a function of daemon.commands.
DATABASE_COMMANDS = ("contacts", "campaign", "verify", "messages", "events", "migrate")
STRICT_HELP = "refuse the whole file if any row is bad (default: import the good rows)"

# What the zygote imports before it forks the roles: every role's module and
# the ones the roles import lazily on their first task or request.
ZYGOTE_IMPORTS = (
    "daemon.roles.worker",
    "daemon.roles.web.app",
    "daemon.roles.scheduler",
    "daemon.providers",
    "daemon.app.jobs",
    # The first connection to a host name (Redis, PostgreSQL, the provider)
    # imports the idna codec: 3-10 ms in every role, at every respawn.
    "encodings.idna",
    "daemon.store.queue_bulk",
)


DESCRIPTION = """\
campaignd runs WhatsApp outreach campaigns: Message 1 to every contact, and
Message 2 to those who reply, through Wassenger or Meta's Cloud API.

examples:
  campaignd demo                                 a whole campaign, offline, in a minute
  campaignd run -c /etc/campaignd/campaignd.toml the daemon (what systemd runs)
  campaignd status                               roles, queues, alerts
  campaignd contacts import contacts.csv         then: campaign create, campaign start
  campaignd campaign show 1                      a campaign's counters
  campaignd COMMAND --help                       each command's options
"""
EPILOG = """\
exit codes: 0 ok; 1 failure (one line on stderr; for status: degraded);
2 usage or config error; 3 status: no daemon answers; 4 status: unknown.
docs: README.md, docs/operations.md, docs/configuration.md
"""


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written, and every option's default in its help."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (
            "%(default)" in text
            or "default:" in text
            or default in (None, False, argparse.SUPPRESS)
            or default == []
            or not action.option_strings
        ):
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        if self._subparsers is not None and message.startswith(
            "the following arguments are required"
        ):
            # A bare `campaignd` or `campaignd campaign`: what can follow.
            self.print_help(sys.stderr)
            self.exit(EXIT_CONFIG)
        self.exit(EXIT_CONFIG, f"campaignd: error: {message}\n")


def _interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0.05 <= value <= 3600:
        raise argparse.ArgumentTypeError(
            f"must be seconds between 0.05 and 3600, got {text!r}"
        )
    return value


def build_parser() -> argparse.ArgumentParser:
    from daemon.store.statuses import MessageStatus

    config_help = (
        "TOML config file (default: $CAMPAIGND_CONFIG, then "
        "/etc/campaignd/campaignd.toml, then ./campaignd.toml)"
    )
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: a -c given before the subcommand is not reset to None by
    # the subcommand's own (absent) -c.
    common.add_argument("-c", "--config", default=argparse.SUPPRESS, help=config_help)
    json_flag = argparse.ArgumentParser(add_help=False)
    json_flag.add_argument("--json", action="store_true", help="print JSON")

    parser = _Parser(prog="campaignd", description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument("--version", action="version", version=__version__)
    parser.add_argument("-c", "--config", default=None, help=config_help)
    sub = parser.add_subparsers(
        dest="command", required=True, parser_class=_Parser, metavar="COMMAND"
    )

    sub.add_parser("run", parents=[common], help="run the daemon (supervisor)")
    # No help=: the supervisor's own entry point stays out of the listing.
    p = sub.add_parser("child", parents=[common])
    p.add_argument("role", nargs="?", default="", help=ROLES_HELP)
    p.add_argument("--zygote", action="store_true", help="run as the zygote")
    sub.add_parser("web", parents=[common], help="run the web role in the foreground")
    p = sub.add_parser(
        "worker", parents=[common], help="run one queue consumer in the foreground"
    )
    p.add_argument(
        "--queue",
        required=True,
        choices=("default", "messages", "retry", "verification", "background"),
        help="the queue to consume (background: default, retry and verification)",
    )
    sub.add_parser(
        "scheduler", parents=[common], help="run the scheduler in the foreground"
    )
    sub.add_parser(
        "status", parents=[common, json_flag], help="show the running daemon's state"
    )
    sub.add_parser(
        "reload",
        parents=[common],
        help="re-read the config file and replace the roles one by one (SIGHUP)",
    )
    p = sub.add_parser("restart", parents=[common], help="restart one role gracefully")
    p.add_argument("role", help=ROLES_HELP)
    sub.add_parser(
        "check-config", parents=[common], help="print the effective config or errors"
    )
    sub.add_parser(
        "migrate",
        parents=[common],
        help="apply the database schema migrations of this version now",
        description=(
            "Apply the pending schema migrations (the daemon also applies them"
            " when it starts). Other commands refuse a database whose schema"
            " is older than this version, so that a newer install never"
            " changes the schema under a daemon still running the older code."
        ),
    )
    p = sub.add_parser(
        "alert",
        parents=[common],
        help="send a one-off alert through alerts.webhook_url and alerts.command",
        description=(
            "Send one alert through the configured channels and wait for them; "
            "reads only the [alerts] table, so it works when the rest of the "
            "config is broken (systemd/campaignd-alert@.service runs it when "
            "the service fails). Exit 0: delivered; 1: a channel failed; "
            "2: no channel configured or unreadable config."
        ),
    )
    p.add_argument("message", help="the alert's text")
    p.add_argument(
        "--key", default="campaignd:manual", help="alert key (default: %(default)s)"
    )
    p.add_argument(
        "--severity",
        choices=("critical", "warning"),
        default="critical",
        help="default: %(default)s",
    )
    p.add_argument(
        "--resolved", action="store_true", help="send a recovery notice instead"
    )

    contacts = sub.add_parser("contacts", help="manage contacts").add_subparsers(
        dest="action", required=True, parser_class=_Parser, metavar="ACTION"
    )
    p = contacts.add_parser(
        "import",
        parents=[common, json_flag],
        help="import a CSV (phone, name, any other column as a variable)",
    )
    p.add_argument("file", help="CSV file: ',' or ';', UTF-8 or UTF-16 with a BOM")
    p.add_argument("--region", default="FR", help="country of numbers without +")
    p.add_argument("--strict", action="store_true", help=STRICT_HELP)
    p = contacts.add_parser("list", parents=[common, json_flag], help="list contacts")
    p.add_argument("--limit", type=int, default=50, help="at most this many")
    p = contacts.add_parser(
        "opt-out",
        parents=[common, json_flag],
        help="opt a contact out: nothing more is sent to them, ever",
    )
    p.add_argument("phone", help="the contact's number")
    p.add_argument("--region", default="FR", help="country of a number without +")

    campaign = sub.add_parser("campaign", help="manage campaigns").add_subparsers(
        dest="action", required=True, parser_class=_Parser, metavar="ACTION"
    )
    p = campaign.add_parser(
        "create",
        parents=[common, json_flag],
        help="create a draft campaign",
        description=(
            "Create a draft campaign. Templates take {name}, {phone} and any "
            "column of the contacts' CSV as {column}; a variable no column "
            "provides is refused, naming it and the columns there are."
        ),
    )
    p.add_argument("--name", required=True, help="the campaign's name")
    p.add_argument("--message1", required=True, help="first message template")
    p.add_argument("--message2", required=True, help="template sent to those who reply")
    p.add_argument("--contacts", help="CSV of the campaign's contacts")
    p.add_argument("--region", default="FR", help="country of numbers without +")
    p.add_argument("--all-contacts", action="store_true", help="target every contact")
    p.add_argument("--strict", action="store_true", help=STRICT_HELP)
    campaign.add_parser("list", parents=[common, json_flag], help="every campaign")
    for action, text in CAMPAIGN_ACTIONS.items():
        p = campaign.add_parser(action, parents=[common, json_flag], help=text)
        p.add_argument("id", type=int, help="campaign id (campaign list)")
        if action == "show":
            p.add_argument(
                "--watch",
                action="store_true",
                help="redraw the funnel and the ETA until the campaign completes",
            )
            p.add_argument(
                "--interval",
                type=_interval,
                default=2.0,
                metavar="S",
                help="seconds between two drawings with --watch",
            )

    p = sub.add_parser("messages", help="messages and their state").add_subparsers(
        dest="action", required=True, parser_class=_Parser, metavar="ACTION"
    )
    p = p.add_parser(
        "list",
        parents=[common, json_flag],
        help="list messages by id (e.g. the failed ones of a campaign)",
    )
    p.add_argument("--campaign", type=int, help="only this campaign's messages")
    p.add_argument("--status", choices=MessageStatus.ALL, help="only this status")
    p.add_argument("--kind", type=int, choices=(1, 2), help="Message 1 or Message 2")
    p.add_argument("--limit", type=int, default=50, help="at most this many")

    events = sub.add_parser(
        "events", help="stored webhook events and dead letters"
    ).add_subparsers(
        dest="action", required=True, parser_class=_Parser, metavar="ACTION"
    )
    p = events.add_parser(
        "list", parents=[common, json_flag], help="list webhook events, newest first"
    )
    p.add_argument("--dead", action="store_true", help="only the dead letters")
    p.add_argument("--limit", type=int, default=50, help="at most this many")
    p = events.add_parser(
        "replay",
        parents=[common, json_flag],
        help="process a dead-letter event again",
    )
    p.add_argument("id", type=int, help="event id (events list --dead)")

    p = sub.add_parser(
        "verify", parents=[common, json_flag], help="check numbers are on WhatsApp"
    )
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--phone", help="check one number now")
    target.add_argument("--campaign", type=int, help="queue checks for a campaign")
    target.add_argument("--all", action="store_true", help="queue unknown numbers")
    p.add_argument("--region", default="FR", help="country of a --phone without +")

    p = sub.add_parser("demo", help="run a complete local demo")
    p.add_argument("--contacts", type=int, default=200, help="campaign size")
    p.add_argument("--keep", action="store_true", help="keep the data dir")

    # Its flags are parsed by its own parser when it runs: building them here
    # would import the fake's server (asyncio and all) into every command,
    # the supervisor and `campaignd status` included.
    sub.add_parser("fake-provider", help="run the local fake provider", add_help=False)
    return parser


def _fake_provider():
    return importlib.import_module("daemon.providers.fake")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Only fake-provider takes flags the parser does not know (its own).
    args, args.extra = parser.parse_known_args(argv)
    if args.extra and args.command != "fake-provider":
        parser.error(f"unrecognized arguments: {' '.join(args.extra)}")
    try:
        return dispatch(args)
    except ConfigError as exc:
        print(f"campaignd: config error: {exc}", file=sys.stderr)
        if args.command == "run":
            # systemd does not restart exit 2: say so before going silent.
            _alert_quietly(
                args.config, "daemon:config_error", f"campaignd cannot start: {exc}"
            )
        return EXIT_CONFIG
    except DaemonError as exc:
        print(f"campaignd: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130


def _without_config(args) -> int | None:
    """The commands that load no Config (or only part of it)."""
    if args.command == "fake-provider":
        fake = _fake_provider()
        parser = _Parser(prog="campaignd fake-provider")
        fake.add_arguments(parser)
        return fake.main(parser.parse_args(args.extra))
    if args.command == "demo":
        return importlib.import_module("daemon.demo").main(args)
    if args.command == "alert":
        status = "resolved" if args.resolved else "raised"
        return send_alert(args.config, args.key, args.message, status, args.severity)
    return None


def dispatch(args) -> int:
    command = args.command
    done = _without_config(args)
    if done is not None:
        return done
    # status and restart only need paths: they must work for an operator who
    # cannot read the service's secret files.
    cfg = config_mod.load(
        getattr(args, "config", None),
        read_secrets=command not in ("status", "restart", "reload"),
    )
    if command == "check-config":
        print(config_text.to_toml(config_text.masked(cfg)), end="")
        return 0
    if command == "run":
        from daemon.runtime import skip_unused_drivers

        # Before the supervisor's imports: else peewee imports psycopg for a
        # SQLite daemon, ~6 MB and 0.1 s of start-up carried for nothing.
        skip_unused_drivers(cfg)
        from daemon.supervision import supervisor
        from daemon.supervision.zygote import RoleCode

        code = RoleCode(run_role, ZYGOTE_IMPORTS)
        return supervisor.main(cfg, hooks=supervisor_hooks(), role_code=code)
    if command == "child" and args.zygote:
        from daemon.supervision.zygote import serve

        return serve(cfg, run_role, ZYGOTE_IMPORTS)
    if command == "child":
        return run_role(cfg, args.role)
    if command == "web":
        return run_role(cfg, "web")
    if command == "worker":
        return run_role(cfg, f"worker:{args.queue}")
    if command == "scheduler":
        return run_role(cfg, "scheduler")
    if command in ("status", "restart", "reload"):
        return importlib.import_module("daemon.status").client_main(cfg, args)
    if command in DATABASE_COMMANDS:
        commands = importlib.import_module("daemon.commands")
        return getattr(commands, command)(cfg, args)
    raise AssertionError(f"unhandled command {command}")


def send_alert(
    config_path, key: str, message: str, status: str, severity: str = "critical"
) -> int:
    """One alert through the configured channels, waited for."""
    from daemon.domain import alerts

    alerts_cfg = config_mod.load_alerts(config_path)
    if not (alerts_cfg.webhook_url or alerts_cfg.command):
        raise ConfigError(
            "alerts: no channel configured (alerts.webhook_url, alerts.command)"
        )
    event = alerts.AlertEvent.now(key, status, message, severity)
    failed = [c for c, ok in alerts.notify_now(alerts_cfg, event).items() if not ok]
    if failed:
        print(
            f"campaignd: error: alert not delivered: {', '.join(failed)} failed",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    return 0


def _alert_quietly(config_path, key: str, message: str) -> None:
    try:
        send_alert(config_path, key, message, "raised")
    except ConfigError as exc:
        print(f"campaignd: no alert sent: {exc}", file=sys.stderr)


def supervisor_hooks():
    """What the supervisor does to the application's rows, wired here so the
    supervisor imports no application code (like gunicorn's server hooks)."""
    from daemon.app import recovery
    from daemon.supervision.hooks import SupervisorHooks

    # What the start finds of a previous run is enqueued once the releaser
    # has built its queues.
    left = recovery.LeftBehind()

    def on_start(cfg) -> None:
        left.add(recovery.release_at_start(cfg))

    return SupervisorHooks(
        on_start=on_start,
        lease_releaser=lambda cfg, directory: recovery.LeaseReleaser(
            cfg, directory, left
        ),
    )


def run_role(cfg, role: str) -> int:
    """Run one role in this process: the body of every child."""
    # Several instances of one role are named "worker:messages#2".
    name, _, queue = role.split("#")[0].partition(":")
    from daemon.runtime import skip_unused_drivers

    skip_unused_drivers(cfg)
    if name == "web":
        return importlib.import_module("daemon.roles.web.app").main(cfg)
    if name == "worker" and queue in ("default", "messages", "retry", "verification"):
        return importlib.import_module("daemon.roles.worker").main(cfg, (queue,))
    if name == "worker" and queue == "background":
        worker = importlib.import_module("daemon.roles.worker")
        return worker.main(cfg, worker.BACKGROUND_QUEUES)
    if name == "scheduler":
        return importlib.import_module("daemon.roles.scheduler").main(cfg)
    raise ConfigError(f"unknown role {role!r} (roles: {ROLES_HELP})")
