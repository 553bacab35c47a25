"""What every child process does for itself: die with its parent, beat, log.

The supervisor starts each role as ``python -m daemon child ROLE -c CONFIG``
with two environment variables:

- ``CAMPAIGND_SUPERVISOR_PID``: the pid the child must outlive no longer.
- ``CAMPAIGND_HEARTBEAT_FILE``: a file the child rewrites every heartbeat.

``python -m daemon child --zygote -c CONFIG`` is the zygote
(daemon/supervision/zygote.py): it imports every role's code, opens nothing,
and forks a role whenever the supervisor asks on its stdin (one end of a
socketpair).

Heartbeat file format (one line, ASCII): ``<oldest_task_started_epoch> <running>``
where the first field is the wall-clock start time of the oldest task still
running in this child (``0`` when idle) and the second the number of running
tasks. The supervisor judges liveness by the file's mtime and the hard time
limit by the first field.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import itertools
import logging
import mmap
import os
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Iterable

HEARTBEAT_ENV = "CAMPAIGND_HEARTBEAT_FILE"
SUPERVISOR_PID_ENV = "CAMPAIGND_SUPERVISOR_PID"
# A child sends this to the supervisor after its first heartbeat, so a
# (re)spawn is seen RUNNING at once instead of at the next poll of the files.
FIRST_BEAT_SIGNAL = signal.SIGUSR2
_PR_SET_PDEATHSIG = 1
_PR_SET_NAME = 15

log = logging.getLogger(__name__)


def die_with_parent() -> None:
    """Ask the kernel to SIGTERM us when the supervisor dies, and check it is alive.

    Without this a SIGKILLed supervisor would leave a web child holding the
    port, and the restarted daemon could not bind it. The signal can come
    more than once: the kernel sends it each time it moves us from one of
    the dying supervisor's threads to the next, so a role's SIGTERM handler
    must not act twice (the web role's did: docs/benchmarks.md, tenth run).
    """
    expected = os.environ.get(SUPERVISOR_PID_ENV)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the getppid check remains
        pass
    # The parent may have died between fork and prctl: then we were already
    # re-parented and no signal will ever come.
    if expected and os.getppid() != int(expected):
        sys.exit(0)


def skip_unused_drivers(cfg) -> None:
    """Keep huey from importing database drivers this mode never uses.

    huey.storage imports redis and psycopg when they are installed (about a
    second together on a busy machine), and every respawned child would pay
    for it. Marking a module as absent makes huey's optional import skip it;
    call this before anything imports huey.
    """
    uses_postgres = cfg.database_url.startswith(("postgresql:", "postgres:"))
    uses_postgres = uses_postgres or cfg.queue.backend == "postgres"
    if not uses_postgres:
        sys.modules.setdefault("psycopg", None)
    if cfg.queue.backend != "redis":
        sys.modules.setdefault("redis", None)


def freeze_startup_heap() -> None:
    """For a role set up and about to serve: what exists now lives as long
    as the process, so the garbage collector stops scanning it (gc.freeze).

    Without it a full collection walks every object of the imports and the
    setup (some 58,000 in `campaignd web`), holding the GIL: 31-46 ms under
    W2's load (bench/webhook_ingest.py --by-thread --unfrozen), a stall of
    every request in flight. After it a full collection walks what the
    requests left (~2,000 objects, under 1 ms).
    A role forked by the zygote has its imports frozen there already; this
    adds what the role built itself.
    """
    gc.freeze()


def set_process_name(name: str) -> None:
    """Name this process for `top` and `ps -o comm` (the kernel keeps 15 bytes)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the name stays "python"
        pass


def show_role_in_cmdline(role: str) -> bool:
    """Make `ps` and psutil show ``child ROLE`` instead of ``child --zygote``."""
    return show_in_cmdline([role if w == "--zygote" else w for w in sys.orig_argv])


def show_in_cmdline(words: list[str]) -> bool:
    """Make `ps` and psutil show `words` as our command line.

    The kernel reads /proc/PID/cmdline from our original argv memory, so the
    new words are written there (NUL-padded, never past its end). When they
    do not fit, argv[0] is shortened to "python"; else it is left.
    """
    area = _argv_area()
    if area is None:
        return False
    start, end = area
    for candidate in (words, ["python"] + words[1:]):
        new = b"\0".join(w.encode() for w in candidate) + b"\0"
        if len(new) <= end - start:
            ctypes.memmove(start, new.ljust(end - start, b"\0"), end - start)
            return True
    return False


def cmdline_room() -> int:
    """How many bytes `show_in_cmdline` can write (0 if it cannot)."""
    area = _argv_area()
    return 0 if area is None else area[1] - area[0]


def _argv_area() -> tuple[int, int] | None:
    try:
        with open("/proc/self/stat", "rb") as f:
            stat = f.read()
        # Fields after "pid (comm) " start at field 3; arg_start is field 48.
        fields = stat[stat.rindex(b")") + 2 :].split()
        return int(fields[45]), int(fields[46])
    except (OSError, ValueError, IndexError):
        return None


def role_tag(role: str) -> str:
    """A short process name for a role: cd-web, cd-w-msg#2, cd-scheduler."""
    short = role.replace("worker:", "w-").replace("messages", "msg")
    return f"cd-{short}"[:15]


def supervised() -> bool:
    """True in a child of `campaignd run`, which migrated the schema before
    starting any role: a role need not check it again (a connection and a
    lock on every respawn)."""
    return SUPERVISOR_PID_ENV in os.environ


def announce_first_beat() -> None:
    """Tell the supervisor our first heartbeat is written (FIRST_BEAT_SIGNAL).

    Only to our parent, and only when it is the supervisor named in the
    environment: a pid from the environment alone may have been reused.
    """
    expected = os.environ.get(SUPERVISOR_PID_ENV)
    parent = os.getppid()
    if expected and parent == int(expected):
        with contextlib.suppress(OSError):
            os.kill(parent, FIRST_BEAT_SIGNAL)


def parent_alive() -> bool:
    expected = os.environ.get(SUPERVISOR_PID_ENV)
    return not expected or os.getppid() == int(expected)


INFLIGHT_DIR_NAME = "inflight"
_INFLIGHT_RECORD = 24  # bytes: a message id, space padded, then a newline
# The second record of each file: the task the thread took, "m<id>" (a send)
# or "e<id>,<id>..." (events: the web role enqueues them in chunks), from
# its pop until it returns.
_TAKEN_AT = _INFLIGHT_RECORD
_TAKEN_RECORD = 256  # bytes: room for a chunk of event ids
# The third: the ids a thread sent after the first one of a batch, whose
# outcomes are recorded together (",<id>" each). Last in the file, so that
# the first two records sit where they always did.
_MORE_AT = _TAKEN_AT + _TAKEN_RECORD
_MORE_RECORD = 232  # bytes: room for 11 ids of 20 digits
# Ids one thread may have in flight at once (InFlight.begin).
INFLIGHT_CAPACITY = 1 + (_MORE_RECORD - 1) // 21
_BLANK = b" " * (_INFLIGHT_RECORD - 1) + b"\n"
_BLANK_TAKEN = b" " * (_TAKEN_RECORD - 1) + b"\n"
_BLANK_MORE = b" " * (_MORE_RECORD - 1) + b"\n"
_RECORDS = _MORE_AT + _MORE_RECORD


def inflight_dir(data_path, env=None) -> str:
    """Where workers note the sends they have in flight: the runtime
    directory under systemd (tmpfs, survives our processes, not a reboot),
    else <data_dir>/run. Supervisor and workers compute it alike."""
    env = os.environ if env is None else env
    base = env.get("RUNTIME_DIRECTORY", "").split(":")[0]
    root = base or os.path.join(str(data_path), "run")
    return os.path.join(root, INFLIGHT_DIR_NAME)


class InFlight:
    """The messages each sending thread of this process may have on the wire.

    `begin(id)` runs right before a request's first bytes are written and
    `end()` once the outcomes are recorded: a lone send begins and ends one
    id; a batch begins each of its sends in turn and ends them all after
    recording them together, so up to INFLIGHT_CAPACITY ids are open at
    once. Fixed-size records in a file per thread (``<pid>.<thread id>``)
    mapped into memory. A record is a memory write, not a system call that
    gives up the GIL: from the note to the request's `sendall` the thread
    runs a few lines of Python, so a kill between the two, which would
    re-send a row the provider never had only after the confirm window, has
    next to no time to strike. No fsync: a SIGKILL does not lose page-cache
    writes, and that is the failure this serves. After a worker died,
    `read_inflight` tells the supervisor which of its leased rows may have
    reached the provider (unconfirmed) and which provably did not.
    """

    def __init__(self, directory: str, pid: int | None = None):
        self.directory = directory
        self.pid = os.getpid() if pid is None else pid
        self._local = threading.local()
        self._files = itertools.count()
        mark_inflight_boot(directory)

    def _records(self) -> mmap.mmap:
        records = getattr(self._local, "records", None)
        if records is None:
            name = f"{self.pid}.{threading.get_native_id()}.{next(self._files)}"
            fd = os.open(
                os.path.join(self.directory, name), os.O_RDWR | os.O_CREAT, 0o600
            )
            try:
                # The blocks are reserved now: a full disk (or tmpfs) is an
                # OSError here, never a SIGBUS at a later write to the map.
                os.posix_fallocate(fd, 0, _RECORDS)
                records = mmap.mmap(fd, _RECORDS)
            finally:
                os.close(fd)
            records[:] = _BLANK + _BLANK_TAKEN + _BLANK_MORE
            self._local.records = records
            self._local.open = 0
        return records

    def begin(self, message_id: int) -> None:
        """`message_id` may be on the wire from now on, with those begun
        since the last `end()`."""
        records = self._records()
        opened = self._local.open
        if not opened:
            text = str(message_id).ljust(_INFLIGHT_RECORD - 1).encode() + b"\n"
            records[:_INFLIGHT_RECORD] = text
            self._local.open, self._local.more_at = 1, _MORE_AT
        else:
            # Appended, the ids before it untouched: a kill mid-write can
            # only cut this id short, and the row that id names is then
            # judged unconfirmed (the safe side), never one of the others.
            text = f",{message_id}".encode()
            at = self._local.more_at
            if opened >= INFLIGHT_CAPACITY or at + len(text) >= _RECORDS:
                raise ValueError(f"more than {INFLIGHT_CAPACITY} sends in flight")
            records[at : at + len(text)] = text
            self._local.open, self._local.more_at = opened + 1, at + len(text)

    def end(self) -> None:
        """Every send begun since the last `end()` is recorded."""
        records = self._records()
        if self._local.open > 1:
            records[_MORE_AT:] = _BLANK_MORE
        records[:_INFLIGHT_RECORD] = _BLANK
        self._local.open = 0

    def take(self, kind: str, task_ids: int | Iterable[int]) -> None:
        """This thread took the task for send (kind "m") or event(s) ("e")
        `task_ids`: if the process dies before `untake`, the queue entry died
        with it (Huey drops a task once popped), and the supervisor enqueues
        it again when its row still waits (`read_taken`). Ids that do not
        fit the record are left to the sweeper (a chunk is 8 events)."""
        ids = [task_ids] if isinstance(task_ids, int) else list(task_ids)
        text = kind + ",".join(str(int(i)) for i in ids)
        if len(text) >= _TAKEN_RECORD:
            text = text[: text.rfind(",", 0, _TAKEN_RECORD - 1)]
        record = text.ljust(_TAKEN_RECORD - 1).encode() + b"\n"
        self._records()[_TAKEN_AT:_MORE_AT] = record

    def untake(self) -> None:
        self._records()[_TAKEN_AT:_MORE_AT] = _BLANK_TAKEN

    def keep(self) -> None:
        """The outcome could not be recorded (the database failed): leave the
        record for the supervisor to read if this process dies, and give this
        thread a fresh file for its next send."""
        records = getattr(self._local, "records", None)
        if records is not None:
            records.close()  # the file keeps what was written
            self._local.records = None
            self._local.open = 0


def read_inflight(directory: str, pid: int) -> set[int]:
    """Message ids the threads of `pid` had begun and not ended."""
    return {
        int(text)
        for first, _ in _records_of(directory, pid)
        for text in first.split(b",")
        if text.isdigit()
    }


def read_taken(directory: str, pid: int) -> set[tuple[str, int]]:
    """(kind, id) of the tasks the threads of `pid` had taken and not finished."""
    found = set()
    for _, text in _records_of(directory, pid):
        kind, ids = text[:1], text[1:].split(b",")
        if kind in (b"m", b"e") and all(i.isdigit() for i in ids):
            found.update((kind.decode(), int(i)) for i in ids)
    return found


def _records_of(directory: str, pid: int) -> list[tuple[bytes, bytes]]:
    """(in-flight ids, taken record) of each file of `pid`, stripped: the
    in-flight ids are the first id and the others begun with it, "<id>,<id>"."""
    out = []
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return out
    for name in names:
        if not name.startswith(f"{pid}."):
            continue
        try:
            with open(os.path.join(directory, name), "rb") as f:
                data = f.read(_RECORDS)
        except OSError:
            continue
        # A file of an older version ends after the taken record: no more.
        in_flight = data[:_TAKEN_AT].strip() + data[_MORE_AT:].strip()
        out.append((in_flight, data[_TAKEN_AT:_MORE_AT].strip()))
    return out


# A file of the records' directory: the boot it was made in (see
# inflight_records_kept).
_BOOT_MARK = "boot_id"


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip()
    except OSError:  # not Linux
        import psutil

        return f"booted:{psutil.boot_time():.0f}"


def mark_inflight_boot(directory: str, renew: bool = False) -> None:
    """Make the records' directory if need be, noting the boot it is made in
    (again when `renew`: the supervisor's start, once it has dealt with what
    a previous boot left)."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    path = os.path.join(directory, _BOOT_MARK)
    if not renew and os.path.exists(path):
        return
    draft = f"{path}.{os.getpid()}.{threading.get_native_id()}"
    with open(draft, "w", encoding="ascii") as f:
        f.write(_boot_id())
    os.replace(draft, path)


def inflight_records_kept(directory: str) -> bool:
    """Whether the records in `directory` are all a previous run left: the
    directory was made in this boot and not removed since. Not after a
    reboot (a tmpfs is empty, and records on disk were never fsynced), nor
    when systemd removed its RuntimeDirectory on a stop (the unit keeps it
    across restarts only: RuntimeDirectoryPreserve=restart). Without its
    records, a dead worker's leased row may have been on the wire."""
    try:
        with open(os.path.join(directory, _BOOT_MARK), encoding="ascii") as f:
            return f.read().strip() == _boot_id()
    except OSError:
        return False


def recorded_pids(directory: str) -> set[int]:
    """The pids that have record files in `directory` (live or dead)."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return set()
    return {int(n.split(".", 1)[0]) for n in names if n.split(".", 1)[0].isdigit()}


def clear_inflight(directory: str, pid: int) -> None:
    """Forget a dead process's records (after its rows were dealt with)."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return
    for name in names:
        if name.startswith(f"{pid}."):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(directory, name))


class Heartbeat:
    """Child side of the heartbeat: a small file rewritten in place."""

    def __init__(self, path: str):
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        self._announced = False

    @classmethod
    def from_env(cls) -> Heartbeat | None:
        path = os.environ.get(HEARTBEAT_ENV)
        return cls(path) if path else None

    def beat(self, oldest_task_started: float | None = None, running: int = 0) -> None:
        line = f"{oldest_task_started or 0:.3f} {running}\n".encode()
        # pwrite + ftruncate rewrite in place and bump mtime: no rename, no
        # new inode, one syscall pair per beat.
        os.pwrite(self._fd, line, 0)
        os.ftruncate(self._fd, len(line))
        if not self._announced:
            self._announced = True
            announce_first_beat()

    def close(self) -> None:
        os.close(self._fd)


LAST_WORDS_SUFFIX = ".exit"


def say_last_words(text: str) -> None:
    """A child about to exit on purpose leaves one line beside its heartbeat
    file, which the supervisor shows as the role's LAST EXIT.

    Named with the pid: a replaced web role's successor shares the heartbeat
    path with the old process still draining, and each exit must get its own
    process's words."""
    path = os.environ.get(HEARTBEAT_ENV)
    if not path:
        return
    with contextlib.suppress(OSError):
        with open(_last_words_path(path, os.getpid()), "w", encoding="utf-8") as f:
            f.write(" ".join(text.split())[:300])


def read_last_words(heartbeat_path: str, pid: int) -> str:
    """Process `pid`'s last words ("" if it left none), removed once read."""
    path = _last_words_path(heartbeat_path, pid)
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read().strip()
    except OSError:
        return ""
    with contextlib.suppress(OSError):
        os.unlink(path)
    return text


def _last_words_path(heartbeat_path: str, pid: int) -> str:
    return f"{heartbeat_path}{LAST_WORDS_SUFFIX}.{pid}"


class TaskClock:
    """Start times of the tasks running in this process, for the heartbeat."""

    def __init__(self):
        self._lock = threading.Lock()
        self._running: dict[int, float] = {}

    def started(self) -> None:
        with self._lock:
            self._running[threading.get_ident()] = time.time()

    def finished(self) -> None:
        with self._lock:
            self._running.pop(threading.get_ident(), None)

    def oldest(self) -> tuple[float | None, int]:
        with self._lock:
            if not self._running:
                return None, 0
            return min(self._running.values()), len(self._running)


# syslog priorities of logging levels, for journald.
_JOURNAL_PRIORITY = {"CRITICAL": 2, "ERROR": 3, "WARNING": 4, "INFO": 6, "DEBUG": 7}
JOURNAL_SOCKET = "/run/systemd/journal/socket"


class _JournalFormatter(logging.Formatter):
    """Prefix each line with its priority (journald's "<N>" stream prefix)."""

    def format(self, record):
        priority = _JOURNAL_PRIORITY.get(record.levelname, 6)
        text = super().format(record)
        return "\n".join(f"<{priority}>{line}" for line in text.splitlines())


class JournalHandler(logging.Handler):
    """Each record as one journal entry, over journald's native protocol.

    On stderr journald makes an entry of every line: a traceback became
    thirty entries, all but the first at priority "info". Here the whole
    text (traceback included) is one MESSAGE at the record's PRIORITY. A
    record the socket refuses (too big, journald restarting) goes to stderr
    with the "<N>" prefix on each line instead.
    """

    def __init__(self, identifier: str, fmt: str, path: str = JOURNAL_SOCKET):
        super().__init__()
        self.identifier = identifier
        self.path = path
        self.setFormatter(logging.Formatter(fmt))
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._fallback = logging.StreamHandler(sys.stderr)
        self._fallback.setFormatter(_JournalFormatter(fmt))

    def emit(self, record):
        try:
            fields = {
                "MESSAGE": self.format(record),
                "PRIORITY": str(_JOURNAL_PRIORITY.get(record.levelname, 6)),
                "SYSLOG_IDENTIFIER": self.identifier,
                "CAMPAIGND_LOGGER": record.name,
            }
            self._sock.sendto(_journal_datagram(fields), self.path)
        except OSError:
            self._fallback.emit(record)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)

    def close(self):
        self._sock.close()
        super().close()


def _journal_datagram(fields: dict[str, str]) -> bytes:
    """journald's native format: KEY=value lines, or KEY, a little-endian
    64-bit length and the raw value for values holding a newline."""
    out = bytearray()
    for key, value in fields.items():
        data = value.encode("utf-8", "replace")
        if b"\n" in data:
            out += key.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += key.encode() + b"=" + data + b"\n"
    return bytes(out)


def setup_logging(level: str = "info", role: str = "") -> None:
    tag = f"[{role}] " if role else ""
    if os.environ.get("JOURNAL_STREAM") and os.path.exists(JOURNAL_SOCKET):
        # journald stamps the time itself; the level name stays in the text
        # for those who read it without -o verbose.
        handler: logging.Handler = JournalHandler(
            "campaignd", f"%(levelname)s {tag}%(name)s: %(message)s"
        )
    else:
        handler = logging.StreamHandler(sys.stderr)
        fmt = f"%(asctime)s %(levelname)s {tag}%(name)s: %(message)s"
        handler.setFormatter(logging.Formatter(fmt))
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        handlers=[handler],
        force=True,
    )
