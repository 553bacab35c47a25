"""Prometheus metrics shared by every campaignd process.

Workers increment these; the web role serves them on GET /metrics. Under the
supervisor every child runs with PROMETHEUS_MULTIPROC_DIR set (the supervisor
creates and empties that directory), so prometheus_client writes each value to
a per-process mmap file and the web role adds them up at scrape time. Without
that variable (a role run alone, tests) the plain in-process registry is used.

The metric objects are module-level on purpose: that is how prometheus_client
registers them, and each process gets its own copy after exec.

Counters and histograms only, no Gauge: a dead process's counter files must
stay (its counts still count), and no live gauge file needs removing when a
process dies, so the supervisor never calls `mark_process_dead`. A live-mode
Gauge added here would need that call back in `Supervisor._child_gone`. The
supervisor counts too (the rows a dead worker's lease release makes
unconfirmed): `campaignd run` sets PROMETHEUS_MULTIPROC_DIR in its own
environment before the task code that counts is imported.

A full disk must not kill a process through its metrics. prometheus_client
grows those files with truncate() (a sparse file) and writes to them through
mmap, so the first write to an unbacked page on a full file system is a
SIGBUS, not an error: the web child used to die of it in a loop. Here the
files get real blocks (posix_fallocate) before any page is written, so a full
disk is an OSError at the moment a file is created or grown; a value that gets
one is kept in process memory instead (missing from /metrics, logged once).
"""

from __future__ import annotations

import functools
import logging
import os
import struct

from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client import REGISTRY
from prometheus_client import CollectorRegistry
from prometheus_client import Counter
from prometheus_client import Histogram
from prometheus_client import generate_latest
from prometheus_client import multiprocess
from prometheus_client import values as _values
from prometheus_client.mmap_dict import _INITIAL_MMAP_SIZE
from prometheus_client.mmap_dict import MmapedDict

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = CONTENT_TYPE_LATEST


class AllocatedMmapedDict(MmapedDict):
    """prometheus_client's MmapedDict whose file never has unbacked pages."""

    def __init__(self, filename, read_mode=False):
        if not read_mode:
            _allocate_new(filename)
        super().__init__(filename, read_mode)

    def _init_value(self, key):
        # The same size computation as MmapedDict._init_value, which then
        # truncates the file to `capacity`: allocate that first.
        encoded = key.encode("utf-8")
        padded = len(encoded) + (8 - (len(encoded) + 4) % 8)
        needed = self._used + struct.calcsize(f"i{padded}sdd")
        capacity = self._capacity
        while needed > capacity:
            capacity *= 2
        if capacity > self._capacity:
            os.posix_fallocate(self._f.fileno(), 0, capacity)
        super()._init_value(key)


def _allocate_new(filename: str) -> None:
    """Create `filename` with its first blocks allocated (OSError when full)."""
    fd = os.open(filename, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if os.fstat(fd).st_size == 0:
            try:
                os.posix_fallocate(fd, 0, _INITIAL_MMAP_SIZE)
            except OSError:
                # An empty file would break every scrape: leave none.
                if os.fstat(fd).st_size == 0:
                    os.unlink(filename)
                raise
    finally:
        os.close(fd)


_warned_full = False


def _safe_value_class(mmaped):
    """A ValueClass: a file-backed value, or one in memory when the file cannot
    be created or grown (full disk)."""

    def value(*args, **kwargs):
        global _warned_full
        try:
            return mmaped(*args, **kwargs)
        except OSError as exc:
            if not _warned_full:
                _warned_full = True
                log.error(
                    "metrics: cannot write %s (%s): new values are kept "
                    "in memory, not in /metrics",
                    os.environ.get(MULTIPROC_ENV),
                    exc,
                )
            return _values.MutexValue(*args, **kwargs)

    value._multiprocess = True
    return value


if getattr(_values.ValueClass, "_multiprocess", False) and not getattr(
    _values.ValueClass, "_campaignd_safe", False
):
    _values.MmapedDict = AllocatedMmapedDict
    _values.ValueClass = _safe_value_class(_values.ValueClass)
    _values.ValueClass._campaignd_safe = True

# Webhook event names we count under their own label; anything else (payloads
# are attacker-controlled when no secret is set) is counted as "other", so the
# label set stays small.
KNOWN_EVENTS = frozenset(
    {
        "message:in:new",
        "message:out:new",
        "message:out:sent",
        "message:out:ack",
        "message:out:failed",
        "message:out:delivered",
        "message:out:read",
        "message:update",
        "message:reaction",
        "number:session",
        "message",
        "status:sent",
        "status:delivered",
        "status:read",
        "status:failed",
        "errors",
        "unknown",
    }
)

SENDS = Counter(
    "campaignd_sends_total",
    "Provider send attempts by message kind (1, 2) and outcome "
    "(sent, retry, failed, skipped).",
    ["kind", "outcome"],
)
RETRIES = Counter(
    "campaignd_retries_total",
    "Sends scheduled for another attempt, by message kind and reason "
    "(timeout, http_429, http_5xx, lease_expired, ...).",
    ["kind", "reason"],
)
WEBHOOK_EVENTS = Counter(
    "campaignd_webhook_events_total",
    "Webhook events stored by the web role (duplicates excluded), by provider "
    "and event type.",
    ["provider", "event"],
)
WEBHOOK_REQUESTS = Counter(
    "campaignd_webhook_requests_total",
    "Webhook POSTs by provider and outcome (stored, duplicate, unauthorized, "
    "invalid, unavailable).",
    ["provider", "outcome"],
)
WEBHOOK_COMMIT_SECONDS = Histogram(
    "campaignd_webhook_commit_seconds",
    "Group commits of the web role's webhook event writer: from taking the "
    "waiting requests to their commit. The count is the commits made; webhook "
    "requests (stored and duplicate) over it, the requests a commit.",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
STATUS_UPDATES = Counter(
    "campaignd_status_updates_total",
    "Delivery status updates applied to messages, by new status.",
    ["status"],
)
INTERACTIONS = Counter(
    "campaignd_interactions_total",
    "Replies from contacts, by outcome (message2, opted_out, late, unknown, ...).",
    ["outcome"],
)
UNCONFIRMED = Counter(
    "campaignd_unconfirmed_sends_total",
    "Sends whose outcome was unknown, by what became of them: recorded (a new "
    "unconfirmed attempt), confirmed_status, confirmed_reply, resent, failed.",
    ["outcome"],
)
TASK_SECONDS = Histogram(
    "campaignd_task_seconds",
    "Duration of queue tasks, by task name.",
    ["task"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
HTTP_SECONDS = Histogram(
    "campaignd_http_request_seconds",
    "Duration of HTTP requests served by the web role, by route and status class.",
    ["route", "status"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)


@functools.lru_cache(maxsize=1024)
def labelled(metric, *values: str):
    """`metric.labels(*values)`, looked up once: a lookup costs microseconds,
    and every webhook counts three. The label sets are bounded (providers,
    outcomes, route templates, status classes), the cache too."""
    return metric.labels(*values)


def event_label(event_type: str) -> str:
    """The WEBHOOK_EVENTS label for an event type (bounded cardinality)."""
    return event_type if event_type in KNOWN_EVENTS else "other"


def multiprocess_enabled() -> bool:
    return bool(os.environ.get(MULTIPROC_ENV))


def render(extra_collectors=()) -> bytes:
    """The Prometheus text of every process's metrics plus `extra_collectors`.

    The extra collectors (queue depths, computed at scrape time) live in a
    throwaway registry so nothing global is mutated per scrape.
    """
    if multiprocess_enabled():
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        base = generate_latest(registry)
    else:
        base = generate_latest(REGISTRY)
    if not extra_collectors:
        return base
    extra = CollectorRegistry()
    for collector in extra_collectors:
        extra.register(collector)
    return base + generate_latest(extra)
