"""Room for a runner or its growth: what fits now beside what every runner holds and was promised,
idle runners renewed or evicted to make it, and a wait for busy ones up to the request's deadline."""

from __future__ import annotations

import asyncio
import logging

from daemon.config import Settings
from daemon.errors import InsufficientMemory, MemoryBusy
from daemon.memory import (
    MIB,
    EvictionCandidate,
    MemoryProbe,
    MemorySnapshot,
    budget_bytes,
    could_ever_fit,
    fits,
    pick_victim,
)
from daemon.metrics import Metrics
from daemon.scheduling.lifecycle import Lifecycle
from daemon.scheduling.renewal import pick_renewal, renew
from daemon.scheduling.runners import LoadedModel, Runners
from daemon.scheduling.waits import holding, until

# One logger for the whole scheduler, named as before it was split into jobs: log filters keep working.
log = logging.getLogger("daemon.scheduler")
GIB = 1024 * MIB


class Room:
    def __init__(
        self, settings: Settings, runners: Runners, lifecycle: Lifecycle, memory_probe: MemoryProbe, metrics: Metrics
    ) -> None:
        self._settings = settings
        self._runners = runners
        self._lifecycle = lifecycle
        self._memory_probe = memory_probe
        self._metrics = metrics
        # One caller at a time evicts or renews to make room; it is never held while waiting on a
        # request (see make).
        self._lock = asyncio.Lock()

    def check(self, required_bytes: int) -> tuple[bool, MemorySnapshot, int]:
        """Whether `required_bytes` more fits now: (fits, the snapshot, the budget). Runners are
        measured first; what they may still grow to within their allowance, and starting runners,
        are promised and not handed out again."""
        runners = self._runners.alive()
        for entry in runners:
            entry.refresh()
        snapshot = self._memory_probe.snapshot()
        loading = sum(self._runners.loading.values())
        promised = loading + sum(max(0, e.counted_bytes - e.measured.held_bytes) for e in runners)
        cached_weights = sum(e.model.size_bytes for e in runners if e.params.use_mmap)
        budget = budget_bytes(snapshot, self._settings.memory_reserve_mib * MIB, promised, cached_weights)
        held = loading + sum(e.counted_bytes for e in runners)
        return fits(required_bytes, budget, held, self._settings.max_memory_bytes), snapshot, budget

    async def make(self, name: str, required_bytes: int, deadline_s: float, growing: LoadedModel | None = None) -> None:
        """Return once `required_bytes` fits; the caller sets it aside in the same step. Idle runners
        that grew give memory back first, then idle models are unloaded (one caller at a time);
        if busy runners or runners on their way out hold the memory, wait for them with no lock
        held, up to the deadline (MemoryBusy); refuse at once, evicting nothing, if it never could
        fit. `growing` is the runner that needs the room: it is neither renewed nor evicted for itself."""
        while True:
            async with holding(self._lock, deadline_s, f"room for {name}", self._settings.load_timeout_s):
                shortfall = await self._evict_for(name, required_bytes, deadline_s, growing)
                changed = self._runners.memory_changed  # in the step that found no room: no change is missed
            if shortfall is None:
                return
            try:
                async with asyncio.timeout_at(deadline_s):
                    await changed.wait()
            except TimeoutError:
                snapshot, budget = shortfall
                raise MemoryBusy(
                    self._memory_report(name, required_bytes, snapshot, budget)
                    + f"; waited {self._settings.load_timeout_s:g}s (load_timeout) for busy models"
                ) from None

    async def _evict_for(
        self, name: str, required_bytes: int, deadline_s: float, growing: LoadedModel | None
    ) -> tuple[MemorySnapshot, int] | None:
        """Renew or unload idle runners until `required_bytes` fits (None), or only busy runners and
        runners on their way out are left to free it: the snapshot and budget of that shortfall.
        Waits only on idle runners (a renewal, an exit), never on a request."""
        max_loaded = self._settings.max_loaded_models
        load_timeout_s = self._settings.load_timeout_s
        loaded = self._runners.loaded
        while True:
            room, snapshot, budget = self.check(required_bytes)
            count_ok = growing is not None or max_loaded == 0 or len(loaded) + len(self._runners.loading) < max_loaded
            if room and count_ok:
                return None
            others = [e for e in loaded.values() if e is not growing]
            renewal = pick_renewal(others)
            if renewal is not None and not room:
                await until(deadline_s, renew(renewal, self._metrics), f"room for {name}", load_timeout_s)
                continue
            candidates = [EvictionCandidate(e.name, e.refcount > 0, e.last_used_s, e.counted_bytes) for e in others]
            leaving = [EvictionCandidate(e.name, True, e.last_used_s, e.counted_bytes) for e in self._runners.leaving]
            if not could_ever_fit(required_bytes, budget, candidates + leaving, self._max_memory_left(growing)):
                raise InsufficientMemory(self._memory_report(name, required_bytes, snapshot, budget))
            victim = pick_victim(candidates)
            if victim is None:
                return snapshot, budget
            log.info("unloading %s to make room for %s", victim.name, name)
            stopped = self._lifecycle.retire(loaded[victim.name], "evicted")
            await until(deadline_s, asyncio.shield(stopped), f"{victim.name} to stop", load_timeout_s)

    def _max_memory_left(self, growing: LoadedModel | None) -> int:
        """max_memory as far as making room can go: a growing runner keeps what it holds."""
        max_memory = self._settings.max_memory_bytes
        if not max_memory or growing is None:
            return max_memory
        return max(1, max_memory - growing.counted_bytes)

    def _memory_report(self, name: str, required_bytes: int, snapshot: MemorySnapshot, budget: int) -> str:
        """The numbers behind a refusal: what is needed, what is available, who holds it."""
        parts = [f"{name} needs about {required_bytes / GIB:.2f} GiB but only {budget / GIB:.2f} GiB is available"]
        if snapshot.cgroup_limit_bytes is not None:
            parts.append(
                f"the service's cgroup limit is {snapshot.cgroup_limit_bytes / GIB:.2f} GiB "
                f"with {snapshot.cgroup_used_bytes / GIB:.2f} GiB in use"
            )
        if self._settings.max_memory_bytes:
            parts.append(f"max_memory is {self._settings.max_memory_bytes / GIB:.2f} GiB")
        holders = [
            f"{e.name} {e.counted_bytes / GIB:.2f} GiB ({'busy' if e.refcount else 'idle'})"
            for e in self._runners.loaded.values()
        ] + [f"{e.name} {e.counted_bytes / GIB:.2f} GiB ({e.status.value})" for e in self._runners.leaving]
        holders += [f"{other} {size / GIB:.2f} GiB (loading)" for other, size in self._runners.loading.items()]
        parts.append("loaded: " + (", ".join(holders) if holders else "nothing"))
        return "; ".join(parts)
