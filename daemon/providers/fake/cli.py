"""`campaignd fake-provider` and `python -m daemon.providers.fake`: flags to
options, and the server in the foreground."""

from __future__ import annotations

import argparse
import sys

from daemon.providers.fake.options import FakeOptions
from daemon.providers.fake.options import checked_options
from daemon.providers.fake.server import FakeProvider


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The fake-provider CLI flags (defaults as in FakeOptions, port 8099)."""
    d = FakeOptions()
    add = parser.add_argument
    add(
        "--dialect",
        choices=("wassenger", "meta"),
        default=d.dialect,
        help="speak Wassenger's API or Meta's WhatsApp Cloud API",
    )
    add("--host", default=d.host, help="address to listen on")
    add("--port", type=int, default=8099, help="0 picks a free port")
    add(
        "--token",
        default=d.token,
        help="required Token header (meta: Bearer token; default: any)",
    )
    add("--latency-ms", type=float, default=d.latency_ms, help="answer delay")
    add(
        "--latency-jitter-ms",
        type=float,
        default=d.latency_jitter_ms,
        help="random extra delay, up to this",
    )
    add("--slow-share", type=float, default=d.slow_share, help="share of slow sends")
    add(
        "--slow-latency-ms",
        type=float,
        default=d.slow_latency_ms,
        help="delay of a slow send (still sent)",
    )
    add("--fail-rate", type=float, default=d.fail_rate, help="share answered 500")
    add(
        "--fail-after-accept-rate",
        type=float,
        default=d.fail_after_accept_rate,
        help="share accepted, then answered 500",
    )
    add(
        "--rate-limit-rate",
        type=float,
        default=d.rate_limit_rate,
        help="share answered 429",
    )
    add("--retry-after-s", type=int, default=d.retry_after_s, help="429 Retry-After")
    add("--down", action="store_true", help="answer 503 to every API call")
    add(
        "--dedupe",
        action="store_true",
        default=d.dedupe,
        help="a repeated reference returns the original (default: a new message)",
    )
    add("--no-dedupe", dest="dedupe", action="store_false", help="the default")
    add(
        "--invalid-number",
        action="append",
        default=[],
        metavar="PHONE",
        help="a number not on WhatsApp (repeatable)",
    )
    add(
        "--invalid-suffix",
        default=d.invalid_suffix,
        help="numbers ending so are not on WhatsApp",
    )
    add(
        "--phone-number-id",
        default=d.phone_number_id,
        help="meta: the business phone number id of the Graph API path",
    )
    add(
        "--template",
        action="append",
        default=[],
        metavar="NAME[:PARAMS]",
        help="meta: an approved template, with its number of body parameters"
        " (repeatable; default: any template)",
    )
    add(
        "--status-failure-share",
        type=float,
        default=d.status_failure_share,
        help="meta: share of sends whose status is failed",
    )
    add(
        "--status-failure-code",
        type=int,
        default=d.status_failure_code,
        help="meta: the error code of those failed statuses",
    )
    add("--webhook-url", default=d.webhook_url, help="where statuses and replies go")
    add(
        "--webhook-secret",
        default=d.webhook_secret,
        help="sent as X-Webhook-Secret (meta: the app secret of X-Hub-Signature-256)",
    )
    add(
        "--webhook-threads",
        type=int,
        default=d.webhook_threads,
        help="webhook posting threads",
    )
    add(
        "--ack-delays-ms",
        default=",".join(f"{v:g}" for v in d.ack_delays_ms),
        help="sent,delivered,read delays; empty for no acks",
    )
    add(
        "--status-delay-ms",
        type=float,
        default=d.status_delay_ms,
        help="extra delay of every status webhook",
    )
    add(
        "--status-loss-share",
        type=float,
        default=d.status_loss_share,
        help="share of messages whose statuses never come",
    )
    add(
        "--reply-before-status",
        action="store_true",
        help="replies arrive before any status of the message",
    )
    add(
        "--reply-share",
        type=float,
        default=d.reply_share,
        help="share of contacts who reply to Message 1",
    )
    add(
        "--reply-delay-ms",
        type=float,
        default=d.reply_delay_ms,
        help="reply this long after Message 1",
    )
    add("--reply-text", default=d.reply_text, help="what they reply")
    add(
        "--opt-out-share",
        type=float,
        default=d.opt_out_share,
        help="share of replies that are STOP",
    )
    add("--log-path", default=d.log_path, help="JSON lines of every request")
    add("--seed", type=int, default=d.seed, help="random seed (same run, same replies)")


def options_from_args(args: argparse.Namespace) -> FakeOptions:
    """FakeOptions from parsed add_arguments flags (ValueError if invalid)."""
    delays = tuple(float(v) for v in args.ack_delays_ms.split(",") if v.strip())
    return checked_options(
        FakeOptions(
            dialect=args.dialect,
            host=args.host,
            port=args.port,
            token=args.token,
            latency_ms=args.latency_ms,
            latency_jitter_ms=args.latency_jitter_ms,
            slow_share=args.slow_share,
            slow_latency_ms=args.slow_latency_ms,
            fail_rate=args.fail_rate,
            fail_after_accept_rate=args.fail_after_accept_rate,
            rate_limit_rate=args.rate_limit_rate,
            retry_after_s=args.retry_after_s,
            down=args.down,
            dedupe=args.dedupe,
            invalid_numbers=frozenset(args.invalid_number),
            invalid_suffix=args.invalid_suffix,
            phone_number_id=args.phone_number_id,
            templates=tuple(args.template),
            status_failure_share=args.status_failure_share,
            status_failure_code=args.status_failure_code,
            webhook_url=args.webhook_url,
            webhook_secret=args.webhook_secret,
            webhook_threads=args.webhook_threads,
            ack_delays_ms=delays,
            status_delay_ms=args.status_delay_ms,
            status_loss_share=args.status_loss_share,
            reply_before_status=args.reply_before_status,
            reply_share=args.reply_share,
            reply_delay_ms=args.reply_delay_ms,
            reply_text=args.reply_text,
            opt_out_share=args.opt_out_share,
            log_path=args.log_path,
            seed=args.seed,
        )
    )


def main(args: argparse.Namespace) -> int:
    """Run the fake provider in the foreground; 0 on SIGTERM/SIGINT."""
    try:
        options = options_from_args(args)
    except ValueError as exc:
        print(f"fake-provider: {exc}", file=sys.stderr)
        return 2
    try:
        FakeProvider(options).serve_forever()
    except OSError as exc:
        print(f"fake-provider: cannot listen: {exc}", file=sys.stderr)
        return 1
    return 0
