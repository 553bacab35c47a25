"""The peer's webhook endpoint: FastAPI, processing in BackgroundTasks.

As in the original (audit section 2.2), POST /webhooks/wassenger answers 200
at once and processes the payload after the answer, in the same process
(``background_tasks.add_task(process_wassenger_message, payload, db)``).
Nothing is stored before the 200: an event in flight is lost if the process
dies. Served by ``uvicorn bench.peers.web:app`` (one process, as start.sh ran
it).
"""

from __future__ import annotations

from fastapi import BackgroundTasks
from fastapi import FastAPI
from fastapi import Request

from bench.peers.models import Settings
from bench.peers.models import ThreadConnections

SETTINGS = Settings.from_env()
DB = ThreadConnections(SETTINGS.database_url)

app = FastAPI(title="peer")


def process_wassenger_message(payload: dict, db: ThreadConnections) -> None:
    """What the original did after the 200: find the contact, log the event."""
    data = payload.get("data") or {}
    conn = db.get()
    contact = conn.execute(
        "SELECT id FROM contacts WHERE phone = %s", (data.get("fromNumber"),)
    ).fetchone()
    conn.execute(
        "INSERT INTO webhook_logs (event, event_id, contact_id) VALUES (%s, %s, %s)",
        (payload.get("event", ""), payload.get("id"), contact[0] if contact else None),
    )


@app.post("/webhooks/wassenger")
async def receive_wassenger_webhook(
    request: Request, background_tasks: BackgroundTasks
):
    payload = await request.json()
    background_tasks.add_task(process_wassenger_message, payload, DB)
    return {"status": "received"}


@app.get("/health")
async def health():
    return {"status": "ok"}
