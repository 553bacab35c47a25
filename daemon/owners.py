"""Lease owner strings, ``host:pid:random``: built and read here only.

Message leases (`message.lease_owner`) and the leader lease name their
holder this way. The random part keeps two containers with the same hostname
and the same pid (PID namespaces) from sharing leases; host and pid let the
supervisor find the rows of a process that died (`process_key`, `parse`).
"""

from __future__ import annotations

import functools
import os
import secrets
import socket


def make(host: str, pid: int, random_bytes: int = 4) -> str:
    """A new owner string for process `pid` on `host`."""
    return process_key(host, pid) + secrets.token_hex(random_bytes)


def process_key(host: str, pid: int | None = None) -> str:
    """The start of every owner string of one process (of a host, without `pid`)."""
    return f"{host}:" if pid is None else f"{host}:{pid}:"


def parse(owner: str) -> tuple[str, int] | None:
    """(host, pid) of an owner string, or None if it is not one."""
    parts = owner.split(":")
    if len(parts) < 2 or not parts[1].isdigit():
        return None
    return parts[0], int(parts[1])


def lease_owner() -> str:
    """The owner string of the message leases this process takes."""
    return _owner_for(os.getpid())


@functools.lru_cache(maxsize=4)
def _owner_for(pid: int) -> str:
    return make(socket.gethostname(), pid)
