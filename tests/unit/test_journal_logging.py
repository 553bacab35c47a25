"""Under systemd, a log record (traceback included) is one journal entry at
its own priority, and its level name stays in the text."""

from __future__ import annotations

import logging
import socket
import struct

import pytest

from daemon.runtime import JournalHandler

pytestmark = pytest.mark.timeout(30)

FMT = "%(levelname)s [worker:default] %(name)s: %(message)s"


def parse_native(datagram: bytes) -> dict[str, str]:
    """journald's native protocol, as journald reads it."""
    fields, rest = {}, datagram
    while rest:
        line, _, after = rest.partition(b"\n")
        if b"=" in line:
            key, _, value = line.partition(b"=")
            fields[key.decode()] = value.decode()
            rest = after
        else:
            (size,) = struct.unpack("<Q", after[:8])
            fields[line.decode()] = after[8 : 8 + size].decode()
            assert after[8 + size : 9 + size] == b"\n"
            rest = after[9 + size :]
    return fields


@pytest.fixture
def journal(tmp_path):
    path = tmp_path / "journal.socket"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    yield path, sock
    sock.close()


def logger_with(handler) -> logging.Logger:
    log = logging.getLogger(f"campaignd.test.{id(handler)}")
    log.propagate = False
    log.handlers = [handler]
    log.setLevel(logging.DEBUG)
    return log


def test_a_traceback_is_one_entry_at_error_priority(journal):
    path, sock = journal
    handler = JournalHandler("campaignd", FMT, str(path))
    log = logger_with(handler)
    try:
        raise ZeroDivisionError("division by zero")
    except ZeroDivisionError:
        log.exception("send of message %s failed", 42)
    log.warning("rate limited: retry in %s s", 5)
    handler.close()

    first = parse_native(sock.recv(65536))
    assert first["PRIORITY"] == "3"
    assert first["SYSLOG_IDENTIFIER"] == "campaignd"
    message = first["MESSAGE"]
    assert message.startswith("ERROR [worker:default] campaignd.test.")
    assert "send of message 42 failed" in message
    assert "Traceback (most recent call last)" in message
    assert message.rstrip().endswith("ZeroDivisionError: division by zero")
    second = parse_native(sock.recv(65536))
    assert second["PRIORITY"] == "4"
    assert second["MESSAGE"].endswith("rate limited: retry in 5 s")


def test_without_the_journal_every_line_keeps_its_priority(tmp_path, capsys):
    handler = JournalHandler("campaignd", FMT, str(tmp_path / "no-journal.socket"))
    log = logger_with(handler)
    try:
        raise ValueError("bad")
    except ValueError:
        log.error("boom", exc_info=True)
    handler.close()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) > 3
    assert all(line.startswith("<3>") for line in lines), lines
    assert lines[0].startswith("<3>ERROR [worker:default]")
