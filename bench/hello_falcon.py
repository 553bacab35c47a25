"""The W2 ceiling: a hello-world Falcon app on campaignd's own waitress settings.

POST /webhooks/wassenger reads the body and answers a constant JSON object:
no parsing, no database, no queue. Served by daemon.roles.web.app.WebServer, so
threads, poll loop, limits and timeouts are exactly campaignd web's.

    python -m bench.hello_falcon --port 8080
"""

from __future__ import annotations

import argparse
import signal
import sys

import falcon

from daemon.config import from_dict
from daemon.roles.web.app import WebServer


class Hello:
    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        req.bounded_stream.read()
        resp.media = {"stored": 1, "duplicates": 0}

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = {"ok": True}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    cfg = from_dict({"web": {"port": args.port}})
    app = falcon.App()
    app.add_route("/webhooks/wassenger", Hello())
    app.add_route("/healthz", Hello())
    server = WebServer(app, cfg)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"hello listening on {server.url}", flush=True)
    server.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
