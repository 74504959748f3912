"""Which models are loaded: leases with refcounts, keep_alive timers, eviction, one load at a time.

Mechanism only; the decisions (what fits, who is evicted, what options mean) are pure functions in
`memory` and `options`.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

from daemon.config import Settings
from daemon.errors import InsufficientMemory, MemoryBusy, Overloaded, RunnerCrashed, ShuttingDown
from daemon.gguf_info import read_gguf_facts
from daemon.memory import (
    MIB,
    EvictionCandidate,
    MemoryProbe,
    MemorySnapshot,
    ModelShape,
    budget_bytes,
    could_ever_fit,
    counted_bytes,
    decode_tokens_needed,
    fits,
    measure_process,
    peak_bytes,
    pick_victim,
    runner_footprint_bytes,
)
from daemon.metrics import Metrics
from daemon.options import (
    LlamaParams,
    LoadOptions,
    available_cpu_count,
    context_limit,
    llama_params,
    needs_new_runner,
    resolve_load_options,
    splits_across_ubatches,
    thread_share,
)
from daemon.runner.client import RunnerProcess
from daemon.store import ModelStore, StoredModel, require_embedding_model

log = logging.getLogger(__name__)
OVERLOADED_MESSAGE = "server busy, please try again.  maximum pending requests exceeded"
GIB = 1024 * MIB

RunnerFactory = Callable[[StoredModel, LlamaParams], Awaitable[RunnerProcess]]


class RunnerStatus(enum.Enum):
    """Where a runner is in its life. Each counts against memory until its process has exited."""

    LOADING = "loading"  # its process starts (counted by estimate: Scheduler._loading)
    READY = "ready"  # serves requests
    DRAINING = "draining"  # unloaded: answers the requests that hold it, takes no new ones
    STOPPING = "stopping"  # asked to exit


@dataclass(eq=False)
class LoadedModel:
    model: StoredModel
    load: LoadOptions
    params: LlamaParams
    runner: RunnerProcess
    keep_alive_s: float
    shape: ModelShape
    # The largest decode memory is set aside for. It grows before a request that may need more is
    # sent (Scheduler._allow_decode), and falls back when the runner renews its context.
    allowance_tokens: int
    measured_bytes: int  # what its process adds to memory (runner_footprint_bytes), at the last refresh
    measured_at_tokens: int = 0  # the runner's largest decode at that refresh
    status: RunnerStatus = RunnerStatus.READY
    refcount: int = 0
    last_used_s: float = 0.0
    expires_at_wall_s: float | None = None  # None: in use, or kept forever
    threads: int = 0  # llama.cpp threads the runner uses now
    timer: asyncio.TimerHandle | None = None
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def name(self) -> str:
        return self.model.name

    @property
    def counted_bytes(self) -> int:
        """What the scheduler counts for this runner: what it holds, and what it may still grow to
        within its allowance. /api/ps shows it as the model's size."""
        return self.counted_bytes_for(self.allowance_tokens)

    def counted_bytes_for(self, allowance_tokens: int) -> int:
        """What it would count with memory set aside for a decode of `allowance_tokens`."""
        params = self.params
        return counted_bytes(
            self.shape, params.n_batch, self.measured_bytes, self.measured_at_tokens, allowance_tokens, params.n_ubatch
        )

    @property
    def grown(self) -> bool:
        """Whether a decode longer than the runner's token budget made it hold more than it needs
        for its usual traffic (memory a fresh context gives back)."""
        return max(self.allowance_tokens, self.runner.largest_decode_tokens) > self.params.batch_tokens

    def refresh(self) -> None:
        """Measure what the runner holds now."""
        largest = self.runner.largest_decode_tokens
        memory = measure_process(self.runner.pid)
        if memory is not None:
            self.measured_bytes = runner_footprint_bytes(memory, self.model.size_bytes, self.params.use_mmap)
            self.measured_at_tokens = largest


@dataclass(frozen=True)
class Lease:
    loaded: LoadedModel
    load_duration_ns: int
    limit_tokens: int  # this request's context: its num_ctx, at most the runner's


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
    ) -> None:
        self._cpus = cpus or available_cpu_count()
        self._metrics = metrics or Metrics()
        self._settings = settings
        self._store = store
        self._runner_factory = runner_factory
        self._memory_probe = memory_probe
        self._clock = clock
        self._wall_clock = wall_clock
        self._loaded: dict[str, LoadedModel] = {}
        self._load_lock = asyncio.Lock()
        self._model_locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._admitted = 0
        self._drained = asyncio.Event()
        self._drained.set()
        self._shutting_down = False
        self._background: set[asyncio.Task[Any]] = set()
        self._leaving: set[LoadedModel] = set()  # draining or stopping: their process has not exited yet
        self._loading: dict[str, int] = {}  # model -> estimated bytes, while its runner starts
        self._runner_gone = asyncio.Event()  # set (and replaced) each time a leaving runner exits

    # -- queries ---------------------------------------------------------------------------------

    def loaded(self) -> list[LoadedModel]:
        return list(self._loaded.values())

    def measured(self) -> list[LoadedModel]:
        """The loaded models, each measured now."""
        for entry in self._loaded.values():
            entry.refresh()
        return self.loaded()

    @property
    def admitted(self) -> int:
        return self._admitted

    # -- leases ----------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def admit(self) -> AsyncIterator[None]:
        """Count a request from acceptance to answer; refuse it before any work when full."""
        if self._shutting_down:
            raise ShuttingDown("server is shutting down")
        if self._admitted >= self._settings.max_queue:
            raise Overloaded(OVERLOADED_MESSAGE)
        self._admitted += 1
        self._drained.clear()
        try:
            yield
        finally:
            self._admitted -= 1
            if self._admitted == 0:
                self._drained.set()

    @contextlib.asynccontextmanager
    async def lease(
        self,
        name: str | StoredModel,
        options: dict[str, Any],
        keep_alive_s: float | None,
        longest_input_tokens: int = 0,
    ) -> AsyncIterator[Lease]:
        """Hold a loaded runner for a model (its name, or the StoredModel the caller already read)
        for the duration of the block, with memory set aside for the largest decode inputs of up to
        `longest_input_tokens` tokens can cause."""
        model = self._store.get(name) if isinstance(name, str) else name
        require_embedding_model(model.facts, model.name)
        load = resolve_load_options(self._settings, options)
        limit_tokens = context_limit(load.num_ctx, model.facts.context_length)
        started_ns = time.perf_counter_ns()
        loaded_now = False
        entry = self._loaded.get(model.name)
        if entry is not None and self._serves(entry, model, load, limit_tokens):
            # Fast path, no lock: a load of another model must not hold up a loaded one.
            self._acquire(entry, keep_alive_s)
        else:
            # This model's lock first (a second cold request waits here, then shares the load), then
            # the load lock: one load at a time, and stop/delete of other models never wait for it.
            async with self._model_locks[model.name], self._load_lock:
                entry = self._loaded.get(model.name)
                if entry is not None and not self._serves(entry, model, load, limit_tokens):
                    await self._retire(entry, "reloaded")
                    entry = None
                if entry is None:
                    entry = await self._load(model, load, keep_alive_s, longest_input_tokens)
                    loaded_now = True
                self._acquire(entry, keep_alive_s)
        try:
            limit_tokens = min(limit_tokens, entry.params.limit_tokens)
            # The budget is capped at a ubatch; one decode holds up to n_batch (a long input alone).
            batch_tokens = min(load.batch_tokens or entry.params.batch_tokens, entry.params.n_ubatch)
            longest = min(longest_input_tokens, limit_tokens)
            await self._allow_decode(entry, decode_tokens_needed(batch_tokens, longest, entry.params.n_batch))
            self._apply_live_options(entry, load)
            load_duration_ns = time.perf_counter_ns() - started_ns if loaded_now else 0
            yield Lease(entry, load_duration_ns, limit_tokens)
        finally:
            self._release(entry)

    @contextlib.asynccontextmanager
    async def lease_if_loaded(self, name: str) -> AsyncIterator[RunnerProcess | None]:
        """Hold `name`'s runner if it is loaded and serving, without ever loading it; else None."""
        model = self._store.get(name)
        entry = self._loaded.get(model.name)
        if entry is None or entry.model.digest != model.digest or not entry.runner.alive:
            yield None
            return
        self._acquire(entry, None)
        try:
            yield entry.runner
        finally:
            self._release(entry)

    @staticmethod
    def _serves(entry: LoadedModel, model: StoredModel, load: LoadOptions, limit_tokens: int) -> bool:
        """Whether a loaded runner can take a request: same file, alive, and options that need no
        new context or weights (see needs_new_runner)."""
        return (
            entry.model.digest == model.digest
            and entry.runner.alive
            and not needs_new_runner(entry.load, entry.params.limit_tokens, load, limit_tokens)
        )

    def _apply_live_options(self, entry: LoadedModel, load: LoadOptions) -> None:
        """A request's num_thread and num_batch, on the runner it shares (from its next decode)."""
        previous = entry.load
        entry.load = replace(previous, batch_tokens=load.batch_tokens, num_thread=load.num_thread)
        if load.batch_tokens != previous.batch_tokens:
            entry.runner.set_batch_tokens(load.batch_tokens or entry.params.batch_tokens)
        if load.num_thread != previous.num_thread:
            if load.num_thread:
                entry.runner.set_threads(load.num_thread)
                entry.threads = load.num_thread
            else:
                entry.threads = 0  # automatic again: the share decides
                self._share_threads()

    def _acquire(self, entry: LoadedModel, keep_alive_s: float | None) -> None:
        entry.refcount += 1
        if entry.refcount == 1:
            self._share_threads()
        entry.idle.clear()
        entry.expires_at_wall_s = None
        if entry.timer is not None:
            entry.timer.cancel()
            entry.timer = None
        if keep_alive_s is not None:
            entry.keep_alive_s = keep_alive_s

    def _release(self, entry: LoadedModel) -> None:
        entry.refcount -= 1
        entry.last_used_s = self._clock()
        if entry.refcount > 0:
            return
        entry.idle.set()
        self._share_threads()
        if self._loaded.get(entry.name) is not entry:
            return  # already retired or crashed
        if entry.keep_alive_s < 0:
            entry.expires_at_wall_s = None
        elif entry.keep_alive_s == 0:
            self._expire(entry)
        else:
            entry.expires_at_wall_s = self._wall_clock() + entry.keep_alive_s
            entry.timer = asyncio.get_running_loop().call_later(entry.keep_alive_s, self._expire, entry)

    def _expire(self, entry: LoadedModel) -> None:
        if entry.refcount == 0 and self._loaded.get(entry.name) is entry:
            log.info("unloading %s (keep_alive expired)", entry.name)
            # Forget it now, so no request leases a runner that is about to stop.
            self._leave(entry)
            self._spawn(self._stop_when_idle(entry, "expired"))

    def _share_threads(self) -> None:
        """Split the CPUs among the busy runners whose threads are automatic (see thread_share)."""
        automatic = [e for e in self._loaded.values() if e.load.num_thread == 0]
        share = thread_share(self._cpus, sum(1 for e in automatic if e.refcount > 0))
        for entry in automatic:
            if entry.threads != share:
                entry.runner.set_threads(share)
                entry.threads = share

    def _spawn(self, coroutine: Awaitable[None]) -> asyncio.Future[None]:
        task = asyncio.ensure_future(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    # -- loading and unloading -------------------------------------------------------------------

    async def _load(
        self, model: StoredModel, load: LoadOptions, keep_alive_s: float | None, longest_input_tokens: int
    ) -> LoadedModel:
        facts = model.facts
        if facts.vocab_size == 0:  # a manifest written before the estimate needed the vocabulary's size
            facts = await asyncio.to_thread(read_gguf_facts, model.blob_path)
        splits = splits_across_ubatches(facts.causal_attention, facts.pooling_type)
        params = llama_params(load, facts.context_length, facts.block_count, splits, facts.vocab_size)
        shape = ModelShape.of(facts, model.size_bytes)
        # Set aside what the first request's largest decode needs, not the model's longest input: a
        # 32k-context model serving short queries must not reserve its worst case up front.
        longest = min(longest_input_tokens, params.limit_tokens)
        allowance = decode_tokens_needed(params.batch_tokens, longest, params.n_batch)
        estimated = peak_bytes(shape, params.n_batch, allowance, params.n_ubatch, params.quick_lane_tokens)
        await self._make_room(model.name, estimated)
        log.info(
            "loading %s (%s, ctx %d, %d threads)", model.name, model.facts.file_type, params.n_ctx, params.n_threads
        )
        started_s = self._clock()
        self._loading[model.name] = estimated
        try:
            runner = await self._runner_factory(model, params)
        finally:
            del self._loading[model.name]
        self._metrics.model_loaded(model.name, self._clock() - started_s)
        entry = LoadedModel(
            model=model,
            load=load,
            params=params,
            runner=runner,
            keep_alive_s=self._settings.keep_alive_s if keep_alive_s is None else keep_alive_s,
            shape=replace(shape, gives_back_logits=runner.facts is not None and runner.facts.logits_given_back),
            allowance_tokens=allowance,
            measured_bytes=peak_bytes(shape, params.n_batch, 0, 0, params.quick_lane_tokens),  # until measured
            last_used_s=self._clock(),
            threads=params.n_threads,
        )
        entry.refresh()
        entry.idle.set()
        runner.on_exit(lambda _runner: self._runner_exited(entry))
        self._loaded[model.name] = entry
        return entry

    def _runner_exited(self, entry: LoadedModel) -> None:
        if not entry.runner.stopping:
            self._metrics.runner_crashed(entry.name)
        self._forget(entry)
        if entry in self._leaving:
            return  # _stop counts it until then, and wakes the waiters
        self._runner_gone.set()
        self._runner_gone = asyncio.Event()

    def _leave(self, entry: LoadedModel) -> None:
        """Unloaded: no new request gets it; it counts against memory until its process exits."""
        entry.status = RunnerStatus.DRAINING
        self._leaving.add(entry)
        self._forget(entry)

    def _forget(self, entry: LoadedModel) -> None:
        """A runner exited (crash or unload): drop it so the next request starts a fresh one."""
        if self._loaded.get(entry.name) is entry:
            del self._loaded[entry.name]
            self._share_threads()
        if entry.timer is not None:
            entry.timer.cancel()
            entry.timer = None

    async def _retire(self, entry: LoadedModel, reason: str) -> None:
        """Unload a model once the requests holding it are answered. The stop runs on its own
        task: if the request waiting for it is cancelled (its client left), the runner still stops."""
        self._leave(entry)
        await asyncio.shield(self._spawn(self._stop_when_idle(entry, reason)))

    async def _stop_when_idle(self, entry: LoadedModel, reason: str) -> None:
        started_s = self._clock()
        await entry.idle.wait()
        await self._stop(entry, reason, self._settings.shutdown_timeout_s, started_s)

    async def _stop(self, entry: LoadedModel, reason: str, timeout_s: float, started_s: float) -> None:
        """Stop a runner; until its process has exited, its memory still counts."""
        entry.status = RunnerStatus.STOPPING
        self._leaving.add(entry)
        try:
            await entry.runner.stop(timeout_s)
        finally:
            self._leaving.discard(entry)
            self._runner_gone.set()
            self._runner_gone = asyncio.Event()
        self._metrics.model_unloaded(entry.name, reason, self._clock() - started_s)

    # -- memory ----------------------------------------------------------------------------------

    def _runners(self) -> list[LoadedModel]:
        """Every runner whose process is alive: loaded, draining or stopping."""
        return [*self._loaded.values(), *self._leaving]

    def _room(self, required_bytes: int) -> tuple[bool, MemorySnapshot, int]:
        """Whether `required_bytes` more fits now: (fits, the snapshot, the budget). Runners are
        measured first; what they may still grow to within their allowance, and starting runners,
        are promised and not handed out again."""
        runners = self._runners()
        for entry in runners:
            entry.refresh()
        snapshot = self._memory_probe.snapshot()
        loading = sum(self._loading.values())
        promised = loading + sum(max(0, e.counted_bytes - e.measured_bytes) for e in runners)
        cached_weights = sum(e.model.size_bytes for e in runners if e.params.use_mmap)
        budget = budget_bytes(snapshot, self._settings.memory_reserve_mib * MIB, promised, cached_weights)
        held = loading + sum(e.counted_bytes for e in runners)
        return fits(required_bytes, budget, held, self._settings.max_memory_bytes), snapshot, budget

    async def _allow_decode(self, entry: LoadedModel, decode_tokens: int) -> None:
        """Set memory aside before a request whose decode may be longer than any the runner's
        allowance covers (llama.cpp touches its buffers as far as a decode goes, and keeps them)."""
        if decode_tokens <= entry.allowance_tokens:
            return
        if self._room(self._growth_bytes(entry, decode_tokens))[0]:
            entry.allowance_tokens = decode_tokens
            return
        async with self._load_lock:  # making room is one caller's at a time, as for a load
            if decode_tokens > entry.allowance_tokens:
                await self._make_room(entry.name, self._growth_bytes(entry, decode_tokens), growing=entry)
                entry.allowance_tokens = decode_tokens

    @staticmethod
    def _growth_bytes(entry: LoadedModel, decode_tokens: int) -> int:
        """What counting the runner for a decode of `decode_tokens` adds to what it counts now."""
        return entry.counted_bytes_for(decode_tokens) - entry.counted_bytes

    async def _renew(self, entry: LoadedModel) -> None:
        """An idle runner that grew for a long input gives that memory back: a fresh context."""
        log.info("renewing the context of %s to give back memory", entry.name)
        entry.allowance_tokens = entry.params.batch_tokens  # requests from now on reserve again
        with contextlib.suppress(RunnerCrashed, ShuttingDown):  # a runner that died gave it all back
            await entry.runner.renew_context()
        entry.refresh()
        self._metrics.context_renewed(entry.name)

    async def _make_room(self, name: str, required_bytes: int, growing: LoadedModel | None = None) -> None:
        """Make `required_bytes` fit: idle runners that grew give memory back first, then idle models
        are unloaded; wait (up to load_timeout) for busy ones and for runners on their way out;
        refuse at once, evicting nothing, if it never could. `growing` is the runner that needs the
        room: it is neither renewed nor evicted for itself."""
        max_loaded = self._settings.max_loaded_models
        deadline_s = asyncio.get_running_loop().time() + self._settings.load_timeout_s
        while True:
            room, snapshot, budget = self._room(required_bytes)
            count_ok = growing is not None or max_loaded == 0 or len(self._loaded) < max_loaded
            if room and count_ok:
                return
            others = [e for e in self._loaded.values() if e is not growing]
            grown = [e for e in others if e.refcount == 0 and e.grown]
            if grown and not room:
                await self._renew(min(grown, key=lambda e: e.last_used_s))
                continue
            candidates = [EvictionCandidate(e.name, e.refcount > 0, e.last_used_s, e.counted_bytes) for e in others]
            leaving = [EvictionCandidate(e.name, True, e.last_used_s, e.counted_bytes) for e in self._leaving]
            if not could_ever_fit(required_bytes, budget, candidates + leaving, self._max_memory_left(growing)):
                raise InsufficientMemory(self._memory_report(name, required_bytes, snapshot, budget))
            victim = pick_victim(candidates)
            if victim is not None:
                log.info("unloading %s to make room for %s", victim.name, name)
                await self._retire(self._loaded[victim.name], "evicted")
                continue
            # Every other model is busy, or memory is still held by runners on their way out.
            waits = [asyncio.ensure_future(e.idle.wait()) for e in others]
            waits.append(asyncio.ensure_future(self._runner_gone.wait()))
            try:
                done, _pending = await asyncio.wait(
                    waits,
                    timeout=max(0.0, deadline_s - asyncio.get_running_loop().time()),
                    return_when=asyncio.FIRST_COMPLETED,
                )
            finally:
                for waiter in waits:
                    waiter.cancel()
            if not done:
                raise MemoryBusy(
                    self._memory_report(name, required_bytes, snapshot, budget)
                    + f"; waited {self._settings.load_timeout_s:g}s (load_timeout) for busy models"
                )

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
            for e in self._loaded.values()
        ] + [f"{e.name} {e.counted_bytes / GIB:.2f} GiB ({e.status.value})" for e in self._leaving]
        holders += [f"{other} {size / GIB:.2f} GiB (loading)" for other, size in self._loading.items()]
        parts.append("loaded: " + (", ".join(holders) if holders else "nothing"))
        return "; ".join(parts)

    async def unload(self, name: str) -> bool:
        """Unload a model now (after its in-flight requests); False if it was not loaded."""
        return await self.unload_canonical(self._store.get(name).name)

    async def unload_canonical(self, canonical: str, reason: str = "requested") -> bool:
        """Unload by canonical name, whether or not the store still has it (used by delete)."""
        async with self._model_locks[canonical]:  # not the load lock: another model's load goes on
            entry = self._loaded.get(canonical)
            if entry is None:
                return False
            await self._retire(entry, reason)
            return True

    # -- shutdown --------------------------------------------------------------------------------

    async def close(self, timeout_s: float) -> None:
        """Stop admitting; let admitted requests finish, then stop every runner, all within
        `timeout_s`. A runner still busy at the end is killed, and its requests get ShuttingDown."""
        self._shutting_down = True
        deadline_s = asyncio.get_running_loop().time() + timeout_s
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout_at(deadline_s):
                await self._drained.wait()
        entries = list(self._loaded.values())
        for entry in entries:
            self._leave(entry)
        remaining_s = max(0.0, deadline_s - asyncio.get_running_loop().time())
        await asyncio.gather(*(self._stop(entry, "shutdown", remaining_s, self._clock()) for entry in entries))
        for task in list(self._background):
            with contextlib.suppress(Exception):
                await task
