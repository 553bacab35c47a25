"""WassengerProvider against the fake provider: real HTTP on loopback."""

from __future__ import annotations

import threading

import pytest

from daemon.config import ProviderConfig
from daemon.errors import ConfigError
from daemon.providers import make_provider
from daemon.providers.base import PauseCampaignError
from daemon.providers.base import PermanentError
from daemon.providers.base import RetryableError
from daemon.providers.fake import FakeOptions
from daemon.providers.wassenger import WassengerProvider
from tests.helpers import free_port

pytestmark = pytest.mark.timeout(30)

TOKEN = "t" * 64
PHONE = "+33612345671"


@pytest.fixture
def fake_options():
    return FakeOptions(token=TOKEN, ack_delays_ms=())


def client(url: str, **overrides) -> WassengerProvider:
    cfg = ProviderConfig(base_url=url, token=TOKEN, **overrides)
    provider = make_provider(cfg)
    assert isinstance(provider, WassengerProvider)
    return provider


@pytest.fixture
def provider(fake):
    p = client(fake.url)
    yield p
    p.close()


def test_send_ok(fake, provider):
    result = provider.send(PHONE, "Bonjour", "c1:m1", kind=1, variables={"a": "b"})
    assert result.provider_id and result.wa_id and result.raw_status == "queued"
    [msg] = fake.messages()
    assert (msg["phone"], msg["body"], msg["reference"]) == (
        PHONE,
        "Bonjour",
        "c1:m1",
    )
    assert (msg["id"], msg["waId"]) == (result.provider_id, result.wa_id)


def test_send_with_device_and_repeated_reference(fake):
    fake.configure(dedupe=True)  # a provider that dedupes (the fake's option)
    p = client(fake.url, device="65f0c0ffee0000000000fa4e")
    first = p.send(PHONE, "hi", "c1:m1", kind=2, variables={})
    again = p.send(PHONE, "hi", "c1:m1", kind=2, variables={})
    assert again == first
    stats = fake.stats()
    assert (stats["sends_accepted"], stats["duplicate_requests"]) == (1, 1)
    p.close()


def test_bad_token_pauses_the_campaign(fake):
    p = make_provider(ProviderConfig(base_url=fake.url, token="wrong"))
    with pytest.raises(PauseCampaignError) as err:
        p.send(PHONE, "hi", "r", kind=1, variables={})
    assert err.value.http_status == 401
    assert "HTTP 401" in err.value.reason
    assert err.value.reason.endswith("(the provider refused provider.token)")
    p.close()


def test_500_is_retryable(fake, provider):
    fake.configure(fail_rate=1.0)
    with pytest.raises(RetryableError) as err:
        provider.send(PHONE, "hi", "r", kind=1, variables={})
    assert err.value.http_status == 500 and err.value.retry_after is None
    assert fake.stats()["sends_accepted"] == 0


def test_429_is_retryable_with_retry_after(fake, provider):
    fake.configure(rate_limit_rate=1.0, retry_after_s=7)
    with pytest.raises(RetryableError) as err:
        provider.send(PHONE, "hi", "r", kind=1, variables={})
    assert (err.value.http_status, err.value.retry_after) == (429, 7.0)


def test_503_down_is_retryable(fake, provider):
    fake.configure(down=True)
    with pytest.raises(RetryableError) as err:
        provider.send(PHONE, "hi", "r", kind=1, variables={})
    assert err.value.http_status == 503


def test_400_is_permanent_with_reason(fake, provider):
    with pytest.raises(PermanentError) as err:
        provider.send("+33612340000", "hi", "r", kind=1, variables={})
    assert err.value.http_status == 400
    assert "HTTP 400: phone number is not on WhatsApp" in err.value.reason
    assert err.value.code == "invalid_phone"
    with pytest.raises(PermanentError, match="invalid phone"):
        provider.send("not a phone", "hi", "r2", kind=1, variables={})


def test_timeout_is_retryable(fake):
    fake.configure(latency_ms=3000)
    p = client(fake.url, timeout_s=0.2)
    with pytest.raises(RetryableError, match="within 0.2 s"):
        p.send(PHONE, "hi", "r", kind=1, variables={})
    p.close()


def test_accepted_then_500_then_resend_gets_the_original(fake, provider):
    fake.configure(dedupe=True, fail_after_accept_rate=1.0)
    with pytest.raises(RetryableError):
        provider.send(PHONE, "hi", "c9:m1", kind=1, variables={})
    fake.configure(fail_after_accept_rate=0.0)
    result = provider.send(PHONE, "hi", "c9:m1", kind=1, variables={})
    [msg] = fake.messages()
    assert result.provider_id == msg["id"] and msg["accepted_count"] == 1
    assert fake.stats()["per_reference_max"] == 1


def test_connection_refused_is_retryable():
    p = client(f"http://127.0.0.1:{free_port()}")
    with pytest.raises(RetryableError, match="cannot connect"):
        p.send(PHONE, "hi", "r", kind=1, variables={})
    assert p.device_status()["ok"] is False
    p.close()


def test_number_check(fake, provider):
    assert provider.check_number(PHONE).exists is True
    assert provider.check_number("+33612340000").exists is False
    fake.configure(invalid_numbers=["+33699999999"])
    assert provider.check_number("+33699999999").exists is False
    assert fake.stats()["checks"] == 3


def test_number_check_errors(fake, provider):
    fake.configure(down=True)
    with pytest.raises(RetryableError):
        provider.check_number(PHONE)
    fake.configure(down=False, token="other")
    with pytest.raises(PermanentError):
        provider.check_number(PHONE)


def test_number_check_uses_its_own_timeout(fake):
    fake.configure(latency_ms=400)
    p = client(fake.url, timeout_s=0.1, check_timeout_s=5.0)
    assert p.check_number(PHONE).exists is True
    with pytest.raises(RetryableError):
        p.send(PHONE, "hi", "r", kind=1, variables={})
    p.close()


def test_device_status(fake, provider):
    assert provider.device_status() == {
        "ok": True,
        "detail": "device fake-provider online",
    }
    with_device = client(fake.url, device="65f0c0ffee0000000000fa4e")
    assert with_device.device_status()["ok"] is True
    fake.configure(session_status="timeout")
    status = with_device.device_status()
    assert status["ok"] is False and "timeout" in status["detail"]
    fake.configure(session_status="online", down=True)
    status = provider.device_status()
    assert status["ok"] is False and "503" in status["detail"]
    with_device.close()


def test_keep_alive_one_connection_per_thread(fake, provider):
    for i in range(50):
        provider.send(PHONE, "hi", f"seq-{i}", kind=1, variables={})
    assert fake.stats()["connections_opened"] == 1

    def work(n: int) -> None:
        for i in range(25):
            provider.send(PHONE, "hi", f"t{n}-{i}", kind=1, variables={})

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stats = fake.stats()
    assert stats["connections_opened"] == 5  # main thread + 4 workers
    assert stats["sends_accepted"] == 150


def test_thread_safety_8_threads_x_50(fake, provider):
    results: dict[str, str] = {}
    errors: list[BaseException] = []
    lock = threading.Lock()

    def work(n: int) -> None:
        try:
            for i in range(50):
                ref = f"c1:t{n}:{i}"
                result = provider.send(
                    f"+33612{n:02d}{i:03d}1", f"m{i}", ref, kind=1, variables={}
                )
                with lock:
                    results[ref] = result.provider_id
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    stats = fake.stats()
    assert stats["sends_accepted"] == 400 and stats["duplicate_requests"] == 0
    assert stats["per_reference_max"] == 1
    assert stats["connections_opened"] == 8
    by_ref = {m["reference"]: m for m in fake.messages()}
    assert len(by_ref) == 400
    assert all(by_ref[ref]["id"] == pid for ref, pid in results.items())
    assert len(set(results.values())) == 400


def test_close_then_reuse_reconnects(fake, provider):
    provider.send(PHONE, "hi", "a", kind=1, variables={})
    provider.close()
    provider.send(PHONE, "hi", "b", kind=1, variables={})
    assert fake.stats()["connections_opened"] == 2


def test_base_url_with_v1_still_works(fake):
    p = client(fake.url + "/v1/")
    assert p.check_number("+33612340000").exists is False  # a real 404, not a route
    assert p.check_number(PHONE).exists is True
    p.close()


def test_make_provider_rejects_unknown_kind():
    with pytest.raises(ConfigError):
        make_provider(ProviderConfig(kind="twilio"))
    with pytest.raises(ConfigError, match="phone_number_id"):
        make_provider(ProviderConfig(kind="meta"))
