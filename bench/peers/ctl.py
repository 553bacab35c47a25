"""The harness's hand inside the peer's venv: enqueue Celery tasks on request.

Reads one JSON command per line on stdin and answers one JSON line on
stdout, so the harness (which has no celery) pays Celery's import once:

  {"cmd": "ping"}
  {"cmd": "fanout", "campaign_id": 1}         send_campaign_messages.delay
  {"cmd": "send", "ids": [1, 2]}               send_single_message per id
  {"cmd": "probe", "key": "k", "old": [pids], "timeout": 10, "every_ms": 50}
      keep a few bench.probe(key) tasks in flight (one more per answer, or
      per `every_ms` without one) until a process whose pid is not in `old`
      has run one; answers {"pid", "done_at"} (CLOCK_MONOTONIC, comparable
      with the harness's time.monotonic()) or {"timeout": true}.
"""

from __future__ import annotations

import json
import sys
import time

import redis

from bench.peers.celery_app import SETTINGS
from bench.peers.celery_app import probe
from bench.peers.celery_app import send_campaign_messages
from bench.peers.celery_app import send_single_message

# As many as the pool has processes: every idle one can take one at once.
PROBES_IN_FLIGHT = 4


def _probe(client: redis.Redis, key: str, old: set[int], timeout: float, every: float):
    """Closed loop: a few probes in flight, one more per answer (or per `every`
    without any), so the probing itself never floods the worker."""
    deadline = time.monotonic() + timeout
    for _ in range(PROBES_IN_FLIGHT):
        probe.apply_async(args=[key])
    while time.monotonic() < deadline:
        item = client.blpop(key, timeout=every)
        probe.apply_async(args=[key])
        if item is None:
            continue
        pid, done_at = item[1].decode().split()
        if int(pid) not in old:
            return {"pid": int(pid), "done_at": float(done_at)}
    return {"timeout": True}


def handle(client: redis.Redis, command: dict) -> dict:
    cmd = command.get("cmd")
    if cmd == "ping":
        return {"ok": True}
    if cmd == "fanout":
        send_campaign_messages.delay(command["campaign_id"])
        return {"ok": True}
    if cmd == "send":
        for message_id in command["ids"]:
            send_single_message.apply_async(args=[message_id])
        return {"ok": True, "sent": len(command["ids"])}
    if cmd == "probe":
        return _probe(
            client,
            command["key"],
            set(command.get("old", [])),
            float(command.get("timeout", 10.0)),
            float(command.get("every_ms", 50.0)) / 1000.0,
        )
    return {"error": f"unknown command {cmd!r}"}


def main() -> int:
    client = redis.Redis.from_url(SETTINGS.redis_url)
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            answer = handle(client, json.loads(line))
        except Exception as exc:  # noqa: BLE001 - report, keep serving
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
