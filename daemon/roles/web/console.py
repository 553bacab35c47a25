"""The web console at /ui: read-only pages over what `campaignd status`,
`campaign show` and `events list` tell, plus the dead-letter replay.

Server-rendered HTML with inline SVG (console_html.py), no JavaScript. The
figures come from the same functions as the CLI and the admin API: the
supervisor's status socket (daemon/status_client.py), campaigns.campaign_summary,
events.list_events / events.replay, and domain/insights.py for what only a
picture needs.

Access: `web.api_token`, as for the admin API; with no token every page
answers 403 and says so. The login form takes the token and sets a session
cookie (HttpOnly, SameSite=Strict, Path=/ui, Secure behind https): a time
stamp and a nonce signed with an HMAC of the token, so it holds no secret,
survives a restart of the web role, expires after SESSION_MAX_AGE_S, and
every session ends when the token changes. "Log out" records the session
(console_logout) so that a copy of its cookie is refused too, on every host.
The POST forms (replay, log out) carry a CSRF token derived from the
session. Wrong tokens count with the admin API's per client address
(auth_limit.py): past the limit, the login answers 429.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Callable
from urllib.parse import parse_qs
from urllib.parse import quote

import falcon

from daemon.config import Config
from daemon.domain import alerts
from daemon.domain import campaigns
from daemon.domain import events
from daemon.domain import insights
from daemon.errors import NotFoundError
from daemon.errors import StateError
from daemon.roles.web import console_html as pages
from daemon.roles.web import read_body
from daemon.roles.web.auth_limit import FailedAuth
from daemon.status_client import request as status_request
from daemon.store.models import ConsoleLogout
from daemon.store.models import MemberState
from daemon.store.models import database
from daemon.store.models import utcnow

log = logging.getLogger(__name__)

PREFIX = "/ui"
COOKIE = "campaignd_console"
SESSION_MAX_AGE_S = 12 * 3600
# The campaign list computes each campaign's summary: the newest this many.
LIST_LIMIT = 50
STATUS_TIMEOUT_S = 3.0
DEAD_SHOWN = 100


class Sessions:
    """Signed session cookies and their CSRF tokens, keyed by web.api_token."""

    def __init__(self, token: str, clock: Callable[[], float] = time.time):
        self.key = token.encode()
        self.clock = clock

    @property
    def enabled(self) -> bool:
        return bool(self.key)

    def _sign(self, purpose: str, text: str) -> str:
        msg = f"{purpose}:{text}".encode()
        return hmac.new(self.key, msg, hashlib.sha256).hexdigest()

    def token_ok(self, given: str) -> bool:
        return self.enabled and hmac.compare_digest(
            self.key, given.encode("utf-8", "replace")
        )

    def new(self) -> str:
        # The nonce tells apart two logins in the same second: "Log out" ends
        # one session, not every session started in that second.
        session = f"{int(self.clock())}.{secrets.token_hex(8)}"
        return f"{session}.{self._sign('session', session)}"

    def valid(self, value: str | None) -> bool:
        if not self.enabled or not value:
            return False
        session, _, signature = value.rpartition(".")
        stamp = session.partition(".")[0]
        if not (stamp.isascii() and stamp.isdigit()):
            return False
        age = self.clock() - int(stamp)
        return -60 <= age <= SESSION_MAX_AGE_S and hmac.compare_digest(
            signature, self._sign("session", session)
        )

    def csrf(self, session: str) -> str:
        return self._sign("csrf", session)[:32]


def logged_out(session: str) -> bool:
    """True for a session ended by "Log out" (a copy of its cookie)."""
    digest = _digest(session)
    return ConsoleLogout.select().where(ConsoleLogout.session_digest == digest).exists()


def log_out(session: str) -> None:
    """Refuse this session's cookie from now on, wherever a copy of it is.

    Its row is kept until the cookie would have expired anyway; each logout
    deletes the rows past that."""
    stamp = int(session.partition(".")[0])
    expires_at = dt.datetime.fromtimestamp(stamp + SESSION_MAX_AGE_S, dt.UTC)
    with database.atomic():
        ConsoleLogout.delete().where(ConsoleLogout.expires_at < utcnow()).execute()
        ConsoleLogout.insert(
            session_digest=_digest(session), expires_at=expires_at.replace(tzinfo=None)
        ).on_conflict_ignore().execute()


def _digest(session: str) -> str:
    return hashlib.sha256(session.encode()).hexdigest()


def _html(resp: falcon.Response, body: str, status=falcon.HTTP_200) -> None:
    resp.status = status
    resp.content_type = falcon.MEDIA_HTML
    # Pages show live figures and hold a CSRF token: never cached, never framed.
    resp.cache_control = ["no-store"]
    resp.set_header("X-Frame-Options", "DENY")
    resp.set_header(
        "Content-Security-Policy",
        "default-src 'none'; "
        "style-src 'unsafe-inline'; img-src 'self'; form-action 'self'; "
        "frame-ancestors 'none'",
    )
    resp.text = body


def _form(req: falcon.Request) -> dict[str, str]:
    """A urlencoded form body as {name: first value} (bad bytes replaced)."""
    raw = read_body(req).decode("utf-8", "replace")
    return {k: v[0] for k, v in parse_qs(raw, max_num_fields=20).items()}


def _safe_next(path: str | None) -> str:
    # Only our own pages: no open redirect to another site ("//evil", "/\\x"),
    # no header injection (a CR/LF in the Location header).
    if path and path.startswith(PREFIX) and path.isprintable() and path.isascii():
        return path
    return PREFIX


class Page:
    """Base of every console resource: the token and the session checks."""

    uses_database = True

    def __init__(self, sessions: Sessions):
        self.sessions = sessions

    def refused(self, resp: falcon.Response) -> bool:
        """True (and a 403 page) when the console is disabled."""
        if self.sessions.enabled:
            return False
        _html(
            resp,
            pages.refusal(
                "Console disabled",
                "The console needs web.api_token (or CAMPAIGND_API_TOKEN), the "
                "token of the admin API; none is configured, so nothing is shown.",
            ),
            falcon.HTTP_403,
        )
        return True

    def session(self, req: falcon.Request, resp: falcon.Response) -> str | None:
        """The CSRF token of a logged-in request, else None (answered already)."""
        if self.refused(resp):
            return None
        value = req.cookies.get(COOKIE)
        if self.sessions.valid(value) and not logged_out(value):
            return self.sessions.csrf(value)
        if req.method == "GET":
            resp.status = falcon.HTTP_303
            resp.location = f"{PREFIX}/login?next={quote(req.relative_uri)}"
            resp.cache_control = ["no-store"]
        else:
            _html(
                resp,
                pages.refusal("Not logged in", "log in again at /ui/login"),
                falcon.HTTP_401,
            )
        return None

    def checked_post(self, req, resp) -> str | None:
        """The CSRF token of a logged-in POST whose form carries it, else None."""
        csrf = self.session(req, resp)
        if csrf is None:
            return None
        given = _form(req).get("csrf", "")
        if not hmac.compare_digest(csrf, given):
            _html(
                resp,
                pages.refusal(
                    "Form expired",
                    "the form's CSRF token is missing or wrong: reload the page "
                    "and try again",
                ),
                falcon.HTTP_403,
            )
            return None
        return csrf


class Login(Page):
    """GET the form; POST the token, get the session cookie."""

    uses_database = False

    def on_get(self, req, resp) -> None:
        if not self.refused(resp):
            _html(resp, pages.login_page(_safe_next(req.get_param("next"))))

    def __init__(self, sessions: Sessions, failures: FailedAuth):
        super().__init__(sessions)
        self.failures = failures

    def on_post(self, req, resp) -> None:
        if self.refused(resp):
            return
        form = _form(req)
        next_path = _safe_next(form.get("next"))
        address = req.remote_addr or ""
        wait_s = self.failures.retry_after(address)
        if wait_s:
            error = f"too many wrong tokens: try again in {wait_s} s"
            _html(resp, pages.login_page(next_path, error), falcon.HTTP_429)
            resp.retry_after = wait_s
            return
        if not self.sessions.token_ok(form.get("token", "")):
            self.failures.failed(address, "console login")
            page = pages.login_page(next_path, "wrong token (web.api_token)")
            _html(resp, page, falcon.HTTP_401)
            return
        self.failures.succeeded(address)
        resp.set_cookie(
            COOKIE,
            self.sessions.new(),
            max_age=SESSION_MAX_AGE_S,
            path=PREFIX,
            secure=req.forwarded_scheme == "https",
            http_only=True,
            same_site="Strict",
        )
        resp.status = falcon.HTTP_303
        resp.location = next_path


class Logout(Page):
    """Ends the session: its cookie is cleared here and refused everywhere."""

    def on_post(self, req, resp) -> None:
        if self.checked_post(req, resp) is None:
            return
        log_out(req.cookies[COOKIE])
        resp.unset_cookie(COOKIE, path=PREFIX, same_site="Strict")
        resp.status = falcon.HTTP_303
        resp.location = f"{PREFIX}/login"


class Overview(Page):
    """GET /ui: roles (status socket), queues, leader, alerts."""

    def __init__(self, sessions: Sessions, cfg: Config, queues):
        super().__init__(sessions)
        self.cfg = cfg
        self.queues = queues

    def on_get(self, req, resp) -> None:
        csrf = self.session(req, resp)
        if csrf is None:
            return
        status, error = None, ""
        try:
            status = status_request(
                self.cfg.status_socket, {"cmd": "status"}, timeout=STATUS_TIMEOUT_S
            )
            if "error" in status:
                status, error = None, str(status["error"])
        except (OSError, ValueError) as exc:
            error = f"{type(exc).__name__} on {self.cfg.status_socket}: {exc}"
        queues = (status or {}).get("queues")
        if not isinstance(queues, dict) and self.queues is not None:
            try:
                queues = self.queues.depths()
            except Exception as exc:  # noqa: BLE001 - shown as "unavailable"
                log.warning("console: queue depths: %s", exc)
                queues = None
        page = pages.overview_page(
            status,
            error,
            queues,
            alerts.active_alerts(),
            insights.resolved_alerts(),
            csrf,
        )
        _html(resp, page)


class CampaignList(Page):
    """GET /ui/campaigns: newest first; how many members are past Message 1
    (sent, failed or skipped) and how many are settled (nothing left to do)."""

    def on_get(self, req, resp) -> None:
        csrf = self.session(req, resp)
        if csrf is None:
            return
        listed = campaigns.list_campaigns()[::-1]
        rows = []
        for c in listed[:LIST_LIMIT]:
            members = campaigns.campaign_summary(c["id"])["members"]
            settled = sum(n for s, n in members.items() if s in MemberState.FINAL)
            out = c["contacts"] - members.get(MemberState.PENDING, 0)
            rows.append({**c, "out": out, "settled": settled})
        hidden = max(len(listed) - LIST_LIMIT, 0)
        _html(resp, pages.campaigns_page(rows, hidden, csrf))


class CampaignDetail(Page):
    """GET /ui/campaigns/{id}: funnel, sends per minute, last failures."""

    def __init__(self, sessions: Sessions, cfg: Config):
        super().__init__(sessions)
        self.cfg = cfg

    def on_get(self, req, resp, campaign_id: int) -> None:
        csrf = self.session(req, resp)
        if csrf is None:
            return
        try:
            summary = campaigns.campaign_summary(campaign_id)
        except NotFoundError as exc:
            _html(resp, pages.refusal("Not found", str(exc)), falcon.HTTP_404)
            return
        page = pages.campaign_page(
            summary,
            insights.funnel(summary),
            insights.sends_over_time(campaign_id),
            insights.last_failures(campaign_id),
            insights.eta_text(self.cfg, summary, utcnow()),
            csrf,
        )
        _html(resp, page)


class Events(Page):
    """GET /ui/events: counts by type and the dead letters."""

    def on_get(self, req, resp) -> None:
        csrf = self.session(req, resp)
        if csrf is None:
            return
        replayed = req.get_param_as_int("replayed", min_value=1)
        notice = f"event {replayed} replayed: queued for processing" if replayed else ""
        _html(resp, events_view(csrf, notice=notice))


def events_view(csrf: str, *, notice: str = "", error: str = "") -> str:
    return pages.events_page(
        insights.event_counts(),
        events.list_events(dead=True, limit=DEAD_SHOWN),
        events.dead_count(),
        csrf,
        notice=notice,
        error=error,
    )


class EventReplay(Page):
    """POST /ui/events/{id}/replay: events.replay, as the CLI and the API."""

    def __init__(self, sessions: Sessions, cfg: Config, tasks):
        super().__init__(sessions)
        self.cfg = cfg
        self.tasks = tasks

    def on_post(self, req, resp, event_id: int) -> None:
        csrf = self.checked_post(req, resp)
        if csrf is None:
            return
        try:
            events.replay(event_id, self.tasks, self.cfg)
        except NotFoundError as exc:
            _html(resp, events_view(csrf, error=str(exc)), falcon.HTTP_404)
            return
        except StateError as exc:
            _html(resp, events_view(csrf, error=str(exc)), falcon.HTTP_409)
            return
        # Post/Redirect/Get: a reload does not replay twice.
        resp.status = falcon.HTTP_303
        resp.location = f"{PREFIX}/events?replayed={event_id}"


def register(app: falcon.App, cfg: Config, tasks, queues, failures: FailedAuth) -> None:
    """Add the /ui routes to the web role's app; `failures` counts wrong tokens
    with the admin API's."""
    sessions = Sessions(cfg.web.api_token)
    ids = "{campaign_id:int(min=1, max=2147483647)}"
    app.add_route(PREFIX, Overview(sessions, cfg, queues))
    app.add_route(f"{PREFIX}/login", Login(sessions, failures))
    app.add_route(f"{PREFIX}/logout", Logout(sessions))
    app.add_route(f"{PREFIX}/campaigns", CampaignList(sessions))
    app.add_route(f"{PREFIX}/campaigns/{ids}", CampaignDetail(sessions, cfg))
    app.add_route(f"{PREFIX}/events", Events(sessions))
    event = "{event_id:int(min=1, max=2147483647)}"
    app.add_route(f"{PREFIX}/events/{event}/replay", EventReplay(sessions, cfg, tasks))
