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
from typing import Any, TypeVar

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
T = TypeVar("T")


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
            self.shape,
            params.n_batch,
            self.measured_bytes,
            self.measured_at_tokens,
            allowance_tokens,
            params.n_ubatch,
            self.runner.unused_quick_lane_tokens,
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
        # Every lock is held only for steps that wait on no request: a wait for busy runners happens
        # with none held (see _make_room), and each wait of a request ends at its deadline.
        self._load_lock = asyncio.Lock()  # one runner starts at a time
        self._room_lock = asyncio.Lock()  # one caller at a time evicts or renews to make room
        self._model_locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._admitted = 0
        self._drained = asyncio.Event()
        self._drained.set()
        self._shutting_down = False
        self._stop_deadline_s: float | None = None  # the one deadline of the whole stop (loop time)
        self._closed = False  # close() has taken every runner: a load that ends now is stopped at once
        self._background: set[asyncio.Task[Any]] = set()
        self._leaving: set[LoadedModel] = set()  # draining or stopping: their process has not exited yet
        self._loading: dict[str, int] = {}  # model -> estimated bytes, while its runner starts
        # Set (and replaced) each time memory may have been freed: a runner went idle or exited, a
        # load ended. Whoever waits for room looks again then.
        self._memory_changed = asyncio.Event()

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
        # Every wait of this request (for memory, for a lock, for another load) ends here.
        deadline_s = asyncio.get_running_loop().time() + self._settings.load_timeout_s
        entry, loaded_now = await self._reserve(
            model, load, limit_tokens, longest_input_tokens, keep_alive_s, deadline_s
        )
        try:
            limit_tokens = min(limit_tokens, entry.params.limit_tokens)
            self._apply_live_options(entry, load)
            load_duration_ns = time.perf_counter_ns() - started_ns if loaded_now else 0
            yield Lease(entry, load_duration_ns, limit_tokens)
        finally:
            self._release(entry)

    async def _reserve(
        self,
        model: StoredModel,
        load: LoadOptions,
        limit_tokens: int,
        longest_input_tokens: int,
        keep_alive_s: float | None,
        deadline_s: float,
    ) -> tuple[LoadedModel, bool]:
        """A runner that serves the request, held, with memory set aside for the largest decode the
        request can cause; whether it was loaded for it.

        Memory is set aside before the runner is held, in one step with no wait between: a request
        that waits for room holds no runner, so it never keeps busy a runner that another waiting
        request needs idle (two such requests used to wait for each other until load_timeout)."""
        while True:
            entry = self._loaded.get(model.name)
            if entry is not None and self._serves(entry, model, load, limit_tokens):
                # No lock on this path: a load of another model must not hold up a loaded one.
                decode_tokens = decode_tokens_for(entry.params, load, limit_tokens, longest_input_tokens)
                if decode_tokens <= entry.allowance_tokens:
                    self._acquire(entry, keep_alive_s)
                    return entry, False
                growth_bytes = self._growth_bytes(entry, decode_tokens)
                if self._room(growth_bytes)[0]:
                    entry.allowance_tokens = decode_tokens
                    self._acquire(entry, keep_alive_s)
                    return entry, False
                await self._make_room(entry.name, growth_bytes, deadline_s, growing=entry)
                continue  # look again: the runner may have been evicted meanwhile, or room taken
            # This model's lock (a second cold request waits here, then shares the load); other
            # models' requests, stops and deletes never wait for it.
            async with self._holding(self._model_locks[model.name], deadline_s, f"another load of {model.name}"):
                entry = self._loaded.get(model.name)
                if entry is not None and self._serves(entry, model, load, limit_tokens):
                    continue
                if entry is not None:
                    # Other options: the runner answers its requests in flight and exits; it counts
                    # against memory until then, and the new one loads beside it if that fits.
                    self._retire(entry, "reloaded")
                entry = await self._load(model, load, limit_tokens, longest_input_tokens, keep_alive_s, deadline_s)
                self._acquire(entry, keep_alive_s)  # in the step that registered it: nobody evicts it first
                return entry, True

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
        self._notify_memory()  # an idle runner can be evicted or renewed to make room
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

    @contextlib.asynccontextmanager
    async def _holding(self, lock: asyncio.Lock, deadline_s: float, what: str) -> AsyncIterator[None]:
        """Hold `lock` for the block, waiting for it no later than the deadline."""
        await self._until(deadline_s, lock.acquire(), what)
        try:
            yield
        finally:
            lock.release()

    async def _until(self, deadline_s: float, awaitable: Awaitable[T], what: str) -> T:
        """Wait for `awaitable` up to a request's deadline; past it, MemoryBusy (503: try again)."""
        try:
            async with asyncio.timeout_at(deadline_s):
                return await awaitable
        except TimeoutError:
            raise MemoryBusy(f"waited {self._settings.load_timeout_s:g}s (load_timeout) for {what}") from None

    def _notify_memory(self) -> None:
        """Wake whoever waits for room (see _make_room)."""
        self._memory_changed.set()
        self._memory_changed = asyncio.Event()

    def _spawn(self, coroutine: Awaitable[None]) -> asyncio.Future[None]:
        task = asyncio.ensure_future(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    # -- loading and unloading -------------------------------------------------------------------

    async def _load(
        self,
        model: StoredModel,
        load: LoadOptions,
        limit_tokens: int,
        longest_input_tokens: int,
        keep_alive_s: float | None,
        deadline_s: float,
    ) -> LoadedModel:
        """Make room for a runner, set it aside, then start it (one start at a time)."""
        facts = model.facts
        if facts.vocab_size == 0:  # a manifest written before the estimate needed the vocabulary's size
            facts = await asyncio.to_thread(read_gguf_facts, model.blob_path)
        splits = splits_across_ubatches(facts.causal_attention, facts.pooling_type)
        params = llama_params(load, facts.context_length, facts.block_count, splits, facts.vocab_size)
        shape = ModelShape.of(facts, model.size_bytes)
        # Set aside what the first request's largest decode needs, not the model's longest input: a
        # 32k-context model serving short queries must not reserve its worst case up front.
        allowance = decode_tokens_for(params, load, limit_tokens, longest_input_tokens)
        estimated = peak_bytes(shape, params.n_batch, allowance, params.n_ubatch, params.quick_lane_tokens)
        await self._make_room(model.name, estimated, deadline_s)
        # Set aside in the step that found the room; waiting for another load, it stays promised.
        self._loading[model.name] = estimated
        try:
            async with self._holding(self._load_lock, deadline_s, "another model's load"):
                log.info(
                    "loading %s (%s, ctx %d, %d threads)",
                    model.name,
                    model.facts.file_type,
                    params.n_ctx,
                    params.n_threads,
                )
                started_s = self._clock()
                runner = await self._runner_factory(model, params)
        finally:
            del self._loading[model.name]
            self._notify_memory()
        if self._closed:  # the daemon stopped while it loaded: nobody would stop it later
            await runner.kill()
            raise ShuttingDown("server is shutting down")
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
        self._notify_memory()

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

    def _retire(self, entry: LoadedModel, reason: str) -> asyncio.Future[None]:
        """Unload a model once the requests holding it are answered: no new request gets it now,
        and the stop runs on its own task (awaited shielded: a waiter that leaves stops nothing)."""
        self._leave(entry)
        return self._spawn(self._stop_when_idle(entry, reason))

    async def _stop_when_idle(self, entry: LoadedModel, reason: str) -> None:
        # Waits for the runner's own requests, holding nothing: a stuck one is killed by close().
        started_s = self._clock()
        await entry.idle.wait()
        await self._stop(entry, reason, self._settings.shutdown_timeout_s, started_s)

    async def _stop(self, entry: LoadedModel, reason: str, timeout_s: float, started_s: float) -> None:
        """Stop a runner; until its process has exited, its memory still counts. A second stop of
        the same runner (close() while it drained) bounds the wait by its own timeout, and is not
        counted again."""
        first = entry.status is not RunnerStatus.STOPPING
        entry.status = RunnerStatus.STOPPING
        self._leaving.add(entry)
        try:
            await entry.runner.stop(timeout_s)
        finally:
            self._leaving.discard(entry)
            self._notify_memory()
        if first:
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

    async def _make_room(
        self, name: str, required_bytes: int, deadline_s: float, growing: LoadedModel | None = None
    ) -> None:
        """Return once `required_bytes` fits; the caller sets it aside in the same step. Idle runners
        that grew give memory back first, then idle models are unloaded (one caller at a time);
        if busy runners or runners on their way out hold the memory, wait for them with no lock
        held, up to the deadline (MemoryBusy); refuse at once, evicting nothing, if it never could
        fit. `growing` is the runner that needs the room: it is neither renewed nor evicted for itself."""
        while True:
            async with self._holding(self._room_lock, deadline_s, f"room for {name}"):
                shortfall = await self._evict_for(name, required_bytes, deadline_s, growing)
                changed = self._memory_changed  # in the step that found no room: no change is missed
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
        while True:
            room, snapshot, budget = self._room(required_bytes)
            count_ok = growing is not None or max_loaded == 0 or len(self._loaded) + len(self._loading) < max_loaded
            if room and count_ok:
                return None
            others = [e for e in self._loaded.values() if e is not growing]
            grown = [e for e in others if e.refcount == 0 and e.grown]
            if grown and not room:
                await self._until(deadline_s, self._renew(min(grown, key=lambda e: e.last_used_s)), f"room for {name}")
                continue
            candidates = [EvictionCandidate(e.name, e.refcount > 0, e.last_used_s, e.counted_bytes) for e in others]
            leaving = [EvictionCandidate(e.name, True, e.last_used_s, e.counted_bytes) for e in self._leaving]
            if not could_ever_fit(required_bytes, budget, candidates + leaving, self._max_memory_left(growing)):
                raise InsufficientMemory(self._memory_report(name, required_bytes, snapshot, budget))
            victim = pick_victim(candidates)
            if victim is None:
                return snapshot, budget
            log.info("unloading %s to make room for %s", victim.name, name)
            stopped = self._retire(self._loaded[victim.name], "evicted")
            await self._until(deadline_s, asyncio.shield(stopped), f"{victim.name} to stop")

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
        async with self._model_locks[canonical]:  # after a load of this model, not others' loads
            entry = self._loaded.get(canonical)
            if entry is None:
                return False
            stopped = self._retire(entry, reason)
        await asyncio.shield(stopped)  # after its requests in flight, holding no lock
        return True

    # -- shutdown --------------------------------------------------------------------------------

    def stop_deadline_s(self, timeout_s: float) -> float:
        """The one deadline of the whole stop, in loop time: fixed by the first caller (the shutdown
        sequence), and the same for every later part of the stop."""
        deadline_s = asyncio.get_running_loop().time() + timeout_s
        if self._stop_deadline_s is None or deadline_s < self._stop_deadline_s:
            self._stop_deadline_s = deadline_s
        return self._stop_deadline_s

    async def close(self, timeout_s: float) -> None:
        """Stop admitting; let admitted requests finish, then stop every runner, draining ones
        included, all within `timeout_s` (or the stop's deadline, if one is already set). A runner
        still busy at the end is killed, and its requests get ShuttingDown."""
        self._shutting_down = True
        loop = asyncio.get_running_loop()
        deadline_s = self.stop_deadline_s(timeout_s)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout_at(deadline_s):
                await self._drained.wait()
        for entry in list(self._loaded.values()):
            self._leave(entry)
        self._closed = True
        runners = list(self._leaving)  # loaded until now, draining, and stopping
        remaining_s = max(0.0, deadline_s - loop.time())
        await asyncio.gather(*(self._stop(entry, "shutdown", remaining_s, self._clock()) for entry in runners))
        # The stops on their own tasks end once their runners' requests are answered; one that has
        # not by the deadline is cancelled, not waited for.
        background = list(self._background)
        if background:
            _done, pending = await asyncio.wait(background, timeout=max(0.0, deadline_s - loop.time()))
            for task in pending:
                task.cancel()


def decode_tokens_for(params: LlamaParams, load: LoadOptions, limit_tokens: int, longest_input_tokens: int) -> int:
    """The largest decode a request can cause on a runner of `params`: its token budget (capped at
    a ubatch), or its longest input, cut at its context, alone in one decode (at most n_batch)."""
    batch_tokens = min(load.batch_tokens or params.batch_tokens, params.n_ubatch)
    longest = min(longest_input_tokens, limit_tokens, params.limit_tokens)
    return decode_tokens_needed(batch_tokens, longest, params.n_batch)
