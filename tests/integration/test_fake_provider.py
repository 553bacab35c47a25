"""The fake provider as a real server: dedupe, webhooks, replies, faults, CLI.

How it behaves like the real providers (no dedupe by default, clients gone
mid-request, slow sends, late and lost statuses, replies before statuses)
is in test_fake_provider_realism.py.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import subprocess
import sys
import time
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
from tests.helpers import FAST_ACKS
from tests.helpers import Receiver
from tests.helpers import call
from tests.helpers import free_port
from tests.helpers import wait_for

pytestmark = pytest.mark.timeout(30)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def provider_for(fake: FakeProvider) -> WassengerProvider:
    return WassengerProvider(
        ProviderConfig(base_url=fake.url, token=fake.options.token)
    )


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
