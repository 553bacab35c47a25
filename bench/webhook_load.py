"""The webhook load of W2 and bench/webhook_ingest.py: the body, and the clients.

Every POST is a 1.5 KB Wassenger `message:in:new` body (`sample_body`) whose
id is unique per request. `run_wrk` drives wrk with a Lua script that makes
each body unique (32 keep-alive connections in W2); `run_python_client` is a
multi-process Python keep-alive client for machines without wrk (slower than
wrk: its figures are a lower bound). Both return rps, p50_ms, p99_ms, errors
and requests.
"""

from __future__ import annotations

import http.client
import json
import multiprocessing
import os
import statistics
import subprocess
import tempfile
import time

PATH = "/webhooks/wassenger"
SECRET = "bench-secret"
ID_MARK = "__ID__"


def sample_body(msg_id: str = ID_MARK) -> str:
    """A realistic Wassenger message:in:new (providers.md B.3), about 1.5 KB."""
    phone = "+33612345678"
    wid = phone.lstrip("+") + "@c.us"
    body = {
        "id": msg_id,
        "object": "message",
        "event": "message:in:new",
        "created": 1765642500,
        "device": {
            "id": "68fd1067b488de07029fccc2",
            "phone": "+33198765432",
            "alias": "Campaigns",
            "plan": "io-professional",
        },
        "data": {
            "id": msg_id,
            "type": "text",
            "flow": "inbound",
            "status": "active",
            "ack": "delivered",
            "from": wid,
            "fromNumber": phone,
            "to": "33198765432@c.us",
            "toNumber": "+33198765432",
            "date": "2025-12-13T16:15:00.000Z",
            "timestamp": 1765642500,
            "body": "Bonjour, oui je suis intéressée, pouvez-vous m'envoyer les "
            "détails de l'offre et les horaires d'ouverture ? Merci beaucoup !",
            "chat": {
                "id": wid,
                "name": "Camille Martin",
                "type": "chat",
                "lid": "183807571451999@lid",
                "status": "pending",
                "waStatus": "active",
                "lastOutboundMessageAt": "2025-12-13T16:05:13.000Z",
                "lastInboundMessageAt": "2025-12-13T16:15:00.000Z",
                "labels": ["campagne", "printemps"],
                "owner": {"agent": None},
                "contact": {
                    "wid": wid,
                    "type": "user",
                    "name": "Camille Martin",
                    "phone": phone,
                    "metadata": [{"key": "source", "value": "campaignd"}],
                },
                "links": {"chat": f"/v1/chat/68fd1067b488de07029fccc2/chats/{wid}"},
            },
            "events": {},
            "meta": {
                "isGroup": False,
                "isForwarded": False,
                "notifyName": "Camille",
                "source": "android",
                "isFirstMessage": False,
            },
            "links": {
                "message": f"/v1/chat/68fd1067b488de07029fccc2/messages/{msg_id}"
            },
        },
    }
    text = json.dumps(body, ensure_ascii=False)
    # Pad with a realistic-looking field up to ~1.5 KB.
    pad = max(0, 1500 - len(text.encode()) - 20)
    body["data"]["meta"]["rawNotes"] = "x" * pad
    return json.dumps(body, ensure_ascii=False)


# --- load generators ----------------------------------------------------------------

WRK_SCRIPT = """
local template = [==[%(body)s]==]
local counter = 0
local prefix = ""
local threads = {}
function setup(thread)
  thread:set("prefix", "%(run)s" .. tostring(#threads))
  table.insert(threads, thread)
end
function init(args)
  prefix = wrk.thread:get("prefix")
end
request = function()
  counter = counter + 1
  local body = template:gsub("%(mark)s", prefix .. "X" .. counter)
  return wrk.format("POST", "%(path)s", {
    ["Content-Type"] = "application/json",
    ["X-Webhook-Secret"] = "%(secret)s",
  }, body)
end
done = function(summary, latency, requests)
  local errors = summary.errors
  io.write(string.format(
    "RESULT %%d %%d %%d %%d %%d %%d\\n",
    summary.requests, summary.duration, latency:percentile(50),
    latency:percentile(99), errors.status, errors.connect + errors.read +
    errors.write + errors.timeout))
end
"""


def run_wrk(url: str, seconds: float, connections: int, run_id: str) -> dict:
    script = WRK_SCRIPT % {
        "body": sample_body(),
        "mark": ID_MARK,
        "path": PATH,
        "secret": SECRET,
        "run": run_id,
    }
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(script)
    try:
        out = subprocess.run(
            [
                "wrk",
                f"-t{min(connections, max(1, os.cpu_count() or 1))}",
                f"-c{connections}",
                f"-d{int(seconds)}s",
                "--timeout",
                "10s",
                "-s",
                f.name,
                url,
            ],
            capture_output=True,
            text=True,
            timeout=seconds + 30,
        ).stdout
    finally:
        os.unlink(f.name)
    line = next(ln for ln in out.splitlines() if ln.startswith("RESULT"))
    requests, duration_us, p50, p99, bad_status, socket_errors = map(
        int, line.split()[1:]
    )
    return {
        "rps": requests / (duration_us / 1e6),
        "p50_ms": p50 / 1000,
        "p99_ms": p99 / 1000,
        "errors": bad_status + socket_errors,
        "requests": requests,
    }


def _python_worker(args) -> tuple[int, int, list[float]]:
    host, port, deadline, connections, worker = args
    template = sample_body()
    conns = [
        http.client.HTTPConnection(host, port, timeout=10) for _ in range(connections)
    ]
    latencies: list[float] = []
    errors = count = 0
    headers = {"Content-Type": "application/json", "X-Webhook-Secret": SECRET}
    while time.time() < deadline:
        for conn in conns:
            count += 1
            body = template.replace(ID_MARK, f"py{os.getpid()}w{worker}n{count}")
            started = time.perf_counter()
            try:
                conn.request("POST", PATH, body=body.encode(), headers=headers)
                resp = conn.getresponse()
                resp.read()
                if resp.status != 200:
                    errors += 1
            except (OSError, http.client.HTTPException):
                errors += 1
                conn.close()
            latencies.append(time.perf_counter() - started)
    return count, errors, latencies


def run_python_client(url: str, seconds: float, connections: int) -> dict:
    # Connections of one process take turns; several processes give the
    # concurrency. Slower than wrk: treat its numbers as a lower bound.
    host, port = url.removeprefix("http://").split(":")
    processes = min(connections, max(2, (os.cpu_count() or 2) * 2))
    per_process = max(1, connections // processes)
    deadline = time.time() + seconds
    started = time.perf_counter()
    with multiprocessing.Pool(processes) as pool:
        results = pool.map(
            _python_worker,
            [(host, int(port), deadline, per_process, i) for i in range(processes)],
        )
    elapsed = time.perf_counter() - started
    latencies = sorted(lat for _, _, lats in results for lat in lats)
    total = sum(count for count, _, _ in results)
    return {
        "rps": total / elapsed,
        "p50_ms": statistics.median(latencies) * 1000,
        "p99_ms": latencies[int(len(latencies) * 0.99) - 1] * 1000,
        "errors": sum(errors for _, errors, _ in results),
        "requests": total,
    }
