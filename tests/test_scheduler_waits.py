"""The scheduler's waits: none under a lock, none without a deadline, and one budget for the stop.

Runners are stand-ins here (no process): a request is held in flight by holding its lease until an
event, so each case is reached by steps, not by timing. A stand-in's pid measures nothing, so the
scheduler counts each runner by its load's estimate, and max_memory decides what fits.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from daemon.config import Settings
from daemon.errors import MemoryBusy
from daemon.memory import MemorySnapshot
from daemon.scheduler import Scheduler
from daemon.store import ModelStore
from tests.conftest import wait_until

NO_SUCH_PID = 2**31 - 1  # above any pid_max: measuring it finds no process
GUARD_S = 10.0  # a wait the fix makes short; the code before the fix waited here for minutes or forever


class StandInRunner:
    """What the scheduler uses of a RunnerProcess. `busy`: like a runner still answering a request,
    it does not exit when asked to stop, only when killed at the stop's timeout."""

    def __init__(self, label: str, busy: bool) -> None:
        self.label = label
        self.busy = busy
        self.pid = NO_SUCH_PID
        self.facts = None
        self.largest_decode_tokens = 0
        self.unused_quick_lane_tokens = 0
        self.stopping = False
        self.killed = False
        self.exited = asyncio.Event()
        self._callbacks: list[Callable[[Any], None]] = []

    @property
    def alive(self) -> bool:
        return not self.exited.is_set()

    def on_exit(self, callback: Callable[[Any], None]) -> None:
        self._callbacks.append(callback)

    def set_threads(self, threads: int) -> None:
        pass

    def set_batch_tokens(self, tokens: int) -> None:
        pass

    async def renew_context(self) -> None:
        self.largest_decode_tokens = 0

    async def stop(self, timeout_s: float) -> None:
        self.stopping = True
        if not self.busy:
            self._exit()
            return
        try:
            async with asyncio.timeout(timeout_s):
                await self.exited.wait()
        except TimeoutError:
            await self.kill()

    async def kill(self) -> None:
        self.stopping = self.killed = True
        self._exit()

    def _exit(self) -> None:
        if not self.exited.is_set():
            self.exited.set()
            for callback in self._callbacks:
                callback(self)


@dataclass
class StandIns:
    """A runner factory that records the runners it starts."""

    busy: set[str] = field(default_factory=set)  # models whose runners do not exit when asked
    started: list[StandInRunner] = field(default_factory=list)

    async def __call__(self, model: Any, params: Any) -> Any:
        runner = StandInRunner(model.name, model.name in self.busy)
        self.started.append(runner)
        return runner


class CountingMemory:
    """Plenty of memory; counts the scheduler's looks at it (each look is a step it took)."""

    def __init__(self) -> None:
        self.looks = 0

    def snapshot(self) -> MemorySnapshot:
        self.looks += 1
        return MemorySnapshot(1 << 50, 1 << 50)


def make_scheduler(settings: Settings, store: ModelStore, runners: StandIns, memory: CountingMemory) -> Scheduler:
    return Scheduler(settings, store, runners, memory)  # type: ignore[arg-type]


def loaded_runners(scheduler: Scheduler) -> list[Any]:
    return [loaded.runner for loaded in scheduler.loaded()]


@pytest.fixture
def store(tmp_path: Path, tiny_gguf: Path) -> ModelStore:
    store = ModelStore(tmp_path)
    store.open()
    store.create("a", tiny_gguf)
    store.create("b", tiny_gguf)
    return store


async def counted_sizes(settings: Settings, store: ModelStore, decode_tokens: int) -> tuple[int, int]:
    """What the scheduler counts for a model loaded by a short request, and what a decode of
    `decode_tokens` adds to it (the same for a and b: one file)."""
    scheduler = make_scheduler(settings, store, StandIns(), CountingMemory())
    try:
        async with scheduler.lease("a", {}, -1) as lease:
            counted = lease.loaded.counted_bytes
            return counted, lease.loaded.counted_bytes_for(decode_tokens) - counted
    finally:
        await scheduler.close(1.0)


async def hold(
    scheduler: Scheduler,
    name: str,
    release: asyncio.Event,
    entered: asyncio.Event | None = None,
    options: dict[str, Any] | None = None,
    longest_input_tokens: int = 0,
) -> StandInRunner:
    """A request in flight: holds its lease until `release`."""
    async with scheduler.lease(name, options or {}, -1, longest_input_tokens) as lease:
        if entered is not None:
            entered.set()
        await release.wait()
        runner: StandInRunner = lease.loaded.runner  # type: ignore[assignment]
        return runner


async def test_two_requests_that_need_room_do_not_wait_for_each_other(tmp_path: Path, store: ModelStore) -> None:
    # Decodes of 8 tokens by default; a 64-token input (the tiny model's context) needs more room.
    base = Settings(home=tmp_path, batch_tokens=8, memory_reserve_mib=0)
    counted, growth = await counted_sizes(base, store, 64)
    assert counted > 0 and growth > 0
    # Both models fit, and one of them grown, but not both models with one grown.
    memory = CountingMemory()
    settings = Settings(home=tmp_path, batch_tokens=8, memory_reserve_mib=0, max_memory_bytes=2 * counted + growth - 1)
    scheduler = make_scheduler(settings, store, StandIns(), memory)
    releases = [asyncio.Event() for _ in range(3)]
    entered = [asyncio.Event() for _ in range(3)]
    tasks: list[asyncio.Task[StandInRunner]] = []
    try:
        for name in ("a", "b"):
            async with scheduler.lease(name, {}, -1):
                pass
        tasks.append(asyncio.create_task(hold(scheduler, "b", releases[0], entered[0])))  # b busy
        await entered[0].wait()
        looks = memory.looks
        # A long input for a: b is busy, so it waits for room.
        tasks.append(asyncio.create_task(hold(scheduler, "a", releases[1], entered[1], longest_input_tokens=64)))
        await wait_until(lambda: memory.looks > looks)
        assert not entered[1].is_set()
        # A long input for b. Before the fix, the first held a and the load lock while it waited for
        # b to go idle, and this one held b while it waited for that lock: neither got its room
        # before load_timeout. Now the first holds nothing while it waits: a is idle, and evicted.
        tasks.append(asyncio.create_task(hold(scheduler, "b", releases[2], entered[2], longest_input_tokens=64)))
        async with asyncio.timeout(GUARD_S):
            await entered[2].wait()
            assert [loaded.name for loaded in scheduler.loaded()] == ["b:latest"]
            # Once b is idle, the long input for a gets its turn: b evicted, a loaded again.
            releases[0].set()
            releases[2].set()
            await entered[1].wait()
            assert [loaded.name for loaded in scheduler.loaded()] == ["a:latest"]
            releases[1].set()
            await asyncio.gather(*tasks)
    finally:
        for release in releases:
            release.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        await scheduler.close(1.0)


async def test_a_reload_waiting_for_a_long_request_does_not_hold_up_a_cold_load(
    tmp_path: Path, store: ModelStore
) -> None:
    runners = StandIns()
    scheduler = make_scheduler(Settings(home=tmp_path), store, runners, CountingMemory())
    long_request, long_in = asyncio.Event(), asyncio.Event()
    tasks: list[asyncio.Task[StandInRunner]] = []
    try:
        tasks.append(asyncio.create_task(hold(scheduler, "a", long_request, long_in)))
        await long_in.wait()
        [first_a] = runners.started
        # Other placement: a new runner for a. Before the fix it waited, holding the load lock, for
        # the long request to end, and so did the first request to b (67.5 s, live).
        reloaded, reload_in = asyncio.Event(), asyncio.Event()
        tasks.append(asyncio.create_task(hold(scheduler, "a", reloaded, reload_in, options={"use_mmap": False})))
        await wait_until(lambda: first_a not in loaded_runners(scheduler))
        async with asyncio.timeout(GUARD_S):
            async with scheduler.lease("b", {}, -1) as lease:
                assert lease.loaded.name == "b:latest"
            await reload_in.wait()
        reloaded.set()
        assert await tasks[-1] is not first_a
        assert first_a.alive  # it still answers its request
        long_request.set()
        async with asyncio.timeout(GUARD_S):
            await first_a.exited.wait()  # then it exits
        assert not first_a.killed
    finally:
        long_request.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        await scheduler.close(1.0)


async def test_a_request_waiting_on_a_stuck_runner_gets_memory_busy_at_its_deadline(
    tmp_path: Path, store: ModelStore
) -> None:
    counted, _growth = await counted_sizes(Settings(home=tmp_path, memory_reserve_mib=0), store, 0)
    # Room for one runner of the model, not for two; a deadline short enough for a test.
    settings = Settings(home=tmp_path, memory_reserve_mib=0, max_memory_bytes=counted * 3 // 2, load_timeout_s=0.2)
    scheduler = make_scheduler(settings, store, StandIns(), CountingMemory())
    stuck, stuck_in = asyncio.Event(), asyncio.Event()
    held = asyncio.create_task(hold(scheduler, "a", stuck, stuck_in))  # never answered until the end
    try:
        await stuck_in.wait()
        # The reload needs the stuck runner's memory. Before the fix it waited for that runner to
        # go idle with no deadline at all (holding the load lock).
        async with asyncio.timeout(GUARD_S):
            with pytest.raises(MemoryBusy, match="load_timeout"):
                async with scheduler.lease("a", {"use_mmap": False}, -1):
                    pass
    finally:
        stuck.set()
        await held
        await scheduler.close(1.0)


async def test_close_stops_a_draining_runner_and_returns_within_its_budget(tmp_path: Path, store: ModelStore) -> None:
    runners = StandIns(busy={"a:latest"})
    scheduler = make_scheduler(Settings(home=tmp_path), store, runners, CountingMemory())
    stuck, stuck_in = asyncio.Event(), asyncio.Event()
    held = asyncio.create_task(hold(scheduler, "a", stuck, stuck_in))
    reload: asyncio.Task[StandInRunner] | None = None
    try:
        await stuck_in.wait()
        [draining] = runners.started
        reload = asyncio.create_task(hold(scheduler, "a", asyncio.Event(), options={"use_mmap": False}))
        await wait_until(lambda: draining not in loaded_runners(scheduler))
        # Before the fix, close() left the draining runner out of its stops and then waited, with no
        # deadline, for the task that stops it once its (stuck) request ends.
        async with asyncio.timeout(GUARD_S):
            await scheduler.close(0.2)
        assert draining.killed and not draining.alive
        assert all(not runner.alive for runner in runners.started)
    finally:
        stuck.set()
        if reload is not None:
            reload.cancel()
        await asyncio.gather(held, *([reload] if reload else []), return_exceptions=True)


async def test_a_second_close_keeps_the_first_close_s_deadline(tmp_path: Path, store: ModelStore) -> None:
    scheduler = make_scheduler(Settings(home=tmp_path), store, StandIns(), CountingMemory())
    leave = asyncio.Event()
    admitted = asyncio.Event()

    async def admitted_request() -> None:
        async with scheduler.admit():
            admitted.set()
            await leave.wait()

    request = asyncio.create_task(admitted_request())
    try:
        await admitted.wait()
        await scheduler.close(0.1)  # the shutdown sequence's, with the request still admitted
        # The app's cleanup closes again with the whole budget: it must not wait that long again.
        async with asyncio.timeout(GUARD_S):
            await scheduler.close(3600.0)
        assert not request.done()  # still admitted: the second close did not wait for it
    finally:
        leave.set()
        await request
