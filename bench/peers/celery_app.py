"""The peer: a Celery 5 replica of the original worker, configured as audited.

What it copies from the audit (shared/reference/original-audit.md):
- worker_concurrency 4 (prefork), prefetch multiplier 2, task_acks_late and
  task_reject_on_worker_lost, broker_connection_retry_on_startup, result
  backend with result_expires 24 h, task_track_started;
- the five queues and the task routes, the six beat jobs at their periods;
- send_single_message: soft/hard time limits 60/90 s, a per-message
  idempotency lock ``SET idempotency:send:<id> NX EX 300`` in Redis (released
  when the task ends, kept when its process is killed), validation, the
  provider POST with the message's reference, the row marked sent, a live
  counter bumped in Redis (what sync_monitoring_to_supabase persisted), and
  retries through retry_failed_message at 60 s x 2^(n-1), 3 attempts.

What it does not copy: Supabase. The original read and wrote rows through
the Supabase HTTP client; this replica keeps one psycopg connection per
process, which is cheaper, so the figures flatter the peer.

Settings come from the environment (bench/peers/models.py: PEER_*).
"""

from __future__ import annotations

import datetime as dt
import os
import time

import redis
import requests
from celery import Celery
from celery.schedules import crontab
from celery.signals import worker_process_init
from kombu import Exchange
from kombu import Queue

from bench.peers.models import Settings
from bench.peers.models import ThreadConnections

SETTINGS = Settings.from_env()
IDEMPOTENCY_LOCK_TTL = 300
MAX_RETRY_ATTEMPTS = 3
RETRY_BASE_DELAY_SECONDS = 60
SENT = ("sent", "delivered", "read")

celery_app = Celery("app", broker=SETTINGS.redis_url, backend=SETTINGS.redis_url)
celery_app.conf.update(
    worker_concurrency=4,
    worker_prefetch_multiplier=2,
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    broker_connection_retry_on_startup=True,
    broker_connection_max_retries=10,
    result_expires=24 * 3600,
    task_track_started=True,
    task_serializer="json",
    accept_content=["json"],
    timezone="UTC",
    enable_utc=True,
    task_default_queue="default",
    task_queues=(
        Queue("default", Exchange("default"), routing_key="default"),
        Queue("messages", Exchange("messages"), routing_key="messages.#"),
        Queue(
            "messages_high", Exchange("messages_high"), routing_key="messages.high.#"
        ),
        Queue("retry", Exchange("retry"), routing_key="retry.#"),
        Queue("verification", Exchange("verification"), routing_key="verify.#"),
    ),
    task_routes={
        "app.tasks.celery_app.send_single_message": {
            "queue": "messages",
            "routing_key": "messages.single",
        },
        "app.tasks.celery_app.send_campaign_messages": {
            "queue": "messages",
            "routing_key": "messages.campaign",
        },
        "app.tasks.celery_app.retry_failed_message": {
            "queue": "retry",
            "routing_key": "retry.message",
        },
        "app.tasks.celery_app.verify_whatsapp_task": {
            "queue": "verification",
            "routing_key": "verify.single",
        },
        "app.tasks.celery_app.bulk_verify_task": {
            "queue": "verification",
            "routing_key": "verify.bulk",
        },
    },
    beat_schedule={
        "sync-monitoring": {
            "task": "app.tasks.celery_app.sync_monitoring_to_supabase",
            "schedule": 3600.0,
        },
        "reset-daily-monitoring": {
            "task": "app.tasks.celery_app.reset_daily_monitoring",
            "schedule": crontab(hour=0, minute=0),
        },
        "cleanup-expired-locks": {
            "task": "app.tasks.celery_app.cleanup_expired_locks",
            "schedule": 600.0,
        },
        "recover-interrupted-campaigns": {
            "task": "app.tasks.celery_app.recover_interrupted_campaigns",
            "schedule": 300.0,
        },
        "system-health-check": {
            "task": "app.tasks.celery_app.system_health_check",
            "schedule": 120.0,
        },
        "check-expired-interactions": {
            "task": "app.tasks.celery_app.check_expired_interactions",
            "schedule": 3600.0,
        },
    },
)


class _ProcessResources:
    """Per-process clients, made after the prefork fork (never shared)."""

    def __init__(self) -> None:
        self.pid = 0

    def ensure(self) -> None:
        if self.pid == os.getpid():
            return
        self.pid = os.getpid()
        self.db = ThreadConnections(SETTINGS.database_url)
        self.redis = redis.Redis.from_url(SETTINGS.redis_url)
        self.http = requests.Session()
        self.http.headers.update(
            {"Token": SETTINGS.provider_token, "Content-Type": "application/json"}
        )


RES = _ProcessResources()


@worker_process_init.connect
def _init_child(**_kwargs) -> None:
    RES.ensure()


def get_idempotency_key(message_id: int, operation: str = "send") -> str:
    return f"idempotency:{operation}:{message_id}"


def acquire_idempotency_lock(message_id: int, operation: str = "send") -> bool:
    key = get_idempotency_key(message_id, operation)
    stamp = dt.datetime.utcnow().isoformat()
    return bool(RES.redis.set(key, stamp, nx=True, ex=IDEMPOTENCY_LOCK_TTL))


def release_idempotency_lock(message_id: int, operation: str = "send") -> None:
    RES.redis.delete(get_idempotency_key(message_id, operation))


def validate_message_data(message: dict) -> tuple[bool, str]:
    for field in ("id", "contact_id", "campaign_id", "content"):
        if message.get(field) is None:
            return False, f"Champ requis manquant: {field}"
    return True, ""


def calculate_retry_delay(attempt: int) -> int:
    return RETRY_BASE_DELAY_SECONDS * (2 ** (attempt - 1))


def _row(sql: str, args: tuple) -> dict | None:
    cur = RES.db.get().execute(sql, args)
    row = cur.fetchone()
    if row is None:
        return None
    return dict(zip([c.name for c in cur.description], row, strict=True))


def _mark(message_id: int, status: str, **fields) -> None:
    sets = ", ".join(f"{name} = %s" for name in ("status", *fields))
    RES.db.get().execute(
        f"UPDATE messages SET {sets} WHERE id = %s",
        (status, *fields.values(), message_id),
    )


def _count(name: str) -> None:
    RES.redis.incr(f"monitoring:{dt.date.today().isoformat()}:{name}")


def _deliver(message_id: int) -> dict:
    """Body of send_single_message and retry_failed_message."""
    RES.ensure()
    if not acquire_idempotency_lock(message_id):
        return {"success": False, "error": "already_processing"}
    try:
        message = _row("SELECT * FROM messages WHERE id = %s", (message_id,))
        if message is None:
            return {"success": False, "error": "message_not_found"}
        if message["status"] in SENT:
            return {"success": True, "skipped": "already_sent"}
        contact = _row("SELECT * FROM contacts WHERE id = %s", (message["contact_id"],))
        valid, error = validate_message_data(message)
        if not valid or contact is None:
            _mark(message_id, "failed", error_message=error or "contact not found")
            return {"success": False, "error": error}
        try:
            resp = RES.http.post(
                f"{SETTINGS.provider_url}/v1/messages",
                json={
                    "phone": contact["phone"],
                    "message": message["content"],
                    "reference": f"peer-{message_id}",
                },
                timeout=(5, 30),
            )
        except requests.RequestException as exc:
            return _schedule_retry(message, str(exc))
        if resp.status_code in (200, 201):
            body = resp.json()
            _mark(
                message_id,
                "sent",
                whatsapp_message_id=body.get("id"),
                sent_at=dt.datetime.now(dt.UTC),
            )
            _count("sent")
            return {"success": True, "whatsapp_message_id": body.get("id")}
        if resp.status_code == 429 or resp.status_code >= 500:
            return _schedule_retry(message, f"HTTP {resp.status_code}")
        _mark(message_id, "failed", error_message=resp.text[:200])
        _count("failed")
        return {"success": False, "error": f"HTTP {resp.status_code}"}
    finally:
        release_idempotency_lock(message_id)


def _schedule_retry(message: dict, error: str) -> dict:
    attempt = message["retry_count"] + 1
    if attempt >= MAX_RETRY_ATTEMPTS:
        _mark(message["id"], "failed", error_message=error, retry_count=attempt)
        _count("failed")
        return {"success": False, "error": error}
    _mark(message["id"], "pending", error_message=error, retry_count=attempt)
    retry_failed_message.apply_async(
        args=[message["id"]], countdown=calculate_retry_delay(attempt)
    )
    return {"success": False, "retry_in": calculate_retry_delay(attempt)}


@celery_app.task(
    name="app.tasks.celery_app.send_single_message", soft_time_limit=60, time_limit=90
)
def send_single_message(message_id: int, is_template=False, template_name=None):
    return _deliver(message_id)


@celery_app.task(
    name="app.tasks.celery_app.retry_failed_message", soft_time_limit=60, time_limit=90
)
def retry_failed_message(message_id: int):
    return _deliver(message_id)


@celery_app.task(name="app.tasks.celery_app.send_campaign_messages")
def send_campaign_messages(campaign_id: int):
    """Create every Message 1 of the campaign and enqueue one send each."""
    RES.ensure()
    conn = RES.db.get()
    with conn.transaction():
        conn.execute(
            "UPDATE campaigns SET status = 'sending' WHERE id = %s", (campaign_id,)
        )
        ids = [
            row[0]
            for row in conn.execute(
                """
                INSERT INTO messages (campaign_id, contact_id, message_type, content)
                SELECT cc.campaign_id, c.id, 'message_1',
                       replace(cp.message_1, '{name}', coalesce(c.name, ''))
                  FROM campaign_contacts cc
                  JOIN contacts c ON c.id = cc.contact_id
                  JOIN campaigns cp ON cp.id = cc.campaign_id
                 WHERE cc.campaign_id = %s
                   AND NOT EXISTS (
                       SELECT 1 FROM messages m
                        WHERE m.campaign_id = cc.campaign_id
                          AND m.contact_id = c.id
                          AND m.message_type = 'message_1')
                 ORDER BY c.id
                RETURNING id
                """,
                (campaign_id,),
            )
        ]
    for message_id in ids:
        send_single_message.apply_async(
            args=[message_id], kwargs={"is_template": False, "template_name": None}
        )
    return {"campaign_id": campaign_id, "queued": len(ids)}


@celery_app.task(name="app.tasks.celery_app.verify_whatsapp_task")
def verify_whatsapp_task(phone: str):
    RES.ensure()
    resp = RES.http.get(
        f"{SETTINGS.provider_url}/v1/numbers/exists", params={"phone": phone}
    )
    return resp.status_code == 200


@celery_app.task(name="app.tasks.celery_app.bulk_verify_task")
def bulk_verify_task(phones: list[str]):
    for index, phone in enumerate(phones):
        verify_whatsapp_task.apply_async(args=[phone], countdown=index * 3)
    return len(phones)


@celery_app.task(name="app.tasks.celery_app.sync_monitoring_to_supabase")
def sync_monitoring_to_supabase():
    RES.ensure()
    return {k.decode(): int(v) for k, v in _monitoring_counters().items()}


def _monitoring_counters() -> dict:
    keys = list(RES.redis.scan_iter(match="monitoring:*", count=1000))
    return dict(zip(keys, RES.redis.mget(keys), strict=True)) if keys else {}


@celery_app.task(name="app.tasks.celery_app.reset_daily_monitoring")
def reset_daily_monitoring():
    return True


@celery_app.task(name="app.tasks.celery_app.cleanup_expired_locks")
def cleanup_expired_locks():
    # SET ... EX locks expire in Redis by themselves.
    return 0


@celery_app.task(name="app.tasks.celery_app.recover_interrupted_campaigns")
def recover_interrupted_campaigns():
    RES.ensure()
    rows = (
        RES.db.get()
        .execute("SELECT id FROM campaigns WHERE status = 'sending'")
        .fetchall()
    )
    return [r[0] for r in rows]


@celery_app.task(name="app.tasks.celery_app.system_health_check")
def system_health_check():
    RES.ensure()
    RES.redis.ping()
    RES.db.get().execute("SELECT 1")
    return True


@celery_app.task(name="app.tasks.celery_app.check_expired_interactions")
def check_expired_interactions():
    return 0


@celery_app.task(name="bench.probe")
def probe(key: str):
    """Benchmark probe: record which process ran it, and when (CLOCK_MONOTONIC)."""
    RES.ensure()
    RES.redis.rpush(key, f"{os.getpid()} {time.monotonic():.6f}")
    return os.getpid()
