"""The web role: build the Falcon app, serve it with waitress, beat, drain on SIGTERM.

Errors are JSON everywhere (`{"title", "description"}`): a client's mistake is
a 4xx that says what is wrong, a database that cannot store is a 503 with
Retry-After (the provider retries), and only our own bugs are a 500.
"""

from __future__ import annotations

import http.client
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable

import falcon
import peewee as pw
from playhouse.pool import MaxConnectionsExceeded

from daemon import metrics
from daemon import runtime
from daemon.config import Config
from daemon.config_senders import WEBHOOK_SENDER_KEYS
from daemon.config_senders import webhook_route_served
from daemon.errors import EXIT_FAILURE
from daemon.errors import EXIT_OK
from daemon.errors import InputError
from daemon.errors import NotFoundError
from daemon.errors import StateError
from daemon.roles.web import api
from daemon.roles.web import console
from daemon.roles.web import event_writer
from daemon.roles.web import health
from daemon.roles.web import webhooks
from daemon.roles.web.auth_limit import FailedAuth
from daemon.roles.web.openapi import MAX_ID
from daemon.roles.web.openapi import build_spec
from daemon.roles.web.server import WebServer
from daemon.roles.web.server import wait_for_port
from daemon.store.db import is_postgres
from daemon.store.models import database
from daemon.store.models import utcnow
from daemon.store.queue import Queues

log = logging.getLogger(__name__)

RETRY_AFTER_S = "5"
# How long a supervised web role waits for its port to be free.
PORT_WAIT_S = 2.0


# --- middleware ---------------------------------------------------------------------


class BodyLimit:
    """413 (JSON) for a body above web.max_body_bytes, before anything reads it."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        length = req.content_length
        if length is not None and length > self.max_bytes:
            raise falcon.HTTPContentTooLarge(
                title="Body too large",
                description=f"the body is {length} bytes; the limit is "
                f"{self.max_bytes} (web.max_body_bytes)",
            )


class DatabaseSession:
    """A peewee connection per request, for resources that use the database.

    On PostgreSQL the connection goes back to the pool after each request, so
    idle waitress threads hold none. On SQLite each waitress thread keeps its
    own connection open: opening one costs a millisecond, and closing the last
    one checkpoints and deletes the WAL, which the next commit recreates with
    fsyncs (measured: 12 ms a request instead of under 1).
    """

    def process_resource(self, req, resp, resource, params) -> None:
        if getattr(resource, "uses_database", False):
            database.connect(reuse_if_open=True)

    def process_response(self, req, resp, resource, req_succeeded) -> None:
        if getattr(resource, "uses_database", None) is False:
            return  # it says it opens none (the webhooks: their writer does)
        if database.obj is None or database.is_closed():
            return
        try:
            if database.in_transaction():
                database.rollback()  # a handler escaped with a transaction open
            if is_postgres():
                database.close()
        except Exception:  # noqa: BLE001 - a broken connection must not break the answer
            log.warning("could not release the database connection", exc_info=True)
            _discard_connection()


def _discard_connection() -> None:
    try:
        database.close()
    except Exception:  # noqa: BLE001 - already broken; the next request reconnects
        pass


class RequestTimer:
    """Fills campaignd_http_request_seconds by route template and status class."""

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        req.context.started = time.perf_counter()

    def process_response(self, req, resp, resource, req_succeeded) -> None:
        started = getattr(req.context, "started", None)
        if started is None:
            return
        route = req.uri_template or "unmatched"
        status = f"{str(resp.status)[:1]}xx" if resp.status else "2xx"
        metrics.labelled(metrics.HTTP_SECONDS, route, status).observe(
            time.perf_counter() - started
        )


# --- error handlers -----------------------------------------------------------------


def _json_error_serializer(req, resp, exc: falcon.HTTPError) -> None:
    # Always JSON, whatever the Accept header says (falcon would pick XML).
    resp.content_type = falcon.MEDIA_JSON
    resp.media = exc.to_dict()


def _handle_input(req, resp, exc, params):
    raise falcon.HTTPBadRequest(title="Invalid input", description=str(exc))


def _handle_not_found(req, resp, exc, params):
    raise falcon.HTTPNotFound(title="Not found", description=str(exc))


def _handle_state(req, resp, exc, params):
    raise falcon.HTTPConflict(title="Conflict", description=str(exc))


def _handle_integrity(req, resp, exc, params):
    raise falcon.HTTPConflict(
        title="Conflict", description=f"conflicts with stored data: {exc}"[:300]
    )


def _handle_data(req, resp, exc, params):
    raise falcon.HTTPBadRequest(
        title="Invalid value", description=f"the database refused a value: {exc}"[:300]
    )


def _handle_unavailable(req, resp, exc, params):
    log.error("database unavailable on %s %s: %s", req.method, req.path, exc)
    raise falcon.HTTPServiceUnavailable(
        title="Database unavailable",
        description="the database cannot store this request now; retry later",
        retry_after=int(RETRY_AFTER_S),
    )


def _add_error_handlers(app: falcon.App) -> None:
    app.set_error_serializer(_json_error_serializer)
    app.add_error_handler(InputError, _handle_input)
    app.add_error_handler(NotFoundError, _handle_not_found)
    app.add_error_handler(StateError, _handle_state)
    # Falcon picks the most specific handler, so these two win over the
    # DatabaseError catch-all below.
    app.add_error_handler(pw.IntegrityError, _handle_integrity)
    app.add_error_handler(pw.DataError, _handle_data)
    app.add_error_handler(pw.DatabaseError, _handle_unavailable)
    app.add_error_handler(pw.InterfaceError, _handle_unavailable)
    app.add_error_handler(MaxConnectionsExceeded, _handle_unavailable)


# --- the app -------------------------------------------------------------------------


class OpenApiDocument:
    """GET /api/v1/openapi.json (public: it holds no secret)."""

    def __init__(self):
        self.spec = build_spec()

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = self.spec


class WebApp(falcon.App):
    """The falcon app, holding its webhook event writer.

    The writer answers a webhook once its events are stored and enqueues
    their processing afterwards, in its own thread: `wait_enqueued` is for
    tests and benchmarks that read the queue right after an answer.
    """

    def __init__(self, writer: event_writer.EventWriter, **options):
        super().__init__(**options)
        self.event_writer = writer

    def wait_enqueued(self, timeout: float = 10.0) -> bool:
        """True once every stored event was enqueued (or left to the sweeper)."""
        return self.event_writer.enqueuer.wait_idle(timeout)


def create_app(
    cfg: Config,
    tasks,
    *,
    clock: Callable[[], object] | None = None,
    queues: Queues | None = None,
) -> WebApp:
    """The WSGI app; `tasks` enqueues (daemon.app.tasks.Tasks), `clock` gives
    naive UTC."""
    clock = clock or utcnow
    queues = queues if queues is not None else getattr(tasks, "queues", None)
    # One writer for both providers: one transaction stream on SQLite.
    writer = event_writer.EventWriter(tasks)
    # One count of wrong api_token guesses for the admin API and the console.
    failures = FailedAuth()
    app = WebApp(
        writer,
        middleware=[
            RequestTimer(),
            BodyLimit(cfg.web.max_body_bytes),
            api.ApiAuth(cfg.web.api_token, failures),
            DatabaseSession(),
        ],
    )
    _add_error_handlers(app)

    for provider, path, route_class in (
        ("wassenger", "/webhooks/wassenger", webhooks.WassengerWebhook),
        ("meta", "/webhooks/whatsapp", webhooks.MetaWebhook),
    ):
        if webhook_route_served(cfg, provider):
            ingest = webhooks.WebhookIngest(provider, tasks, clock, writer)
            app.add_route(path, route_class(cfg, ingest))
        else:
            keys = " or ".join(WEBHOOK_SENDER_KEYS[provider])
            log.info(
                "%s is not served: it cannot check its sender (%s unset) and "
                "web.host listens beyond loopback",
                path,
                keys,
            )

    probe = health.Probe()
    app.add_route("/healthz", health.Healthz())
    app.add_route("/readyz", health.Readyz(probe, queues))
    app.add_route("/metrics", health.Metrics(probe, queues, cfg))

    prefix = api.PREFIX
    campaign = f"{prefix}/campaigns/{{campaign_id:int(min=1, max={MAX_ID})}}"
    app.add_route(f"{prefix}/openapi.json", OpenApiDocument())
    app.add_route(f"{prefix}/campaigns", api.CampaignCollection(tasks))
    app.add_route(campaign, api.CampaignItem(tasks))
    app.add_route(f"{campaign}/verify", api.CampaignVerify(tasks))
    for action in api.CampaignAction.ACTIONS:
        app.add_route(f"{campaign}/{action}", api.CampaignAction(tasks, action))
    app.add_route(f"{prefix}/contacts/import", api.ContactImport())
    app.add_route(f"{prefix}/contacts/verify", api.ContactsVerify(tasks))
    app.add_route(f"{prefix}/contacts/{{ref}}", api.ContactItem())
    app.add_route(f"{prefix}/contacts/{{ref}}/opt-out", api.ContactOptOut())
    app.add_route(f"{prefix}/messages", api.MessageCollection())
    app.add_route(f"{prefix}/events", api.EventCollection())
    app.add_route(f"{prefix}/events/{{event_id}}/replay", api.EventReplay(tasks, cfg))
    console.register(app, cfg, tasks, queues, failures)  # /ui, the web console
    return app


# --- serving ----------------------------------------------------------------


class SelfCheckHeartbeat:
    """Beats only while GET /healthz on our own port answers.

    A wedged I/O loop or a pool with every thread stuck stops the beats, and
    the supervisor replaces us. One loopback request per interval is cheap.
    """

    def __init__(
        self,
        heartbeat: runtime.Heartbeat,
        url: str,
        interval_s: float,
        timeout_s: float,
    ):
        self.heartbeat = heartbeat
        self.url = url
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self._stop = threading.Event()

    def alive(self) -> bool:
        host_port = self.url.removeprefix("http://")
        conn = http.client.HTTPConnection(host_port, timeout=self.timeout_s)
        try:
            conn.request("GET", "/healthz")
            return conn.getresponse().status == 200
        except OSError:
            return False
        finally:
            conn.close()

    def run(self) -> None:
        while not self._stop.is_set():
            if self.alive():
                self.heartbeat.beat()
            elif not self._stop.is_set():
                log.warning("self-check GET /healthz failed; not beating")
            self._stop.wait(self.interval_s)

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.run, name="heartbeat", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self._stop.set()


def main(cfg: Config) -> int:
    """Body of the `web` child (and of `campaignd web`)."""
    runtime.setup_logging(cfg.daemon.log_level, "web")
    # waitress warns on every request queued behind busy threads: under a
    # webhook burst that is thousands of lines saying the same thing.
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)

    server: WebServer | None = None
    beater: SelfCheckHeartbeat | None = None
    stopping = False

    def on_term(signum, frame):
        nonlocal stopping
        if stopping:
            # The parent-death SIGTERM can come several times: the kernel
            # sends it again each time it moves us from one of the dying
            # supervisor's threads to the next; the drain is under way. A
            # second Ctrl-C stops at once (waitress's own stop: the loop
            # ends, request threads get 5 s).
            if signum == signal.SIGINT:
                sys.exit(EXIT_OK)
            return
        stopping = True
        if beater is not None:
            beater.stop()  # our own /healthz is refused from now on
        if server is None:
            sys.exit(EXIT_OK)  # still starting: nothing taken yet
        server.stop_listening()
        # Every request read is answered, within the time the supervisor
        # gives a child before its SIGKILL (as the workers' drain).
        server.drain(max(cfg.daemon.stop_timeout_s - 2.0, 0.5))

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    runtime.die_with_parent()
    from daemon.app.tasks import Tasks
    from daemon.store.db import open_database
    from daemon.store.queue import make_queues

    # The supervisor has migrated already; standalone `campaignd web` has not
    # (migrating is idempotent and locked).
    open_database(cfg, migrate_schema=not runtime.supervised())
    database.close()
    tasks = Tasks(cfg, make_queues(cfg))
    if runtime.supervised():
        # A replacement starts while the role it replaces drains (reload,
        # `campaignd restart web`): that one closes its listener at SIGTERM,
        # which may come a moment after we got here.
        wait_for_port(cfg.web.host, cfg.web.port, PORT_WAIT_S)
    try:
        server = WebServer(create_app(cfg, tasks), cfg)
    except OSError as exc:
        # A taken port is the operator's to fix: one line naming the keys,
        # not a traceback per respawn.
        reason = (
            f"cannot listen on {cfg.web.host}:{cfg.web.port} (web.host, web.port):"
            f" {exc.strerror or exc}"
        )
        log.error("%s", reason)
        runtime.say_last_words(reason)
        return EXIT_FAILURE
    heartbeat = runtime.Heartbeat.from_env()
    if heartbeat is not None:
        beater = SelfCheckHeartbeat(
            heartbeat,
            server.url,
            cfg.supervisor.heartbeat_interval_s,
            timeout_s=max(1.0, cfg.supervisor.heartbeat_timeout_s / 3),
        )
        beater.start()
    runtime.freeze_startup_heap()
    log.info("web listening on %s", server.url)
    try:
        server.serve()
    finally:
        if beater is not None:
            beater.stop()
        log.info("web stopped")
    return EXIT_OK
