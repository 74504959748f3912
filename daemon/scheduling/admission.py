"""Admission: a request is counted from acceptance to answer, and refused before any work when the
queue is full or the daemon is stopping."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from daemon.errors import Overloaded, ShuttingDown

OVERLOADED_MESSAGE = "server busy, please try again.  maximum pending requests exceeded"


class Admission:
    def __init__(self, max_queue: int) -> None:
        self._max_queue = max_queue
        self.admitted = 0
        self.drained = asyncio.Event()  # set while no request is admitted
        self.drained.set()
        self.shutting_down = False  # the stop has begun: no new request

    @contextlib.asynccontextmanager
    async def admit(self) -> AsyncIterator[None]:
        """Count a request from acceptance to answer; refuse it before any work when full."""
        if self.shutting_down:
            raise ShuttingDown("server is shutting down")
        if self.admitted >= self._max_queue:
            raise Overloaded(OVERLOADED_MESSAGE)
        self.admitted += 1
        self.drained.clear()
        try:
            yield
        finally:
            self.admitted -= 1
            if self.admitted == 0:
                self.drained.set()
