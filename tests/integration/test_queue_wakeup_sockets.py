"""The wake sockets of SQLite queues: one poke reaches every waiter.

Real unix datagram sockets in a temporary directory: every consumer thread
of every process waits on its own socket, so a poke must reach all of them;
a socket left by a SIGKILLed consumer is cleared by the next poke; a wake
directory too deep for a socket address (108 bytes) still works.
"""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

import pytest

from daemon.store.queue import make_queues
from daemon.store.wakeup import Poker
from daemon.store.wakeup import Waiter
from daemon.store.wakeup import wake_dir
from tests.helpers import wait_for

pytestmark = pytest.mark.timeout(30)


def test_one_poke_reaches_every_waiter(tmp_path):
    directory = wake_dir(str(tmp_path / "queue.db"), "campaignd_messages")
    waiters = [Waiter(directory) for _ in range(3)]
    try:
        assert not any(w.wait(0) for w in waiters)
        assert Poker(directory).poke() == 3
        assert all(w.wait(0) for w in waiters)
        for w in waiters:
            w.drain()
        assert not any(w.wait(0) for w in waiters)
    finally:
        for w in waiters:
            w.close()
    assert os.listdir(directory) == []


def test_a_dead_consumers_socket_is_cleared_by_the_next_poke(tmp_path):
    directory = wake_dir(str(tmp_path / "queue.db"), "campaignd_default")
    live = Waiter(directory)
    # What a SIGKILL leaves: the file, nobody bound to it.
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    # Through the directory's fd: a deep tmp_path (pytest-xdist's) can be
    # longer than a socket address may be.
    fd = os.open(directory, os.O_PATH | os.O_DIRECTORY)
    try:
        dead.bind(f"/proc/self/fd/{fd}/99999.0")
    finally:
        os.close(fd)
    dead.close()
    try:
        assert Poker(directory).poke() == 1
        assert live.wait(0)
        assert os.listdir(directory) == [live.name]
    finally:
        live.close()


def test_a_removed_socket_is_not_reached_and_says_so(tmp_path):
    directory = wake_dir(str(tmp_path / "queue.db"), "campaignd_retry")
    waiter = Waiter(directory)
    try:
        assert waiter.bound()
        os.unlink(waiter.path)
        assert not waiter.bound()
        assert Poker(directory).poke() == 0
        assert not waiter.wait(0)
    finally:
        waiter.close()


def test_a_deep_directory_works_past_the_socket_path_limit(tmp_path):
    deep = tmp_path.joinpath(*["d" * 40] * 3)
    directory = wake_dir(str(deep / "queue.db"), "campaignd_messages")
    assert len(os.path.join(directory, "1234567.0").encode()) > 108
    waiter = Waiter(directory)
    try:
        assert Poker(directory).poke() == 1
        assert waiter.wait(0)
    finally:
        waiter.close()
    assert os.listdir(directory) == []


def test_an_enqueue_ends_a_listening_dequeue(make_config):
    """The storage as a consumer thread uses it: an empty dequeue waits for
    the next enqueue (here from another Queues, as from another process),
    not for its 30 s fallback poll."""
    cfg = make_config("sqlite")
    consumer, producer = make_queues(cfg), make_queues(cfg)
    try:
        storage = consumer.default.storage
        storage.listen(30.0)
        got = []
        thread = threading.Thread(target=lambda: got.append(storage.dequeue()))
        thread.start()
        directory = storage.poker.directory
        wait_for(lambda: os.path.isdir(directory) and os.listdir(directory))
        producer.default.storage.enqueue(b"task", 0)
        thread.join(10)
        assert not thread.is_alive(), "the dequeue waited for its poll"
        # It woke empty-handed or with the task; either way the next look has it.
        data = got[0] if got[0] is not None else storage.dequeue()
        assert bytes(data) == b"task"
        storage.close_waiter()
    finally:
        consumer.close()
        producer.close()


def test_no_wake_socket_falls_back_to_polling(make_config):
    """A wake directory that cannot be made (here a file in its place)
    leaves the consumer polling as Huey does, never stuck."""
    cfg = make_config("sqlite")
    queues = make_queues(cfg)
    try:
        storage = queues.default.storage
        # <queue file>.wake is a file: no queue directory can be made in it.
        Path(storage.poker.directory).parent.write_text("")
        storage.listen(30.0)
        storage.enqueue(b"task", 0)
        assert bytes(storage.dequeue()) == b"task"
        assert storage.blocking is False  # Huey's worker loop polls again
        assert storage.dequeue() is None
    finally:
        queues.close()
