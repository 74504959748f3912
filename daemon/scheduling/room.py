"""Room for a runner or its growth: what fits now beside what every runner holds and was promised,
idle runners renewed or evicted to make it, and a wait for busy ones up to the request's deadline."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from daemon.config import Settings
from daemon.errors import InsufficientMemory, InvalidInput, MemoryBusy
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
from daemon.memory.offload import Device, device_capacity_bytes, device_room_bytes, most_layers_within
from daemon.memory.probe import DeviceProbe
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
        self,
        settings: Settings,
        runners: Runners,
        lifecycle: Lifecycle,
        memory_probe: MemoryProbe,
        metrics: Metrics,
        device_probe: DeviceProbe | None = None,
    ) -> None:
        self._settings = settings
        self._runners = runners
        self._lifecycle = lifecycle
        self._memory_probe = memory_probe
        self._metrics = metrics
        self._device_probe = device_probe or DeviceProbe()
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

    def _on_device(self, device: Device) -> list[LoadedModel]:
        """The runners alive with layers on `device`."""
        return [e for e in self._runners.alive() if e.device is not None and e.device.index == device.index]

    def device_room(self, device: Device) -> int:
        """What a new runner may put on `device` now, beside what the runners hold and were promised
        there (see offload.device_room_bytes)."""
        counted = sum(e.device_bytes for e in self._on_device(device))
        promised = sum(size for index, size in self._runners.loading_device.values() if index == device.index)
        return device_room_bytes(device, self._settings.max_gpu_memory_bytes, counted, promised)

    async def place(
        self,
        name: str,
        main_gpu: int,
        wanted_layers: int,
        exact: bool,
        part_bytes: Callable[[int], int],
        deadline_s: float,
    ) -> tuple[Device | None, int]:
        """The GPU and the layers a new runner offloads (None, 0: the CPU only, also when no layer
        fits). `wanted_layers` fits as it fits; else idle runners on the device are unloaded when
        that makes room for all of it. Past that, automatic offload (`exact` False) takes as many
        layers as fit now, the rest on the CPU; an exact request waits for busy runners up to the
        deadline (MemoryBusy), and is refused at once (507) when even an empty device could not
        hold it. The caller promises the part in the same step (Runners.loading_device)."""
        while True:
            gpus = await self._device_probe.gpus() if wanted_layers > 0 else []
            if not gpus:
                return None, 0
            if not 0 <= main_gpu < len(gpus):
                raise InvalidInput(f"main_gpu {main_gpu}: this machine's llama.cpp sees {len(gpus)} GPU(s)")
            device = gpus[main_gpu]
            wanted_bytes = part_bytes(wanted_layers)
            async with holding(self._lock, deadline_s, f"room for {name}", self._settings.load_timeout_s):
                room = self.device_room(device)
                if wanted_bytes <= room:
                    return device, wanted_layers
                holders = self._on_device(device)
                loaded = self._runners.loaded
                candidates = [
                    EvictionCandidate(e.name, e.refcount > 0, e.last_used_s, e.device_bytes)
                    for e in holders
                    if loaded.get(e.name) is e  # not one already leaving
                ]
                # Whether unloading every runner on the device could make room (busy ones go idle in time).
                freeable_bytes = room + sum(e.device_bytes for e in holders)
                capacity_bytes = device_capacity_bytes(device, self._settings.max_gpu_memory_bytes)
                ever = wanted_bytes <= min(freeable_bytes, capacity_bytes)
                victim = pick_victim(candidates) if ever else None
                if victim is not None:
                    log.info("unloading %s to make room on %s for %s", victim.name, device.name, name)
                    stopped = self._lifecycle.retire(loaded[victim.name], "evicted")
                    timeout_s = self._settings.load_timeout_s
                    await until(deadline_s, asyncio.shield(stopped), f"{victim.name} to stop", timeout_s)
                    continue  # read the device again: its free memory moved
                if not exact:
                    layers = most_layers_within(room, wanted_layers, part_bytes)
                    return (device, layers) if layers else (None, 0)
                if not ever:
                    raise InsufficientMemory(self._device_report(name, device, wanted_layers, wanted_bytes, room))
                changed = self._runners.memory_changed
            try:
                async with asyncio.timeout_at(deadline_s):
                    await changed.wait()
            except TimeoutError:
                raise MemoryBusy(
                    self._device_report(name, device, wanted_layers, wanted_bytes, room)
                    + f"; waited {self._settings.load_timeout_s:g}s (load_timeout) for busy models"
                ) from None

    def _device_report(self, name: str, device: Device, layers: int, wanted_bytes: int, room: int) -> str:
        """The numbers behind a refusal on a device: needed, available, the cap, who holds it."""
        parts = [
            f"{name} needs about {wanted_bytes / MIB:.0f} MiB on {device.name} for {layers} layers "
            f"but only {room / MIB:.0f} MiB is available there"
        ]
        free_mib, total_mib = device.free_bytes / MIB, device.total_bytes / MIB
        parts.append(f"{device.name} reports {free_mib:.0f} MiB free of {total_mib:.0f} MiB")
        if self._settings.max_gpu_memory_bytes:
            parts.append(f"max_gpu_memory is {self._settings.max_gpu_memory_bytes / MIB:.0f} MiB")
        holders = [
            f"{e.name} {e.device_bytes / MIB:.0f} MiB ({'busy' if e.refcount else 'idle'})"
            for e in self._on_device(device)
        ]
        parts.append("on the device: " + (", ".join(holders) if holders else "nothing"))
        parts.append("num_gpu -1 (automatic) offloads the layers that fit")
        return "; ".join(parts)

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
