"""A small HTTP/1.1 keep-alive load generator (asyncio, raw sockets).

Each connection sends one request, reads the whole answer, and sends the
next: a closed loop, so req/s and latency describe the server, not a queue
in the client. Run as its own process so its CPU is not the harness's:

    python -m bench.loadgen --url http://127.0.0.1:8080/webhooks/wassenger \
        --connections 32 --seconds 5 --warmup 0.5

prints one JSON line: requests, errors, rps, p50_ms, p99_ms, max_ms, cpu_s.
Every body is a 1.5 KB Wassenger ``message:in:new`` webhook with a unique id
(so a server that dedupes stores every one).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time
from urllib.parse import urlparse

# The shape and size of a real Wassenger inbound-message webhook
# (tests/fixtures/providers/wassenger_message_in_new.json), ids varied.
_TEMPLATE = {
    "id": "@ID@",
    "object": "message",
    "event": "message:in:new",
    "created": 1765642500,
    "device": {
        "id": "68fd1067b488de07029fccc2",
        "phone": "+5215645570796",
        "alias": "White-Dental",
        "plan": "io-professional",
    },
    "data": {
        "id": "@ID@",
        "type": "text",
        "flow": "inbound",
        "status": "active",
        "ack": "delivered",
        "from": "@WID@",
        "fromNumber": "@PHONE@",
        "to": "5215645570796@c.us",
        "toNumber": "+5215645570796",
        "date": "2025-12-13T16:15:00.000Z",
        "timestamp": 1765642500,
        "body": (
            "Bonjour, oui ça m'intéresse ! Pouvez-vous me rappeler demain matin "
            "entre 9 h et 11 h ? Je voudrais aussi savoir si l'offre est valable "
            "pour deux personnes et s'il faut prendre rendez-vous avant samedi."
        ),
        "chat": {
            "id": "@WID@",
            "name": "Dra Reynita",
            "type": "chat",
            "lid": "183807571451999@lid",
            "status": "pending",
            "waStatus": "active",
            "lastOutboundMessageAt": "2025-12-13T16:05:13.000Z",
            "lastInboundMessageAt": "2025-12-13T16:15:00.000Z",
            "labels": ["humano", "contacto"],
            "owner": {"agent": None},
            "contact": {
                "wid": "@WID@",
                "type": "user",
                "name": "Dra Reynita",
                "phone": "@PHONE@",
                "metadata": [{"key": "capi_contacto_enviado", "value": "true"}],
            },
            "links": {"chat": "/v1/chat/68fd1067b488de07029fccc2/chats/x@c.us"},
        },
        "events": {},
        "meta": {
            "isGroup": False,
            "isForwarded": False,
            "notifyName": "Reynita",
            "source": "android",
            "isFirstMessage": False,
        },
        "links": {"message": "/v1/chat/68fd1067b488de07029fccc2/messages/x"},
    },
}


_TEXT = json.dumps(_TEMPLATE, ensure_ascii=False)


def webhook_body(tag: str, n: int) -> bytes:
    """A message:in:new payload, unique per (tag, n), ~1.5 KB."""
    phone = f"+336{n % 10_000_000:07d}2"
    text = _TEXT.replace("@ID@", f"{tag}{n:012X}".upper())
    text = text.replace("@WID@", f"{phone[1:]}@c.us").replace("@PHONE@", phone)
    return text.encode()


def _request(host: str, path: str, body: bytes) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\n"
        "Content-Type: application/json\r\nUser-Agent: bench\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def _connection(host, port, path, tag, index, stop_at, record_from, out):
    reader, writer = await asyncio.open_connection(host, port)
    lat: list[float] = []
    errors = 0
    n = 0
    try:
        while True:
            t0 = time.perf_counter()
            if t0 >= stop_at:
                break
            writer.write(_request(host, path, webhook_body(f"{tag}{index:02X}", n)))
            n += 1
            head = await reader.readuntil(b"\r\n\r\n")
            status = head[9:12]
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            if length:
                await reader.readexactly(length)
            t1 = time.perf_counter()
            if t0 >= record_from:
                lat.append(t1 - t0)
                if status not in (b"200", b"201", b"202"):
                    errors += 1
    except (OSError, asyncio.IncompleteReadError):
        errors += 1
    finally:
        writer.close()
    out.append((lat, errors))


async def _run(url: str, connections: int, seconds: float, warmup: float, tag: str):
    parts = urlparse(url)
    start = time.perf_counter()
    record_from = start + warmup
    stop_at = record_from + seconds
    out: list = []
    await asyncio.gather(
        *(
            _connection(
                parts.hostname,
                parts.port,
                parts.path or "/",
                tag,
                i,
                stop_at,
                record_from,
                out,
            )
            for i in range(connections)
        )
    )
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--tag", default="B", help="hex-ish prefix of event ids")
    args = parser.parse_args(argv)
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    out = asyncio.run(
        _run(args.url, args.connections, args.seconds, args.warmup, args.tag)
    )
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    lat = sorted(x for thread_lat, _ in out for x in thread_lat)
    count = len(lat)
    result = {
        "requests": count,
        "errors": sum(e for _, e in out),
        "rps": count / args.seconds,
        "p50_ms": lat[count // 2] * 1000 if lat else None,
        "p99_ms": lat[min(count - 1, int(count * 0.99))] * 1000 if lat else None,
        "max_ms": lat[-1] * 1000 if lat else None,
        "cpu_s": (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
