"""The webhook's own Python: campaignd's WSGI app called in-process, no server.

Calls the real app (create_app, every middleware) and the hello-world ceiling's
app directly with a prepared WSGI environ, N unique 1.5 KB Wassenger bodies
each, alternating, and prints microseconds a request. The event writer is
taken out (nothing is stored), so this is the application's share of W2
alone: parsing, checks, dedupe key, metrics, the answer. --profile prints
cProfile's top functions for campaignd's app.

    .venv/bin/python bench/webhook_app_time.py [--requests 20000] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import falcon  # noqa: E402

from bench.hello_falcon import Hello  # noqa: E402
from bench.webhook_load import PATH  # noqa: E402
from bench.webhook_load import SECRET  # noqa: E402
from bench.webhook_load import sample_body  # noqa: E402
from daemon import config as config_mod  # noqa: E402
from daemon.roles.web import event_writer  # noqa: E402
from daemon.roles.web.app import create_app  # noqa: E402
from daemon.store.db import open_database  # noqa: E402


class NoQueue:
    queues = None

    def __init__(self, cfg):
        self.cfg = cfg


def environ(body: bytes) -> dict:
    return {
        "REQUEST_METHOD": "POST",
        "PATH_INFO": PATH,
        "QUERY_STRING": "",
        "SERVER_NAME": "bench",
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(body),
        "wsgi.errors": sys.stderr,
        "CONTENT_LENGTH": str(len(body)),
        "CONTENT_TYPE": "application/json",
        "HTTP_X_WEBHOOK_SECRET": SECRET,
    }


def start_response(status, headers, exc_info=None):
    if not status.startswith("200"):
        raise SystemExit(f"the app answered {status}")


def per_request_us(app, environs: list[dict]) -> float:
    for env in environs:
        env["wsgi.input"].seek(0)
    started = time.perf_counter()
    for env in environs:
        b"".join(app(env, start_response))
    return (time.perf_counter() - started) / len(environs) * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()

    event_writer.EventWriter.store = lambda self, rows: []  # nothing stored
    data_dir = tempfile.mkdtemp(prefix="campaignd-apptime-")
    cfg = config_mod.from_dict(
        {"daemon": {"data_dir": data_dir}, "web": {"webhook_secret": SECRET}}
    )
    open_database(cfg, migrate_schema=True)
    campaignd = create_app(cfg, NoQueue(cfg))
    hello = falcon.App()
    hello.add_route(PATH, Hello())
    environs = [environ(sample_body(f"T{i}").encode()) for i in range(args.requests)]

    for round_no in range(1, args.rounds + 1):
        h = per_request_us(hello, environs)
        c = per_request_us(campaignd, environs)
        print(f"round {round_no}: hello {h:.1f} us/req, campaignd {c:.1f} us/req")
    if args.profile:
        profile = cProfile.Profile()
        profile.runcall(per_request_us, campaignd, environs)
        pstats.Stats(profile).sort_stats("tottime").print_stats(20)
    return 0


if __name__ == "__main__":
    sys.exit(main())
