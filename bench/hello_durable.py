"""W2's floors: the hello-world ceiling plus the least a durable answer costs.

`bench/webhook_ingest.py --floors` serves each of these next to the ceiling,
on the same waitress settings, to separate what campaignd's code costs from
what any "2xx means stored" answer costs on waitress (a thread per request,
one GIL). None parses, checks or enqueues anything; each stores the raw body
or waits as if it did:

- ``wait``: the request thread hands a token to one other thread and waits
  for its answer; that thread answers everything waiting at once. No
  database: the hand-off alone, the least a group commit costs.
- ``commit``: the request thread inserts the body into SQLite (WAL,
  synchronous=FULL) and commits it itself, one request at a time under a
  lock: no hand-off, one fsync a request.
- ``group``: the hand-off of ``wait`` with a real group commit behind it
  (every waiting body inserted in one statement, one fsync), as campaignd's
  EventWriter does, minus campaignd's code.
- ``leader``: the same group commit without the other thread: the request
  thread that finds no commit under way commits everything waiting, its own
  body with it, then makes the oldest request still waiting the next leader
  (leader/follower). Only the followers wait; nobody wakes a writer.
"""

from __future__ import annotations

import queue
import signal
import sqlite3
import sys
import threading
from pathlib import Path

FLOORS = {
    "wait": "hello + wait for another thread",
    "commit": "hello + own SQLite commit (FULL)",
    "group": "hello + group commit (FULL)",
    "leader": "hello + leader/follower group commit (FULL)",
}


class _Waiter:
    """One request's wait: a lock the answering thread releases."""

    __slots__ = ("lock", "body", "lead")

    def __init__(self, body: bytes):
        self.body = body
        self.lock = threading.Lock()
        self.lock.acquire()


def _open(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("CREATE TABLE IF NOT EXISTS event (id INTEGER PRIMARY KEY, body)")
    return conn


def _answer_waiting(waiting: queue.SimpleQueue, store) -> None:
    """The other thread: take everything waiting, store it, wake each request."""
    while True:
        batch = [waiting.get()]
        while True:
            try:
                batch.append(waiting.get_nowait())
            except queue.Empty:
                break
        store([w.body for w in batch])
        for w in batch:
            w.lock.release()


class _Leader:
    """Group commit without a writer thread: the request thread that finds no
    commit under way commits everything waiting (its own body with it); the
    others wait, and when the leader is done with its group it makes the
    oldest one still waiting the next leader."""

    def __init__(self, store):
        self.store = store
        self.lock = threading.Lock()
        self.pending: list[_Waiter] = []
        self.leading = False

    def submit(self, body: bytes) -> None:
        me = _Waiter(body)
        me.lead = False
        with self.lock:
            self.pending.append(me)
            lead = not self.leading
            self.leading = True
        if not lead:
            me.lock.acquire()
            if not me.lead:
                return
        with self.lock:
            batch, self.pending = self.pending, []
        self.store([w.body for w in batch])
        for w in batch:
            if w is not me:
                w.lock.release()
        with self.lock:
            if self.pending:
                successor = self.pending[0]
                successor.lead = True
                successor.lock.release()
            else:
                self.leading = False


def build_app(floor: str, data_dir: Path):
    import falcon

    waiting: queue.SimpleQueue = queue.SimpleQueue()
    lock = threading.Lock()
    conn = (
        _open(data_dir / "floor.db") if floor in ("commit", "group", "leader") else None
    )

    def group_commit(bodies: list[bytes]) -> None:
        rows = ", ".join(["(?)"] * len(bodies))
        conn.execute(f"INSERT INTO event (body) VALUES {rows}", bodies)

    if floor in ("wait", "group"):
        store = group_commit if floor == "group" else (lambda bodies: None)
        threading.Thread(
            target=_answer_waiting,
            args=(waiting, store),
            name="floor-writer",
            daemon=True,
        ).start()

    leader = _Leader(group_commit) if floor == "leader" else None

    class Floor:
        def on_post(self, req, resp):
            body = req.bounded_stream.read()
            if leader is not None:
                leader.submit(body)
            elif floor == "commit":
                with lock:
                    conn.execute("INSERT INTO event (body) VALUES (?)", (body,))
            else:
                waiter = _Waiter(body)
                waiting.put(waiter)
                waiter.lock.acquire()
            resp.media = {"stored": 1, "duplicates": 0}

    app = falcon.App()
    return app, Floor()


def serve(floor: str, port: int, threads: int, path: str, data_dir: Path) -> None:
    from daemon import config as config_mod
    from daemon.roles.web.app import WebServer

    app, resource = build_app(floor, data_dir)
    app.add_route(path, resource)
    cfg = config_mod.from_dict({"web": {"port": port, "threads": threads}})
    server = WebServer(app, cfg)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    server.serve()
