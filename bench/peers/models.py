"""The peer's settings (from the environment), its schema and its DB access.

The original talked to Supabase through its HTTP client (PostgREST); the
replica uses one persistent psycopg connection per thread instead, which is
cheaper per query: the comparison is generous to the peer.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import psycopg

SCHEMA = """
CREATE TABLE IF NOT EXISTS contacts (
    id bigserial PRIMARY KEY,
    phone text NOT NULL UNIQUE,
    name text,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS campaigns (
    id bigserial PRIMARY KEY,
    name text NOT NULL,
    message_1 text NOT NULL,
    message_2 text NOT NULL,
    status text NOT NULL DEFAULT 'draft',
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS campaign_contacts (
    campaign_id bigint NOT NULL REFERENCES campaigns (id),
    contact_id bigint NOT NULL REFERENCES contacts (id),
    PRIMARY KEY (campaign_id, contact_id)
);
CREATE TABLE IF NOT EXISTS messages (
    id bigserial PRIMARY KEY,
    campaign_id bigint NOT NULL REFERENCES campaigns (id),
    contact_id bigint NOT NULL REFERENCES contacts (id),
    message_type text NOT NULL DEFAULT 'message_1',
    content text NOT NULL,
    status text NOT NULL DEFAULT 'pending',
    whatsapp_message_id text,
    error_message text,
    retry_count integer NOT NULL DEFAULT 0,
    sent_at timestamptz,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS messages_campaign_status ON messages (campaign_id, status);
CREATE TABLE IF NOT EXISTS webhook_logs (
    id bigserial PRIMARY KEY,
    event text NOT NULL,
    event_id text,
    contact_id bigint,
    received_at timestamptz NOT NULL DEFAULT now()
);
"""


@dataclass(frozen=True)
class Settings:
    database_url: str
    redis_url: str
    provider_url: str
    provider_token: str

    @classmethod
    def from_env(cls) -> Settings:
        return cls(
            database_url=os.environ.get(
                "PEER_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/peer"
            ),
            redis_url=os.environ.get("PEER_REDIS_URL", "redis://127.0.0.1:6379/13"),
            provider_url=os.environ.get("PEER_PROVIDER_URL", "http://127.0.0.1:8099"),
            provider_token=os.environ.get("PEER_PROVIDER_TOKEN", ""),
        )


class ThreadConnections:
    """One autocommit psycopg connection per thread, opened on first use."""

    def __init__(self, url: str):
        self.url = url
        self._local = threading.local()

    def get(self) -> psycopg.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None or conn.closed:
            conn = psycopg.connect(self.url, autocommit=True)
            self._local.conn = conn
        return conn

    def reset(self) -> None:
        """Forget this thread's connection (after fork, or after an error)."""
        self._local = threading.local()


def create_schema(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(SCHEMA)
