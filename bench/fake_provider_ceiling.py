"""How fast is the fake provider? POST /v1/messages at 0 ms latency.

Runs the fake provider in its own process (as ``campaignd fake-provider``
would) and hammers it with N keep-alive client threads, spread over a few
client processes so that the clients' GIL is not what we measure. Two
clients: ``raw`` (a minimal socket client: the server's ceiling) and
``provider`` (campaignd's own WassengerProvider: what the daemon will see).

Columns: req/s seen by the clients; p50/p99 latency; the server's CPU per
request; and "ceiling", the req/s one fully busy server core would give
(requests / server CPU seconds), which holds even when the clients are the
bottleneck. The "+acks" row also posts 3 webhooks per send to a sink.

Usage: python bench/fake_provider_ceiling.py [--seconds 2.5]
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import multiprocessing
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from daemon.config import ProviderConfig  # noqa: E402
from daemon.providers.base import ProviderError  # noqa: E402
from daemon.providers.wassenger import WassengerProvider  # noqa: E402


def _phone(i: int) -> str:
    # Never ends in 0000, which the fake treats as "not on WhatsApp".
    return f"+336{i % 10_000_000:07d}1"


def _raw_thread(port: int, tag: str, seconds: float, out: list) -> None:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    head = (
        "POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n"
    )
    lat: list[float] = []
    errors = 0
    i = 0
    buf = b""
    deadline = time.perf_counter() + seconds
    while True:
        t0 = time.perf_counter()
        if t0 >= deadline:
            break
        body = (
            f'{{"phone":"{_phone(i)}","message":"bench","reference":"{tag}-{i}"}}'
        ).encode()
        sock.sendall(head.format(len(body)).encode() + body)
        while (end := buf.find(b"\r\n\r\n")) < 0:
            buf += sock.recv(65536)
        start = buf.find(b"Content-Length: ", 0, end) + 16
        length = int(buf[start : buf.find(b"\r\n", start)])
        while len(buf) < end + 4 + length:
            buf += sock.recv(65536)
        if buf[9:12] not in (b"200", b"201"):
            errors += 1
        buf = buf[end + 4 + length :]
        lat.append(time.perf_counter() - t0)
        i += 1
    sock.close()
    out.append((lat, errors))


def _provider_thread(port: int, tag: str, seconds: float, out: list, client) -> None:
    lat: list[float] = []
    errors = 0
    i = 0
    deadline = time.perf_counter() + seconds
    while True:
        t0 = time.perf_counter()
        if t0 >= deadline:
            break
        try:
            client.send(_phone(i), "bench", f"{tag}-{i}", kind=1, variables={})
        except ProviderError:
            errors += 1
        lat.append(time.perf_counter() - t0)
        i += 1
    out.append((lat, errors))


def _client_process(args: tuple) -> tuple[list[float], int]:
    port, kind, threads, seconds, tag = args
    out: list = []
    client = None
    if kind == "provider":
        cfg = ProviderConfig(base_url=f"http://127.0.0.1:{port}", token="")
        client = WassengerProvider(cfg)
    workers = []
    for t in range(threads):
        name = f"{tag}-{t}"
        if kind == "raw":
            target_args = (port, name, seconds, out)
            workers.append(threading.Thread(target=_raw_thread, args=target_args))
        else:
            target_args = (port, name, seconds, out, client)
            workers.append(threading.Thread(target=_provider_thread, args=target_args))
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    if client is not None:
        client.close()
    lat = [x for thread_lat, _ in out for x in thread_lat]
    return lat, sum(e for _, e in out)


class _Sink(asyncio.Protocol):
    """A webhook receiver that answers 200 to everything, as cheaply as it can."""

    def connection_made(self, transport) -> None:
        self._transport = transport
        self._buf = b""

    def data_received(self, data: bytes) -> None:
        self._buf += data
        while (end := self._buf.find(b"\r\n\r\n")) >= 0:
            start = self._buf.lower().find(b"content-length:", 0, end) + 15
            length = int(self._buf[start : self._buf.find(b"\r\n", start)])
            if len(self._buf) < end + 4 + length:
                return
            self._buf = self._buf[end + 4 + length :]
            self._transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")


def _sink_process(sock: socket.socket) -> None:
    async def serve() -> None:
        loop = asyncio.get_running_loop()
        await loop.create_server(_Sink, sock=sock)
        await asyncio.Event().wait()

    asyncio.run(serve())


def _fake_stats(port: int) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/_fake/stats")
    stats = json.loads(conn.getresponse().read())
    conn.close()
    return stats


def _start_server(*extra: str) -> tuple[subprocess.Popen, int]:
    cmd = [sys.executable, "-m", "daemon.providers.fake", "--port", "0"]
    cmd += ["--ack-delays-ms", ""] if not extra else list(extra)
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True, env=dict(os.environ)
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if "listening on" not in line:
        proc.kill()
        raise SystemExit(f"fake provider did not start: {line!r}")
    return proc, int(line.rsplit(":", 1)[1])


def _run(
    pool,
    server: tuple[psutil.Process, int],
    kind: str,
    threads: int,
    procs: int,
    seconds: float,
    tag: str,
) -> dict:
    proc, port = server
    procs = min(procs, threads)
    shares = [
        threads // procs + (1 if p < threads % procs else 0) for p in range(procs)
    ]
    jobs = [(port, kind, n, seconds, f"{tag}-{p}") for p, n in enumerate(shares)]
    before = _fake_stats(port)["webhooks_sent"]
    cpu0 = sum(proc.cpu_times()[:2])
    results = pool.map(_client_process, jobs)
    # Webhooks are work the sends caused: wait for them, count their CPU too.
    deadline = time.monotonic() + 30
    while (stats := _fake_stats(port))["webhooks_pending"] and (
        time.monotonic() < deadline
    ):
        time.sleep(0.05)
    cpu = sum(proc.cpu_times()[:2]) - cpu0
    lat = sorted(x for r, _ in results for x in r)
    count = len(lat)
    return {
        "client": kind,
        "threads": threads,
        "requests": count,
        "errors": sum(e for _, e in results),
        "webhooks": stats["webhooks_sent"] - before,
        "rps": count / seconds,
        "p50_ms": statistics.median(lat) * 1000 if lat else 0.0,
        "p99_ms": lat[int(count * 0.99) - 1] * 1000 if lat else 0.0,
        "cpu_us": cpu / count * 1e6 if count else 0.0,
        "ceiling": count / cpu if cpu > 0 else 0.0,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.5, help="per row")
    parser.add_argument("--threads", default="1,2,4,8,16", help="raw client rows")
    parser.add_argument("--provider-threads", default="4,8", help="provider rows")
    parser.add_argument(
        "--ack-threads", default="8", help="raw rows with 3 acks per send"
    )
    parser.add_argument("--procs", type=int, default=2, help="client processes")
    args = parser.parse_args()
    rows = [("raw", int(n)) for n in args.threads.split(",") if n]
    rows += [("provider", int(n)) for n in args.provider_threads.split(",") if n]
    ack_rows = [("raw", int(n)) for n in args.ack_threads.split(",") if n]

    ctx = multiprocessing.get_context("fork")
    sink_sock = socket.create_server(("127.0.0.1", 0))
    sink = ctx.Process(target=_sink_process, args=(sink_sock,), daemon=True)
    sink.start()
    sink_url = f"http://127.0.0.1:{sink_sock.getsockname()[1]}/webhooks/wassenger"
    plain = _start_server()
    acking = _start_server("--webhook-url", sink_url, "--ack-delays-ms", "0,0,0")
    servers = {
        False: (psutil.Process(plain[0].pid), plain[1]),
        True: (psutil.Process(acking[0].pid), acking[1]),
    }
    results = []
    try:
        with ctx.Pool(args.procs) as pool:
            # Warm-up: imports, first connections, allocator.
            for server in servers.values():
                _run(pool, server, "raw", 2, args.procs, 0.3, "warm")
            todo = [(kind, n, False) for kind, n in rows]
            todo += [(kind, n, True) for kind, n in ack_rows]
            for i, (kind, threads, acks) in enumerate(todo):
                row = _run(
                    pool,
                    servers[acks],
                    kind,
                    threads,
                    args.procs,
                    args.seconds,
                    f"r{i}",
                )
                row["client"] += "+acks" if acks else ""
                results.append(row)
    finally:
        for proc, _ in (plain, acking):
            proc.terminate()
            proc.wait(timeout=10)
        sink.terminate()

    print(
        f"fake provider ceiling: POST /v1/messages, 0 ms latency, "
        f"{os.cpu_count()} CPUs, {args.procs} client processes, "
        f"{args.seconds:g} s per row"
    )
    header = (
        f"{'client':<10}{'threads':>8}{'requests':>10}{'errors':>7}{'webhooks':>9}"
        f"{'req/s':>8}{'p50 ms':>8}{'p99 ms':>8}{'srv us/req':>11}"
        f"{'ceiling/core':>13}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r['client']:<10}{r['threads']:>8}{r['requests']:>10}{r['errors']:>7}"
            f"{r['webhooks']:>9}{r['rps']:>8.0f}{r['p50_ms']:>8.2f}{r['p99_ms']:>8.2f}"
            f"{r['cpu_us']:>11.1f}{r['ceiling']:>13.0f}"
        )
    print(
        "ceiling/core = requests / server CPU seconds: the req/s one busy core\n"
        "gives. +acks: 3 webhooks (sent/delivered/read) posted per send to a\n"
        "sink, their CPU included."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
