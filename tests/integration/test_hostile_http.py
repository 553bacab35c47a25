"""Hostile input against the webhook routes of a REAL waitress server.

What the schemathesis and 400/401/413 tests leave out: random JSON of every
shape and type (hypothesis), wrong types in the fields the parsers read,
huge and deeply nested bodies, invalid UTF-8, oversized numbers, wrong or
missing secrets and signatures, replays (exactly one row per event), and
slow or half-open connections that must not starve the server.

Invariants: a client's mistake is never a 5xx; every 2xx is a stored row
(nothing acknowledged is lost); processing a stored event never raises.
"""

from __future__ import annotations

import json
import socket
import threading
import uuid

import pytest
import requests
from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from daemon import config as config_mod
from daemon.app.tasks import Tasks
from daemon.providers.base import sign_hmac_sha256
from daemon.roles.web.app import WebServer
from daemon.roles.web.app import create_app
from daemon.store.db import open_database
from daemon.store.models import InboundEvent
from daemon.store.models import database
from daemon.store.queue import make_queues

pytestmark = pytest.mark.timeout(120)

SECRET = "hostile-secret"
HMAC_KEY = "hostile-hmac"
META_SECRET = "meta-app-secret"
MAX_BODY = 65536
WASSENGER = "/webhooks/wassenger"
META = "/webhooks/whatsapp"

FUZZ = settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=30),
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=5),
        st.dictionaries(st.text(max_size=10), children, max_size=5),
    ),
    max_leaves=25,
)


class Server:
    """The web app on waitress (the role's own settings), in this process."""

    def __init__(self, data_dir):
        self.cfg = config_mod.from_dict(
            {
                "daemon": {"data_dir": str(data_dir)},
                "web": {
                    "webhook_secret": SECRET,
                    "webhook_hmac_secret": HMAC_KEY,
                    "max_body_bytes": MAX_BODY,
                },
                "provider": {"app_secret": META_SECRET, "verify_token": "vt"},
            },
            env={},
        )
        open_database(self.cfg, migrate_schema=True)
        database.close()
        self.queues = make_queues(self.cfg)
        self.tasks = Tasks(self.cfg, self.queues)
        self.web = WebServer(create_app(self.cfg, self.tasks), self.cfg, port=0)
        self.thread = self.web.serve_in_thread()
        self.url = self.web.url
        self.http = requests.Session()

    def post(
        self, path: str, raw: bytes, *, secret=SECRET, sign=True, headers=None
    ) -> requests.Response:
        head = {"Content-Type": "application/json", **(headers or {})}
        if secret is not None and path == WASSENGER:
            head["X-Webhook-Secret"] = secret
        if sign and path == WASSENGER:
            head["X-Wassenger-Signature"] = sign_hmac_sha256(HMAC_KEY, raw)
        if sign and path == META:
            head["X-Hub-Signature-256"] = sign_hmac_sha256(META_SECRET, raw)
        return self.http.post(self.url + path, data=raw, headers=head, timeout=30)

    def close(self):
        self.http.close()
        self.web.stop()
        self.thread.join(10)
        self.queues.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("hostile"))
    yield srv
    srv.close()


def rows() -> int:
    with database.connection_context():
        return InboundEvent.select().count()


def assert_client_answer(resp: requests.Response) -> None:
    """Never a 5xx; always JSON; a 2xx says how many rows it stored."""
    assert resp.status_code < 500, (resp.status_code, resp.text[:300])
    body = resp.json()
    if resp.ok:
        assert set(body) == {"stored", "duplicates"}
    else:
        assert body.get("title"), body


def process_all_unprocessed(server) -> None:
    """Run the real processing on every stored event: it must never raise."""
    with database.connection_context():
        ids = [
            e.id
            for e in InboundEvent.select(InboundEvent.id).where(
                InboundEvent.processed_at.is_null()
            )
        ]
        for event_id in ids:
            outcome = server.tasks.process_event(event_id)
            assert isinstance(outcome, str)


# ---------------------------------------------------------------- hypothesis


@FUZZ
@given(body=json_values, path=st.sampled_from([WASSENGER, META]))
def test_any_json_is_stored_or_refused_never_a_server_error(server, body, path):
    before = rows()
    resp = server.post(path, json.dumps(body).encode())
    assert_client_answer(resp)
    stored = resp.json()["stored"] if resp.ok else 0
    assert rows() - before == stored, "a 2xx must mean exactly that many rows"
    if not isinstance(body, dict):
        assert resp.status_code == 400


wassenger_like = st.fixed_dictionaries(
    {
        "event": st.one_of(
            st.sampled_from(
                ["message:in:new", "message:out:ack", "message:out:failed"]
            ),
            json_values,
        ),
        "data": st.one_of(
            st.fixed_dictionaries(
                {},
                optional={
                    "id": json_values,
                    "ack": json_values,
                    "fromNumber": json_values,
                    "from": json_values,
                    "body": json_values,
                    "reference": json_values,
                    "chat": json_values,
                    "meta": json_values,
                    "media": json_values,
                },
            ),
            json_values,
        ),
    },
    optional={"id": json_values, "device": json_values},
)
meta_like = st.fixed_dictionaries(
    {
        "object": st.one_of(st.just("whatsapp_business_account"), json_values),
        "entry": st.one_of(
            st.lists(
                st.fixed_dictionaries(
                    {
                        "id": json_values,
                        "changes": st.one_of(
                            st.lists(
                                st.fixed_dictionaries(
                                    {
                                        "field": st.one_of(
                                            st.just("messages"), json_values
                                        ),
                                        "value": st.one_of(
                                            st.fixed_dictionaries(
                                                {},
                                                optional={
                                                    "messages": json_values,
                                                    "statuses": json_values,
                                                    "contacts": json_values,
                                                    "metadata": json_values,
                                                    "errors": json_values,
                                                },
                                            ),
                                            json_values,
                                        ),
                                    }
                                ),
                                max_size=3,
                            ),
                            json_values,
                        ),
                    }
                ),
                max_size=3,
            ),
            json_values,
        ),
    }
)


@FUZZ
@given(wassenger_like)
def test_wassenger_fields_of_the_wrong_type(server, body):
    resp = server.post(WASSENGER, json.dumps(body).encode())
    assert_client_answer(resp)
    process_all_unprocessed(server)


@FUZZ
@given(meta_like)
def test_meta_fields_of_the_wrong_type(server, body):
    resp = server.post(META, json.dumps(body).encode())
    assert_client_answer(resp)
    process_all_unprocessed(server)


@FUZZ
@given(
    st.lists(
        st.tuples(st.integers(0, 4), st.sampled_from(["sent", "delivered", "read"])),
        min_size=1,
        max_size=12,
    )
)
def test_replayed_events_make_exactly_one_row_each(server, deliveries):
    """Any mix of repeated acks and replies: one row per distinct event."""
    run = uuid.uuid4().hex[:10]

    def event(n: int, ack: str) -> dict:
        if ack == "read" and n % 2:
            return {
                "event": "message:in:new",
                "id": f"{run}-in-{n}",
                "data": {
                    "id": f"{run}-in-{n}",
                    "fromNumber": "+33612345678",
                    "body": "oui",
                },
            }
        return {
            "event": "message:out:ack",
            "id": f"{run}-{n}",
            "data": {"id": f"{run}-{n}", "ack": ack},
        }

    distinct = {json.dumps(event(n, ack), sort_keys=True) for n, ack in deliveries}
    for n, ack in deliveries + deliveries[::-1]:
        resp = server.post(WASSENGER, json.dumps(event(n, ack)).encode())
        assert resp.status_code == 200, resp.text
    with database.connection_context():
        stored = (
            InboundEvent.select().where(InboundEvent.dedupe_key.contains(run)).count()
        )
    assert stored == len(distinct)


def test_concurrent_replays_of_one_reply_store_one_row(server):
    run = uuid.uuid4().hex[:10]
    raw = json.dumps(
        {
            "event": "message:in:new",
            "id": run,
            "data": {"id": run, "fromNumber": "+33612345679", "body": "oui"},
        }
    ).encode()
    statuses = []

    def fire():
        with requests.Session() as http:
            for _ in range(5):
                head = {
                    "X-Webhook-Secret": SECRET,
                    "Content-Type": "application/json",
                    "X-Wassenger-Signature": sign_hmac_sha256(HMAC_KEY, raw),
                }
                statuses.append(
                    http.post(
                        server.url + WASSENGER, data=raw, headers=head, timeout=30
                    ).status_code
                )

    threads = [threading.Thread(target=fire) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert statuses == [200] * 40
    with database.connection_context():
        assert (
            InboundEvent.select().where(InboundEvent.dedupe_key.contains(run)).count()
            == 1
        )


# ---------------------------------------------------------------- bodies


@pytest.mark.parametrize(
    "raw, title",
    [
        (b"[" * 30_000 + b"]" * 30_000, "Invalid JSON"),
        (
            json.dumps(json.loads('{"a":' * 40 + "1" + "}" * 40)).encode(),
            "Invalid JSON",
        ),
        (b"\xff\xfe{}", "Invalid UTF-8"),
        (b'{"event": "\xc3\x28"}', "Invalid UTF-8"),
        (b'{"id": ' + b"9" * 5000 + b"}", "Invalid JSON"),
        (b'{"id": NaN}', "Invalid JSON"),
        (b"", "Empty body"),
        (b"   \n", "Empty body"),
        (b'{"a": 1', "Invalid JSON"),
        (b"42", "Invalid body"),
    ],
)
def test_malformed_bodies_are_400(server, raw, title):
    for path in (WASSENGER, META):
        resp = server.post(path, raw)
        assert resp.status_code == 400, (path, resp.status_code, resp.text[:200])
        assert resp.json()["title"] == title


def test_odd_but_valid_json_is_stored_as_it_came(server):
    for raw in (
        b'{"event": "x", "id": "\\ud800 lone surrogate", "data": {"id": 1}}',
        b'{"event": "x\\u0000nul", "data": {"id": "a\\u0000b"}}',
        b'{"id": 1e400, "event": "big", "data": {"id": "1e400"}}',
        b'{"event": "dup", "event": "keys", "data": {"id": "d"}}',
    ):
        resp = server.post(WASSENGER, raw)
        assert resp.status_code == 200, resp.text
    process_all_unprocessed(server)


def test_big_bodies_are_413_never_5xx(server):
    big = json.dumps({"event": "x", "data": {"body": "x" * (MAX_BODY + 10)}}).encode()
    resp = server.post(WASSENGER, big)
    assert resp.status_code == 413 and resp.json()["title"] == "Body too large"
    # Chunked (no Content-Length): waitress counts it and refuses too.
    resp = server.http.post(
        server.url + WASSENGER,
        data=iter([big[:1000], big[1000:]]),
        headers={"X-Webhook-Secret": SECRET},
        timeout=30,
    )
    assert resp.status_code == 413
    # Far beyond the limit: waitress refuses before the app is called.
    resp = server.http.post(server.url + META, data=b"{" * (MAX_BODY * 8), timeout=30)
    assert resp.status_code == 413


def test_many_events_in_one_meta_post_are_all_or_nothing(server):
    run = uuid.uuid4().hex[:8]
    statuses = [
        {"id": f"{run}-{i}", "status": "delivered", "recipient_id": "33612"}
        for i in range(300)
    ]
    body = {
        "object": "whatsapp_business_account",
        "entry": [
            {
                "id": "1",
                "changes": [{"field": "messages", "value": {"statuses": statuses}}],
            }
        ],
    }
    resp = server.post(META, json.dumps(body).encode())
    assert resp.status_code == 200 and resp.json() == {"stored": 300, "duplicates": 0}
    resp = server.post(META, json.dumps(body).encode())
    assert resp.json() == {"stored": 0, "duplicates": 300}


# ---------------------------------------------------------------- auth


def test_wrong_or_missing_secrets_and_signatures_are_401(server):
    raw = json.dumps({"event": "message:in:new", "data": {"id": "auth-1"}}).encode()
    before = rows()
    cases = [
        {"secret": None},
        {"secret": ""},
        {"secret": SECRET + "x"},
        {"secret": SECRET.upper()},
        {"secret": SECRET, "sign": False},
        {
            "secret": SECRET,
            "sign": False,
            "headers": {
                "X-Wassenger-Signature": sign_hmac_sha256(HMAC_KEY, raw + b" ")
            },
        },
        {
            "secret": SECRET,
            "sign": False,
            "headers": {"X-Wassenger-Signature": sign_hmac_sha256("other", raw)},
        },
        {
            "secret": SECRET,
            "sign": False,
            "headers": {"X-Wassenger-Signature": "sha1=" + "0" * 40},
        },
        {
            "secret": SECRET,
            "sign": False,
            "headers": {"X-Wassenger-Signature": "sha256=zz\u00e9"},
        },
    ]
    for case in cases:
        resp = server.post(WASSENGER, raw, **case)
        assert resp.status_code == 401, (case, resp.status_code, resp.text)
        assert resp.json()["title"] == "Unauthorized"
    for header in (
        None,
        "sha256=",
        "sha256=" + "0" * 64,
        sign_hmac_sha256(HMAC_KEY, raw),
    ):  # the other route's key
        head = {"X-Hub-Signature-256": header} if header else {}
        resp = server.post(META, raw, sign=False, headers=head)
        assert resp.status_code == 401, (header, resp.text)
    assert rows() == before
    # The secret may come as ?token= too; the signature is still required.
    resp = server.http.post(
        server.url + WASSENGER + f"?token={SECRET}",
        data=raw,
        timeout=30,
        headers={"X-Wassenger-Signature": sign_hmac_sha256(HMAC_KEY, raw)},
    )
    assert resp.status_code == 200


def test_non_ascii_header_bytes_are_refused_not_a_crash(server):
    raw = b'{"event": "x", "data": {"id": "hdr"}}'
    request = (
        b"POST " + WASSENGER.encode() + b" HTTP/1.1\r\nHost: x\r\n"
        b"X-Webhook-Secret: \xff\xfe\xc3\x28" + SECRET.encode() + b"\r\n"
        b"Content-Type: application/json\r\n"
        b"Content-Length: "
        + str(len(raw)).encode()
        + b"\r\nConnection: close\r\n\r\n"
        + raw
    )
    assert raw_status(server, request) == 401


# ---------------------------------------------------------------- framing


def raw_status(server, request: bytes) -> int:
    host, port = server.web.host, server.web.port
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while b"\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    return int(data.split(b" ", 2)[1])


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GARBAGE\r\n\r\n",
        b"POST /webhooks/wassenger HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
        b"POST /webhooks/wassenger HTTP/1.1\r\nContent-Length: abc\r\n\r\n",
        b"POST /webhooks/wassenger HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"zz\r\nhello\r\n0\r\n\r\n",
        b"POST /webhooks/wassenger HTTP/1.1\r\nContent-Length: 5\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST /webhooks/wassenger HTTP/1.1\r\nX-Big: " + b"a" * 300_000 + b"\r\n\r\n",
        b"BREW /webhooks/wassenger HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
        b"POST /webhooks/wassenger?token=" + b"%" * 2000 + b" HTTP/1.1\r\n"
        b"Content-Length: 2\r\n\r\n{}",
    ],
)
def test_broken_http_framing_is_a_client_error(server, request_bytes):
    status = raw_status(server, request_bytes + b"Connection: close\r\n\r\n")
    assert 400 <= status < 500, status


# ---------------------------------------------------------------- slow clients


def test_waitress_settings_bound_idle_connections(server):
    adj = server.web.server.adj
    assert adj.channel_timeout == 30
    assert adj.connection_limit >= 250
    assert adj.asyncore_use_poll is True  # select() would break above fd 1024


def healthz(server) -> int:
    # 10 s: a starved request would wait for the slow connections to be
    # dropped (channel_timeout, 30 s).
    return requests.get(server.url + "/healthz", timeout=10).status_code


def still_open(sock: socket.socket) -> bool:
    """The server has not closed this (silent) connection."""
    timeout = sock.gettimeout()
    sock.settimeout(0)  # a peek that does not wait
    try:
        return sock.recv(1, socket.MSG_PEEK) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        sock.settimeout(timeout)


@pytest.mark.timeout(90)
def test_slow_and_half_open_connections_do_not_starve_the_server(server):
    """200 slowloris sockets (headers byte by byte), half-open and slow-body
    ones: a normal request and a webhook are still answered at once."""
    host, port = server.web.host, server.web.port
    head = (
        f"POST {WASSENGER} HTTP/1.1\r\nHost: x\r\nX-Webhook-Secret: {SECRET}\r\n"
        "Content-Type: application/json\r\nContent-Length: 100000\r\n"
    ).encode()
    slow: list[socket.socket] = []
    stop = threading.Event()
    try:
        for i in range(200):
            sock = socket.create_connection((host, port), timeout=10)
            if i % 4 == 1:
                sock.sendall(head + b"\r\n" + b"{")  # a body that never ends
            slow.append(sock)
        for _ in range(20):  # half-open: connected, then silent
            slow.append(socket.create_connection((host, port), timeout=10))

        def dribble():
            position = 0
            while not stop.is_set():
                for sock in slow[:200:2]:
                    byte = head[position % len(head) : position % len(head) + 1]
                    try:
                        sock.sendall(byte)
                    except OSError:
                        pass
                position += 1
                stop.wait(0.05)

        thread = threading.Thread(target=dribble, daemon=True)
        thread.start()
        assert [healthz(server) for _ in range(10)] == [200] * 10
        raw = json.dumps(
            {
                "event": "message:out:ack",
                "id": "slow-ok",
                "data": {"id": "slow-ok", "ack": "read"},
            }
        ).encode()
        assert server.post(WASSENGER, raw).status_code == 200
        # Answered while the server still holds the idle ones (those
        # channel_timeout would drop), not once it dropped them.
        assert all(still_open(sock) for sock in slow[1::2])
    finally:
        stop.set()
        for sock in slow:
            sock.close()
    assert healthz(server) == 200
