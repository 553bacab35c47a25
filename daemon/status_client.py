"""The client side of the supervisor's status socket (one request, one answer).

Foundation layer, so both `campaignd status` (daemon/status.py) and the web
console (daemon/roles/web/console.py) ask the supervisor the same way; the
server side is daemon/supervision/status.py.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path


def request(path: Path, payload: dict, timeout: float = 5.0) -> dict:
    """Send one request and return the answer (raises OSError if no daemon)."""
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        while True:
            try:
                sock.connect(str(path))
                break
            except BlockingIOError:
                # A Unix socket with a timeout fails at once (EAGAIN) when
                # the listen backlog is full: a busy daemon, not a dead one.
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
        sock.sendall(json.dumps(payload).encode() + b"\n")
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65_536):
            chunks.append(chunk)
    return json.loads(b"".join(chunks) or b"{}")
