"""The scheduler: which models are loaded and who uses them, the one object the rest of the daemon
holds. It composes the jobs of daemon.scheduling (admission, leases, room, renewal, threads,
lifecycle, shutdown) over one registry of runners.

Mechanism only; the decisions (what fits, who is evicted, what options mean) are pure functions in
`memory` and `options`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

from daemon.config import Settings
from daemon.memory import MemoryProbe, decode_tokens_for
from daemon.memory.probe import DeviceProbe
from daemon.metrics import Metrics
from daemon.options import available_cpu_count
from daemon.runner.client import RunnerProcess
from daemon.scheduling.admission import OVERLOADED_MESSAGE, Admission
from daemon.scheduling.leases import Lease, Leases
from daemon.scheduling.lifecycle import Lifecycle, RunnerFactory
from daemon.scheduling.room import Room
from daemon.scheduling.runners import LoadedModel, Runners, RunnerStatus
from daemon.scheduling.shutdown import Shutdown
from daemon.store import ModelStore, StoredModel

__all__ = [
    "OVERLOADED_MESSAGE",
    "Lease",
    "LoadedModel",
    "RunnerFactory",
    "RunnerStatus",
    "Scheduler",
    "decode_tokens_for",
]


class Scheduler:
    def __init__(
        self,
        settings: Settings,
        store: ModelStore,
        runner_factory: RunnerFactory,
        memory_probe: MemoryProbe,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        cpus: int | None = None,
        metrics: Metrics | None = None,
        device_probe: DeviceProbe | None = None,
    ) -> None:
        cpus = cpus or available_cpu_count()
        metrics = metrics or Metrics()
        self._store = store
        self._runners = Runners()
        self._admission = Admission(settings.max_queue)
        self._lifecycle = Lifecycle(settings, self._runners, runner_factory, metrics, clock, cpus)
        room = Room(settings, self._runners, self._lifecycle, memory_probe, metrics, device_probe)
        self._leases = Leases(settings, store, self._runners, self._lifecycle, room, cpus, clock, wall_clock)
        self._shutdown = Shutdown(self._admission, self._runners, self._lifecycle, clock)

    # -- queries ---------------------------------------------------------------------------------

    def loaded(self) -> list[LoadedModel]:
        return list(self._runners.loaded.values())

    def measured(self) -> list[LoadedModel]:
        """The loaded models, each measured now."""
        for entry in self._runners.loaded.values():
            entry.refresh()
        return self.loaded()

    @property
    def admitted(self) -> int:
        return self._admission.admitted

    # -- requests --------------------------------------------------------------------------------

    def admit(self) -> AbstractAsyncContextManager[None]:
        """Count a request from acceptance to answer; refuse it before any work when full."""
        return self._admission.admit()

    def lease(
        self,
        name: str | StoredModel,
        options: dict[str, Any],
        keep_alive_s: float | None,
        longest_input_tokens: int = 0,
    ) -> AbstractAsyncContextManager[Lease]:
        """Hold a loaded runner for a model (its name, or the StoredModel the caller already read)
        for the duration of the block, with memory set aside for the largest decode inputs of up to
        `longest_input_tokens` tokens can cause."""
        return self._leases.lease(name, options, keep_alive_s, longest_input_tokens)

    def lease_if_loaded(self, model: StoredModel) -> AbstractAsyncContextManager[RunnerProcess | None]:
        """Hold the model's runner if it is loaded and serving, without ever loading it; else None."""
        return self._leases.lease_if_loaded(model)

    # -- unloading and the stop ------------------------------------------------------------------

    async def unload(self, name: str) -> bool:
        """Unload a model now (after its in-flight requests); False if it was not loaded."""
        return await self.unload_canonical(self._store.get(name).name)

    async def unload_canonical(self, canonical: str, reason: str = "requested") -> bool:
        """Unload by canonical name, whether or not the store still has it (used by delete)."""
        return await self._lifecycle.unload(canonical, reason)

    def stop_deadline_s(self, timeout_s: float) -> float:
        """The one deadline of the whole stop, in loop time: fixed by the first caller (the shutdown
        sequence), and the same for every later part of the stop."""
        return self._shutdown.deadline_s(timeout_s)

    async def close(self, timeout_s: float) -> None:
        """Stop admitting; let admitted requests finish, then stop every runner, draining ones
        included, all within `timeout_s` (or the stop's deadline, if one is already set). A runner
        still busy at the end is killed, and its requests get ShuttingDown."""
        await self._shutdown.close(timeout_s)
