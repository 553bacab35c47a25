"""A fake provider, Wassenger's or Meta's (``dialect``): a real HTTP server on
loopback.

Used by demos, tests and benchmarks, so it must never be the bottleneck: the
API is served by an asyncio.Protocol HTTP/1.1 keep-alive server (no per-request
objects beyond a dict and a bytes), all state behind one lock, and webhooks are
posted by background threads from a timer heap, away from the API path.

API of the default dialect (what campaignd's Wassenger client uses; the Meta
dialect's Graph API routes and webhooks are described in meta.py):
  POST /v1/messages               send; a repeated ``reference`` is a second
                                  message, as at Wassenger (``dedupe=True``:
                                  the original, 200)
  GET  /v1/numbers/exists?phone=  200 {"exists": true, ...} or 404
  POST /v1/numbers/exists         same, body {"phone": ...}
  GET  /v1/devices[/{id}]         session.status "online" (configurable)
Control (never affected by faults or the token):
  GET /_fake/stats, GET /_fake/messages, GET /_fake/phones[?by=text],
  GET|POST /_fake/config, POST /_fake/reset

A send is accepted as soon as its whole body is received: the answer then
waits for its latency and is written only if the client is still there, so a
client that gave up (timeout, killed) may still have sent a message, as with a
real provider. ``phone_counts`` says what each phone received, per kind.

Who replies is deterministic: see ``reply_plan``. Numbers in ``invalid_numbers``
or ending in ``invalid_suffix`` are not on WhatsApp (404 on checks, 400 on sends;
meta: a 200, then a failed status 131026).

The package, each module importing only those above it: options (FakeOptions,
RUNTIME_OPTIONS, reply_plan), webhooks (the poster), wassenger and meta (each
dialect's wire shapes; Meta's request checks and errors), core (state,
request handling, the scheduling of statuses and replies, for both
dialects), server (the HTTP protocol and FakeProvider), cli (flags and the
foreground server; ``python -m daemon.providers.fake`` runs it).
"""

from daemon.providers.fake.cli import add_arguments
from daemon.providers.fake.cli import main
from daemon.providers.fake.cli import options_from_args
from daemon.providers.fake.options import RUNTIME_OPTIONS
from daemon.providers.fake.options import FakeOptions
from daemon.providers.fake.options import checked_options
from daemon.providers.fake.options import reply_plan
from daemon.providers.fake.server import FakeProvider

__all__ = [
    "FakeOptions",
    "RUNTIME_OPTIONS",
    "checked_options",
    "reply_plan",
    "FakeProvider",
    "add_arguments",
    "main",
    "options_from_args",
]
