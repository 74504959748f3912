"""A request's waits in the scheduler: each ends at the request's deadline, with MemoryBusy (503:
try again) past it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

from daemon.errors import MemoryBusy

T = TypeVar("T")


async def until(deadline_s: float, awaitable: Awaitable[T], what: str, load_timeout_s: float) -> T:
    """Wait for `awaitable` up to a request's deadline (loop time); past it, MemoryBusy naming
    `what` was waited for, and the load_timeout that set the deadline."""
    try:
        async with asyncio.timeout_at(deadline_s):
            return await awaitable
    except TimeoutError:
        raise MemoryBusy(f"waited {load_timeout_s:g}s (load_timeout) for {what}") from None


@contextlib.asynccontextmanager
async def holding(lock: asyncio.Lock, deadline_s: float, what: str, load_timeout_s: float) -> AsyncIterator[None]:
    """Hold `lock` for the block, waiting for it no later than the deadline."""
    await until(deadline_s, lock.acquire(), what, load_timeout_s)
    try:
        yield
    finally:
        lock.release()
