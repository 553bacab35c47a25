"""The fake provider behaves like the real providers (issue 13).

No dedupe by default (a repeated reference is a second message), a send whose
client left after its body is still sent, slow sends that time the client
out, latency jitter, statuses late (dated when they happened) or lost,
replies before statuses, per-phone counts over HTTP, and the options for all
of it at runtime and on the CLI.
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import time

import pytest

from daemon.providers.fake import FakeOptions
from daemon.providers.fake import FakeProvider
from daemon.providers.fake import add_arguments
from daemon.providers.fake import reply_plan
from tests.helpers import FAST_ACKS
from tests.helpers import Receiver
from tests.helpers import call
from tests.helpers import wait_for

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


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
