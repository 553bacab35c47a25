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
    add("--host", default=d.host)
    add("--port", type=int, default=8099, help="0 picks a free port")
    add("--token", default=d.token, help="required Token header (default: none)")
    add("--latency-ms", type=float, default=d.latency_ms)
    add("--latency-jitter-ms", type=float, default=d.latency_jitter_ms)
    add("--slow-share", type=float, default=d.slow_share, help="share of slow sends")
    add("--slow-latency-ms", type=float, default=d.slow_latency_ms)
    add("--fail-rate", type=float, default=d.fail_rate, help="share answered 500")
    add("--fail-after-accept-rate", type=float, default=d.fail_after_accept_rate)
    add("--rate-limit-rate", type=float, default=d.rate_limit_rate)
    add("--retry-after-s", type=int, default=d.retry_after_s)
    add("--down", action="store_true", help="answer 503 to every API call")
    add(
        "--dedupe",
        action="store_true",
        default=d.dedupe,
        help="a repeated reference returns the original (default: a new message)",
    )
    add("--no-dedupe", dest="dedupe", action="store_false", help="the default")
    add("--invalid-number", action="append", default=[], metavar="PHONE")
    add("--invalid-suffix", default=d.invalid_suffix)
    add("--webhook-url", default=d.webhook_url)
    add("--webhook-secret", default=d.webhook_secret)
    add("--webhook-threads", type=int, default=d.webhook_threads)
    add(
        "--ack-delays-ms",
        default=",".join(f"{v:g}" for v in d.ack_delays_ms),
        help="sent,delivered,read delays; empty for no acks",
    )
    add("--status-delay-ms", type=float, default=d.status_delay_ms)
    add("--status-loss-share", type=float, default=d.status_loss_share)
    add("--reply-before-status", action="store_true")
    add("--reply-share", type=float, default=d.reply_share)
    add("--reply-delay-ms", type=float, default=d.reply_delay_ms)
    add("--reply-text", default=d.reply_text)
    add("--opt-out-share", type=float, default=d.opt_out_share)
    add("--log-path", default=d.log_path)
    add("--seed", type=int, default=d.seed)


def options_from_args(args: argparse.Namespace) -> FakeOptions:
    """FakeOptions from parsed add_arguments flags (ValueError if invalid)."""
    delays = tuple(float(v) for v in args.ack_delays_ms.split(",") if v.strip())
    return checked_options(
        FakeOptions(
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
