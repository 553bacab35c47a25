"""`campaignd status` exit codes, as systemctl's: 3 nothing answers, 4 the
state cannot be known (an answer that is not campaignd's)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]


def status(tmp_path: Path, sock: Path) -> subprocess.CompletedProcess:
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        f'[daemon]\ndata_dir = "{tmp_path / "data"}"\n[status]\nsocket = "{sock}"\n'
    )
    env = {k: v for k, v in os.environ.items() if k != "CAMPAIGND_CONFIG"}
    return subprocess.run(
        [sys.executable, "-m", "daemon", "status", "-c", str(cfg)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
        env=env,
    )


class OneAnswer:
    """A Unix socket that answers every request with `answer` bytes."""

    def __init__(self, path: Path, answer: bytes):
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen(4)
        self.answer = answer
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with conn:
                while conn.recv(65536):
                    pass
                conn.sendall(self.answer)

    def close(self):
        self.server.close()


def test_nothing_listening_is_exit_3(tmp_path):
    done = status(tmp_path, tmp_path / "none.sock")
    assert done.returncode == 3
    assert "not running" in done.stderr


@pytest.mark.parametrize(
    "answer", [b"HTTP/1.1 400 Bad Request\r\n\r\n", b"", b"[1, 2]", b'{"x": 1}']
)
def test_an_answer_that_is_not_ours_is_exit_4(tmp_path, answer):
    sock = tmp_path / "s.sock"
    server = OneAnswer(sock, answer)
    try:
        done = status(tmp_path, sock)
    finally:
        server.close()
    assert done.returncode == 4, done.stdout + done.stderr
    assert done.stderr.startswith("campaignd: no valid answer on ")
    assert len(done.stderr.strip().splitlines()) == 1
    assert done.stdout == ""
