"""The supervisor's background jobs: database work (lease release, alert
rows, status figures) and alert webhooks run in small thread pools, and
their results come back to the loop, so it never waits on a database lock
or a slow receiver.

`BackgroundJobs` is a mixin of `Supervisor`; a finished job writes a byte to
the jobs pipe (`wake`), which wakes the loop's selector.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os

log = logging.getLogger("daemon.supervision.supervisor")  # one name for its whole log


class BackgroundJobs:
    """Submit work off the loop; hand results back on it."""

    _jobs: list[tuple[concurrent.futures.Future, object]]
    _jobs_w: int

    def _submit(self, pool, fn, *args, on_done=None):
        """Run fn(*args) in a pool; on_done(result) later runs on the loop."""
        future = pool.submit(fn, *args)
        self._jobs.append((future, on_done))
        future.add_done_callback(lambda _f: wake(self._jobs_w))
        return future

    def collect_jobs(self) -> None:
        """Hand finished background results to their callbacks (loop thread)."""
        done = [job for job in self._jobs if job[0].done()]
        for job in done:
            self._jobs.remove(job)
            future, on_done = job
            try:
                result = future.result()
            except Exception as exc:  # noqa: BLE001 - a job's failure is logged
                log.warning("background job failed: %s", exc)
                result = None
            if on_done is not None:
                on_done(result)


def thread_pool(name: str) -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)


def nonblocking_pipe() -> tuple[int, int]:
    r, w = os.pipe()
    os.set_blocking(r, False)
    os.set_blocking(w, False)
    return r, w


def wake(fd: int) -> None:
    try:
        os.write(fd, b"\0")
    except (BlockingIOError, OSError):  # full (a wakeup is pending) or closed
        pass
