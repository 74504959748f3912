"""The scheduler's stop: one deadline for all of it, admitted requests drained first, then every
runner stopped, and one still busy at the deadline killed."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from daemon.scheduling.admission import Admission
from daemon.scheduling.lifecycle import Lifecycle
from daemon.scheduling.runners import Runners


class Shutdown:
    def __init__(
        self, admission: Admission, runners: Runners, lifecycle: Lifecycle, clock: Callable[[], float]
    ) -> None:
        self._admission = admission
        self._runners = runners
        self._lifecycle = lifecycle
        self._clock = clock
        self._deadline_s: float | None = None  # the one deadline of the whole stop (loop time)

    def deadline_s(self, timeout_s: float) -> float:
        """The one deadline of the whole stop, in loop time: fixed by the first caller (the shutdown
        sequence), and the same for every later part of the stop."""
        deadline_s = asyncio.get_running_loop().time() + timeout_s
        if self._deadline_s is None or deadline_s < self._deadline_s:
            self._deadline_s = deadline_s
        return self._deadline_s

    async def close(self, timeout_s: float) -> None:
        """Stop admitting; let admitted requests finish, then stop every runner, draining ones
        included, all within `timeout_s` (or the stop's deadline, if one is already set). A runner
        still busy at the end is killed, and its requests get ShuttingDown."""
        self._admission.shutting_down = True
        loop = asyncio.get_running_loop()
        deadline_s = self.deadline_s(timeout_s)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout_at(deadline_s):
                await self._admission.drained.wait()
        lifecycle = self._lifecycle
        for entry in list(self._runners.loaded.values()):
            lifecycle.leave(entry)
        lifecycle.closed = True
        runners = list(self._runners.leaving)  # loaded until now, draining, and stopping
        remaining_s = max(0.0, deadline_s - loop.time())
        await asyncio.gather(*(lifecycle.stop(entry, "shutdown", remaining_s, self._clock()) for entry in runners))
        # The stops on their own tasks end once their runners' requests are answered; one that has
        # not by the deadline is cancelled, not waited for.
        background = list(lifecycle.background)
        if background:
            _done, pending = await asyncio.wait(background, timeout=max(0.0, deadline_s - loop.time()))
            for task in pending:
                task.cancel()
