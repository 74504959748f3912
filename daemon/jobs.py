"""Long jobs (downloads, hashing, conversions): their own bounded threads, and cancellation.

Short requests (/api/tags, /api/show, ...) use asyncio's default executor for their bit of file I/O.
Long jobs run here instead, at most `max_jobs` at once, so six pulls cannot starve those requests.
A thread cannot be interrupted, so a job cooperates: it calls `token.check()` between chunks, and
`cancel_all()` (at shutdown) makes that raise `Cancelled`. Each job leaves what it wrote in a state
the next run can use: a download keeps its partial file to resume from, a conversion writes only
under tmp/, which start-up empties.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from daemon.errors import ShuttingDown

T = TypeVar("T")
# Long jobs yield the CPU to requests: on Linux a thread has its own nice value.
JOB_NICENESS = 10


class Cancelled(ShuttingDown):
    """A long job stopped at a chunk boundary because the daemon is shutting down."""


class CancelToken:
    """Set once, from any thread; checked by a job between chunks."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    def check(self) -> None:
        if self._event.is_set():
            raise Cancelled("emberd is shutting down; the job stopped and resumes when it is asked again")

    def wait(self, timeout_s: float) -> None:
        """Wait `timeout_s` (a retry's backoff), or until cancelled: then raise Cancelled at once."""
        self._event.wait(timeout_s)
        self.check()


NEVER_CANCELLED = CancelToken()


def _lower_thread_priority() -> None:
    """Make the calling thread (Linux: not the process) yield the CPU to the event loop and runners.
    A sandbox that forbids setpriority (SystemCallFilter=~@resources) leaves it as it is."""
    if hasattr(os, "setpriority") and hasattr(threading, "get_native_id"):
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), JOB_NICENESS)


class JobExecutor:
    """At most `max_jobs` long jobs at once, each given the executor's cancel token."""

    def __init__(self, max_jobs: int) -> None:
        self._pool = ThreadPoolExecutor(
            max_workers=max_jobs, thread_name_prefix="emberd-job", initializer=_lower_thread_priority
        )
        self.token = CancelToken()
        self._running = 0

    @property
    def running(self) -> int:
        """Jobs submitted and not finished (running or waiting for a thread)."""
        return self._running

    async def run(self, function: Callable[[CancelToken], T]) -> T:
        """Run `function(token)` on a job thread; Cancelled at once if shutdown has begun."""
        self.token.check()
        self._running += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, self._call, function)
        finally:
            self._running -= 1

    def _call(self, function: Callable[[CancelToken], T]) -> T:
        self.token.check()  # a job that waited for a thread while shutdown began never starts
        return function(self.token)

    def cancel_all(self) -> None:
        self.token.cancel()

    def close(self) -> None:
        """Release the threads; each ends at its job's next check."""
        self._pool.shutdown(wait=False)
