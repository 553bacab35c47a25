"""The fake provider as a real server: dedupe, webhooks, replies, faults, CLI."""

from __future__ import annotations

import argparse
import http.client
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest

from daemon.config import ProviderConfig
from daemon.providers import webhook_parser
from daemon.providers.base import InboundMessage
from daemon.providers.base import RetryableError
from daemon.providers.base import StatusUpdate
from daemon.providers.base import verify_hmac_sha256
from daemon.providers.fake import FakeOptions
from daemon.providers.fake import FakeProvider
from daemon.providers.fake import add_arguments
from daemon.providers.fake import main
from daemon.providers.fake import reply_plan
from daemon.providers.wassenger import WassengerProvider
from tests.helpers import free_port
from tests.helpers import wait_for

pytestmark = pytest.mark.timeout(30)

ROOT = Path(__file__).resolve().parents[2]
FAST_ACKS = (5.0, 10.0, 15.0)


class Receiver:
    """A loopback webhook endpoint; answers 500 to the first ``fail_first`` posts."""

    def __init__(self, fail_first: int = 0) -> None:
        self.events: list[dict] = []
        self.raw: list[tuple[dict, bytes]] = []  # (headers, body) of every post
        self.fail_first = fail_first
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver._lock:
                    receiver.raw.append((dict(self.headers), body))
                    failing = len(receiver.raw) <= receiver.fail_first
                    if not failing:
                        receiver.events.append(json.loads(body))
                status = 500 if failing else 200
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/hooks?t=1"
        threading.Thread(
            target=self._server.serve_forever, args=(0.01,), daemon=True
        ).start()

    def of(self, event: str) -> list[dict]:
        with self._lock:
            return [e for e in self.events if e.get("event") == event]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def provider_for(fake: FakeProvider) -> WassengerProvider:
    return WassengerProvider(
        ProviderConfig(base_url=fake.url, token=fake.options.token)
    )


def call(fake: FakeProvider, method: str, path: str, body=None, headers=None):
    """One request on a fresh connection: (status, headers, parsed JSON)."""
    conn = http.client.HTTPConnection("127.0.0.1", fake.port, timeout=5)
    data = json.dumps(body).encode() if body is not None else None
    conn.request(method, path, data, headers or {})
    resp = conn.getresponse()
    raw = resp.read()
    conn.close()
    return resp.status, dict(resp.getheaders()), json.loads(raw) if raw else None


# --- dedupe -------------------------------------------------------------------


def test_repeated_reference_returns_the_original_and_acks_once(receiver):
    opts = FakeOptions(webhook_url=receiver.url, ack_delays_ms=FAST_ACKS, dedupe=True)
    with FakeProvider(opts) as fake:
        send = {"phone": "+33612345671", "message": "hi", "reference": "c1:k1:m1"}
        status1, _, first = call(fake, "POST", "/v1/messages", send)
        status2, _, second = call(fake, "POST", "/v1/messages", send)
        status3, _, third = call(fake, "POST", "/v1/messages", dict(send, message="x"))
        assert (status1, status2, status3) == (201, 200, 200)
        assert first == second == third
        wait_for(lambda: fake.stats()["acks_sent"] == 3, what="three acks")
        stats = fake.stats()
        assert stats["sends_accepted"] == 1 and stats["duplicate_requests"] == 2
        assert stats["per_reference_max"] == 1
        [msg] = fake.messages()
        assert msg["accepted_count"] == 1 and msg["id"] == first["id"]
        wait_for(lambda: fake.stats()["webhooks_pending"] == 0)
        acks = receiver.of("message:out:ack")
        assert sorted(a["data"]["ack"] for a in acks) == ["delivered", "read", "sent"]


def test_without_dedupe_a_repeated_reference_is_accepted_again():
    with FakeProvider(FakeOptions(dedupe=False)) as fake:
        p = provider_for(fake)
        a = p.send("+33612345671", "hi", "c1:k1:m1", kind=1, variables={})
        b = p.send("+33612345671", "hi", "c1:k1:m1", kind=1, variables={})
        assert a.provider_id != b.provider_id
        stats = fake.stats()
        assert stats["sends_accepted"] == 2 and stats["per_reference_max"] == 2
        assert [m["accepted_count"] for m in fake.messages()] == [2, 2]
        p.close()


# --- webhooks -----------------------------------------------------------------


def test_acks_are_realistic_signed_and_parse(receiver):
    opts = FakeOptions(
        webhook_url=receiver.url, webhook_secret="whsec", ack_delays_ms=FAST_ACKS
    )
    with FakeProvider(opts) as fake:
        p = provider_for(fake)
        sent = p.send("+22890123456", "Bonjour", "c42:k981:m1", kind=1, variables={})
        wait_for(lambda: len(receiver.of("message:out:ack")) == 3, what="acks")
        parser = webhook_parser("wassenger")
        statuses = set()
        for headers, raw in receiver.raw:
            assert headers["X-Webhook-Secret"] == "whsec"
            assert verify_hmac_sha256("whsec", raw, headers["X-Wassenger-Signature"])
            [(key, item)] = parser.split(json.loads(raw))
            event = parser.parse(item)
            assert isinstance(event, StatusUpdate)
            assert event.reference == "c42:k981:m1"
            assert event.wa_id == sent.wa_id
            assert key == f"message:out:ack:{sent.wa_id}:{event.status}"
            statuses.add(event.status)
        assert statuses == {"sent", "delivered", "read"}
        ack = receiver.of("message:out:ack")[0]
        assert ack["data"]["toNumber"] == "+22890123456"
        assert ack["device"]["id"] == opts.device_id
        p.close()


def test_replies_follow_the_deterministic_plan(receiver):
    opts = FakeOptions(
        webhook_url=receiver.url,
        ack_delays_ms=(),
        reply_share=0.5,
        opt_out_share=0.3,
        reply_delay_ms=5,
        reply_text="Oui merci",
        seed=7,
    )
    phones = [f"+3361234{n:03d}1" for n in range(60)]
    plan = {
        phone: reply_plan(phone, seed=7, reply_share=0.5, opt_out_share=0.3)
        for phone in phones
    }
    repliers = {p for p, v in plan.items() if v is not None}
    stoppers = {p for p, v in plan.items() if v == "stop"}
    assert 10 < len(repliers) < 50 and stoppers  # the shares are respected roughly
    with FakeProvider(opts) as fake:
        p = provider_for(fake)
        for n, phone in enumerate(phones):
            p.send(phone, "Message 1", f"c1:{n}:m1", kind=1, variables={})
        # A second message to a replier gets no second reply.
        p.send(sorted(repliers)[0], "Message 2", "c1:x:m2", kind=2, variables={})
        wait_for(lambda: fake.stats()["replies_sent"] == len(repliers), what="replies")
        wait_for(lambda: fake.stats()["webhooks_pending"] == 0)
        stats = fake.stats()
        assert stats["opt_outs_sent"] == len(stoppers)
        assert stats["replies_sent"] == len(repliers)
        parser = webhook_parser("wassenger")
        events = [parser.parse(e) for e in receiver.of("message:in:new")]
        assert all(isinstance(e, InboundMessage) for e in events)
        assert {e.from_phone for e in events} == repliers
        assert {e.from_phone for e in events if e.body == "STOP"} == stoppers
        assert {e.body for e in events} <= {"STOP", "Oui merci"}
        assert len({e.provider_message_id for e in events}) == len(events)
        assert all(not e.is_group and e.timestamp > 1.7e9 for e in events)
        p.close()


def test_failed_webhooks_are_retried_with_backoff():
    receiver = Receiver(fail_first=2)
    opts = FakeOptions(
        webhook_url=receiver.url,
        ack_delays_ms=(1.0,),
        webhook_backoff_ms=5,
        webhook_retries=3,
    )
    try:
        with FakeProvider(opts) as fake:
            p = provider_for(fake)
            p.send("+33612345671", "hi", "r1", kind=1, variables={})
            wait_for(lambda: fake.stats()["webhooks_sent"] == 1, what="delivery")
            stats = fake.stats()
            assert stats["webhooks_retried"] == 2 and stats["webhooks_failed"] == 0
            assert len(receiver.raw) == 3 and len(receiver.events) == 1
            p.close()
    finally:
        receiver.close()


def test_undeliverable_webhooks_give_up():
    opts = FakeOptions(
        webhook_url=f"http://127.0.0.1:{free_port()}/nobody",
        ack_delays_ms=(1.0, 2.0),
        webhook_backoff_ms=5,
        webhook_retries=1,
    )
    with FakeProvider(opts) as fake:
        p = provider_for(fake)
        p.send("+33612345671", "hi", "r1", kind=1, variables={})
        wait_for(lambda: fake.stats()["webhooks_failed"] == 2, what="give up")
        stats = fake.stats()
        assert stats["webhooks_retried"] == 2 and stats["webhooks_sent"] == 0
        p.close()


# --- faults, control, log -----------------------------------------------------


def test_down_mode_via_config_endpoint():
    with FakeProvider(FakeOptions(token="tok")) as fake:
        auth = {"Token": "tok", "Content-Type": "application/json"}
        status, _, opts = call(fake, "POST", "/_fake/config", {"down": True})
        assert status == 200 and opts["down"] is True
        send = {"phone": "+33612345671", "message": "hi"}
        assert call(fake, "POST", "/v1/messages", send, auth)[0] == 503
        assert (
            call(fake, "GET", "/v1/numbers/exists?phone=%2B33612345671", None, auth)[0]
            == 503
        )
        assert call(fake, "GET", "/v1/devices", None, auth)[0] == 503
        # Control routes keep working while down, and need no token.
        status, _, stats = call(fake, "GET", "/_fake/stats")
        assert status == 200 and stats["failures_503"] == 3
        call(fake, "POST", "/_fake/config", {"down": False})
        assert call(fake, "POST", "/v1/messages", send, auth)[0] == 201


@pytest.mark.parametrize(
    "change",
    [{"fail_rate": 2}, {"down": "yes"}, {"nope": 1}, {"port": 1}, [1]],
    ids=str,
)
def test_bad_config_is_rejected(change):
    with FakeProvider() as fake:
        status, _, body = call(fake, "POST", "/_fake/config", change)
        assert status == 400 and body["error"] == "invalid_config"
        assert fake.options == FakeProvider().options


def test_rate_limit_header_and_reset():
    with FakeProvider(FakeOptions(rate_limit_rate=1.0, retry_after_s=9)) as fake:
        send = {"phone": "+33612345671", "message": "hi", "reference": "r"}
        status, headers, body = call(fake, "POST", "/v1/messages", send)
        assert (status, headers["Retry-After"], body["error"]) == (
            429,
            "9",
            "rate_limit",
        )
        assert call(fake, "POST", "/_fake/reset")[0] == 200
        assert fake.stats()["failures_429"] == 0 and fake.stats()["requests"] == 0


def test_messages_endpoint_and_number_check_post():
    with FakeProvider() as fake:
        call(fake, "POST", "/v1/messages", {"phone": "33612345671", "message": "hi"})
        status, _, msgs = call(fake, "GET", "/_fake/messages")
        assert status == 200
        assert [
            (m["phone"], m["body"], m["reference"], m["accepted_count"]) for m in msgs
        ] == [("+33612345671", "hi", None, 1)]
        assert (
            call(fake, "POST", "/v1/numbers/exists", {"phone": "+33612345671"})[2][
                "exists"
            ]
            is True
        )
        status, _, body = call(
            fake, "POST", "/v1/numbers/exists", {"phone": "+33612340000"}
        )
        assert (status, body) == (404, {"message": "Phone not found"})


def test_log_file_has_a_line_per_api_request(tmp_path):
    log = tmp_path / "fake.jsonl"
    with FakeProvider(FakeOptions(log_path=str(log))) as fake:
        p = provider_for(fake)
        p.send("+33612345671", "hi", "c1:m1", kind=1, variables={})
        p.check_number("+33612340000")
        p.device_status()
        fake.stats()
        call(fake, "GET", "/_fake/stats")  # control routes are not logged
        p.close()
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(r["method"], r["path"], r["status"]) for r in lines] == [
        ("POST", "/v1/messages", 201),
        ("GET", "/v1/numbers/exists", 404),
        ("GET", "/v1/devices", 200),
    ]
    assert lines[0]["reference"] == "c1:m1" and lines[0]["phone"] == "+33612345671"
    assert all(isinstance(r["ts"], float) for r in lines)


# --- HTTP details -------------------------------------------------------------


def raw_exchange(port: int, data: bytes, responses: int) -> bytes:
    """Send raw bytes, read until ``responses`` answers (or EOF) arrived."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(data)
        buf = b""
        while buf.count(b"HTTP/1.1 ") < responses or not _complete(buf):
            chunk = sock.recv(65536)
            if not chunk:
                break
            buf += chunk
        return buf


def _complete(buf: bytes) -> bool:
    end = buf.rfind(b"HTTP/1.1 ")
    head_end = buf.find(b"\r\n\r\n", end)
    if head_end < 0:
        return False
    start = buf.find(b"Content-Length: ", end) + 16
    length = int(buf[start : buf.find(b"\r\n", start)])
    return len(buf) >= head_end + 4 + length


def test_pipelined_requests_are_answered_in_order_with_latency():
    with FakeProvider(FakeOptions(latency_ms=30)) as fake:
        bodies = [
            json.dumps({"phone": "+33612345671", "message": "m", "reference": f"p{i}"})
            for i in range(3)
        ]
        data = b"".join(
            f"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Length: {len(b)}\r\n"
            f"\r\n{b}".encode()
            for b in bodies
        )
        started = time.monotonic()
        buf = raw_exchange(fake.port, data, 3)
        assert time.monotonic() - started >= 0.09  # latency applies to each
        refs = [
            json.loads(part.split(b"\r\n\r\n", 1)[1])["reference"]
            for part in buf.split(b"HTTP/1.1 ")[1:]
        ]
        assert refs == ["p0", "p1", "p2"]


def test_connection_close_and_bad_requests():
    with FakeProvider() as fake:
        buf = raw_exchange(
            fake.port, b"GET /v1/devices HTTP/1.0\r\nHost: x\r\n\r\n", responses=1
        )
        assert buf.startswith(b"HTTP/1.1 200") and b"Connection: close" in buf
        buf = raw_exchange(fake.port, b"garbage\r\n\r\n", responses=1)
        assert buf.startswith(b"HTTP/1.1 400")
        buf = raw_exchange(
            fake.port,
            b"POST /v1/messages HTTP/1.1\r\nTransfer-Encoding: chunked\r\n"
            b"\r\n0\r\n\r\n",
            responses=1,
        )
        assert buf.startswith(b"HTTP/1.1 501")
        status, _, body = call(fake, "GET", "/v1/nothing")
        assert status == 404 and body["error"] == "not_found"
        assert call(fake, "GET", "/v1/messages")[0] == 405


def test_client_gives_retryable_error_when_fake_stops():
    fake = FakeProvider().start()
    p = provider_for(fake)
    p.send("+33612345671", "hi", "a", kind=1, variables={})
    fake.stop()
    with pytest.raises(RetryableError):
        p.send("+33612345671", "hi", "b", kind=1, variables={})
    p.close()


# --- CLI ----------------------------------------------------------------------


def test_main_rejects_bad_options(capsys):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert main(parser.parse_args(["--fail-rate", "3"])) == 2
    assert "fail_rate" in capsys.readouterr().err


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_cli_serves_and_exits_0_on_signal(signum):
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "daemon.providers.fake",
            "--port",
            "0",
            "--token",
            "tok",
            "--invalid-number",
            "+33611111111",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("fake provider listening on http://127.0.0.1:")
        port = int(line.rsplit(":", 1)[1])
        p = WassengerProvider(
            ProviderConfig(base_url=f"http://127.0.0.1:{port}", token="tok")
        )
        assert p.check_number("+33611111111").exists is False
        assert p.send("+33612345671", "hi", "r", kind=1, variables={}).provider_id
        p.close()
        proc.send_signal(signum)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def test_connection_counters_and_stop_without_start():
    FakeProvider().stop()  # nothing started: nothing to do, no error
    with FakeProvider() as fake:
        raw_exchange(fake.port, b"GET /v1/devices HTTP/1.0\r\n\r\n", responses=1)
        p = provider_for(fake)
        p.device_status()
        stats = fake.stats()
        assert stats["connections_opened"] == 2
        wait_for(lambda: fake.stats()["connections_active"] == 1)
        p.close()
        wait_for(lambda: fake.stats()["connections_active"] == 0)


# --- like the real providers (issue 13) ---------------------------------------


def send_body(phone: str, ref: str, text: str = "Message 1") -> dict:
    return {"phone": phone, "message": text, "reference": ref}


def test_no_dedupe_by_default_a_repeated_reference_is_a_second_message():
    with FakeProvider() as fake:
        assert fake.options.dedupe is False
        send = send_body("+33612345671", "cd-1-7-m1")
        status1, _, first = call(fake, "POST", "/v1/messages", send)
        status2, _, second = call(fake, "POST", "/v1/messages", send)
        assert (status1, status2) == (201, 201) and first["id"] != second["id"]
        stats = fake.stats()
        assert stats["sends_accepted"] == 2 and stats["duplicate_requests"] == 1
        assert stats["duplicates"] == 1
        assert fake.phone_counts() == {"+33612345671": {"m1": 2}}
        assert fake.duplicates() == {"+33612345671": {"m1": 2}}


def raw_request(body: dict) -> bytes:
    data = json.dumps(body).encode()
    head = f"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Length: {len(data)}\r\n"
    return head.encode() + b"\r\n" + data


def test_a_client_gone_after_sending_the_body_still_gets_its_messages_sent():
    # Three pipelined sends, answers 300 ms each: the client leaves at once.
    with FakeProvider(FakeOptions(latency_ms=300)) as fake:
        data = b"".join(
            raw_request(send_body("+33612345671", f"cd-1-{n}-m1")) for n in range(3)
        )
        with socket.create_connection(("127.0.0.1", fake.port), timeout=5) as sock:
            sock.sendall(data)  # then gone before any answer
        wait_for(lambda: fake.stats()["sends_accepted"] == 3, what="the sends")
        # A half-received body is no request: nothing is sent.
        half = raw_request(send_body("+33612345672", "cd-1-9-m1"))[:-5]
        with socket.create_connection(("127.0.0.1", fake.port), timeout=5) as sock:
            sock.sendall(half)
        # Once the fake has seen every client leave, it has judged every body.
        wait_for(lambda: fake.stats()["connections_active"] == 0)
        assert [m["reference"] for m in fake.messages()] == [
            "cd-1-0-m1",
            "cd-1-1-m1",
            "cd-1-2-m1",
        ]


def test_slow_sends_time_the_client_out_but_are_sent():
    opts = FakeOptions(slow_share=1.0, slow_latency_ms=2000)
    with FakeProvider(opts) as fake:
        conn = http.client.HTTPConnection("127.0.0.1", fake.port, timeout=0.2)
        conn.request("POST", "/v1/messages", json.dumps(send_body("+33612345671", "r")))
        with pytest.raises(TimeoutError):
            conn.getresponse()
        conn.close()
        stats = fake.stats()
        assert stats["sends_accepted"] == 1 and stats["slow_answers"] == 1
        # Only sends are slow; a share of them, at runtime.
        assert call(fake, "GET", "/v1/devices")[0] == 200
        fake.configure(slow_share=0.5, slow_latency_ms=150.0)
        slow = 0
        for n in range(16):
            before = fake.stats()["slow_answers"]
            started = time.monotonic()
            call(fake, "POST", "/v1/messages", send_body("+33612345671", f"s{n}"))
            took = time.monotonic() - started
            if fake.stats()["slow_answers"] > before:
                slow += 1
                assert took >= 0.15  # a slow answer is held its latency
        assert 0 < slow < 16 and fake.stats()["slow_answers"] == 1 + slow


def test_latency_jitter_varies_the_answers():
    with FakeProvider(FakeOptions(latency_ms=10, latency_jitter_ms=60)) as fake:
        took = []
        for _ in range(8):
            started = time.monotonic()
            assert call(fake, "GET", "/v1/devices")[0] == 200
            took.append(time.monotonic() - started)
        assert min(took) >= 0.01 and max(took) - min(took) > 0.01


def test_statuses_can_come_seconds_late_dated_when_they_happened(receiver):
    opts = FakeOptions(
        webhook_url=receiver.url, ack_delays_ms=(5.0,), status_delay_ms=600.0
    )
    with FakeProvider(opts) as fake:
        before = time.time()
        call(fake, "POST", "/v1/messages", send_body("+33612345671", "cd-1-1-m1"))
        wait_for(lambda: receiver.of("message:out:ack"), what="the late ack")
        assert time.time() - before >= 0.6  # not before its delay
        [ack] = receiver.of("message:out:ack")
        assert ack["data"]["timestamp"] <= before + 1  # when it happened


def test_lost_statuses_never_come_replies_still_do(receiver):
    opts = FakeOptions(
        webhook_url=receiver.url,
        ack_delays_ms=FAST_ACKS,
        status_loss_share=1.0,
        reply_share=1.0,
        reply_delay_ms=5,
    )
    with FakeProvider(opts) as fake:
        for n in range(3):
            call(fake, "POST", "/v1/messages", send_body(f"+3361234567{n}", f"r{n}"))
        wait_for(lambda: fake.stats()["replies_sent"] == 3, what="replies")
        wait_for(lambda: fake.stats()["webhooks_pending"] == 0)
        stats = fake.stats()
        assert stats["statuses_lost"] == 3 and stats["acks_sent"] == 0
        assert receiver.of("message:out:ack") == []
        assert all(m["statuses_lost"] for m in fake.messages())
        # Back to normal at runtime.
        fake.configure(status_loss_share=0.0)
        call(fake, "POST", "/v1/messages", send_body("+33612345679", "r9"))
        wait_for(lambda: fake.stats()["acks_sent"] == 3, what="acks")


def test_reply_before_status(receiver):
    phones = [f"+3361234{n:03d}1" for n in range(40)]
    plan = {
        p: reply_plan(p, seed=3, reply_share=0.5, opt_out_share=0.0) for p in phones
    }
    replier = next(p for p in phones if plan[p] == "reply")
    silent = next(p for p in phones if plan[p] is None)
    opts = FakeOptions(
        webhook_url=receiver.url,
        ack_delays_ms=(1.0, 2.0, 3.0),
        reply_share=0.5,
        reply_delay_ms=150,
        reply_before_status=True,
        seed=3,
    )
    with FakeProvider(opts) as fake:
        call(fake, "POST", "/v1/messages", send_body(replier, "cd-1-1-m1"))
        call(fake, "POST", "/v1/messages", send_body(silent, "cd-1-2-m1"))
        wait_for(lambda: fake.stats()["acks_sent"] == 6, what="acks")
        wait_for(lambda: fake.stats()["webhooks_pending"] == 0)
        with receiver._lock:
            order = [
                (e["event"], e["data"]["fromNumber" if inbound else "toNumber"])
                for e in receiver.events
                for inbound in [e["event"] == "message:in:new"]
            ]
        of_replier = [event for event, phone in order if phone == replier]
        assert of_replier == ["message:in:new"] + ["message:out:ack"] * 3
        # A message without a reply does not wait for one.
        assert [event for event, phone in order[:3]] == ["message:out:ack"] * 3
        assert {phone for _, phone in order[:3]} == {silent}


def test_phone_counts_by_kind_and_text_over_http():
    with FakeProvider() as fake:
        sends = [
            send_body("+33612345671", "cd-4-1-m1", "Bonjour"),
            send_body("+33612345671", "cd-4-1-m2", "Merci"),
            send_body("+33612345672", "cd-4-2-m1", "Bonjour"),
            send_body("+33612345672", "cd-4-2-m1", "Bonjour"),
            {"phone": "+33612345673", "message": "hi"},
        ]
        for body in sends:
            assert call(fake, "POST", "/v1/messages", body)[0] == 201
        status, _, phones = call(fake, "GET", "/_fake/phones")
        assert status == 200 and phones == fake.phone_counts()
        assert phones == {
            "+33612345671": {"m1": 1, "m2": 1},
            "+33612345672": {"m1": 2},
            "+33612345673": {"other": 1},
        }
        status, _, texts = call(fake, "GET", "/_fake/phones?by=text")
        assert texts["+33612345672"] == {"Bonjour": 2}
        assert call(fake, "GET", "/_fake/phones?by=nope")[0] == 400
        assert fake.stats()["duplicates"] == 1
        assert [m["kind"] for m in fake.messages()] == ["m1", "m2", "m1", "m1", "other"]
        call(fake, "POST", "/_fake/reset")
        assert fake.phone_counts() == {} and fake.stats()["duplicates"] == 0


def test_new_options_at_runtime_and_on_the_cli():
    with FakeProvider() as fake:
        change = {
            "latency_jitter_ms": 5,
            "slow_share": 0.25,
            "slow_latency_ms": 30000,
            "status_delay_ms": 2000,
            "status_loss_share": 0.1,
            "reply_before_status": True,
            "dedupe": True,
        }
        status, _, opts = call(fake, "POST", "/_fake/config", change)
        assert status == 200 and {k: opts[k] for k in change} == change
        assert call(fake, "POST", "/_fake/config", {"status_loss_share": 2})[0] == 400
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert parser.parse_args([]).dedupe is False
    assert parser.parse_args(["--no-dedupe"]).dedupe is False
    assert parser.parse_args(["--dedupe"]).dedupe is True
    from daemon.providers.fake import options_from_args

    args = parser.parse_args(
        ["--slow-share", "0.5", "--status-loss-share", "0.2", "--reply-before-status"]
    )
    opts = options_from_args(args)
    assert (opts.slow_share, opts.status_loss_share) == (0.5, 0.2)
    assert opts.reply_before_status is True and opts.dedupe is False
