"""Which models are loaded: leases with refcounts, keep_alive timers, eviction, one load at a time.

Mechanism only; the decisions (what fits, who is evicted, what options mean) are pure functions in
`memory` and `options`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

from daemon.config import Settings
from daemon.errors import InsufficientMemory, MemoryBusy, Overloaded, ShuttingDown
from daemon.gguf_info import read_gguf_facts
from daemon.memory import (
    MIB,
    EvictionCandidate,
    MemoryProbe,
    MemorySnapshot,
    ModelShape,
    budget_bytes,
    could_ever_fit,
    estimate_runner,
    fits,
    pick_victim,
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
    thread_share,
)
from daemon.runner.client import RunnerProcess
from daemon.store import ModelStore, StoredModel, require_embedding_model

log = logging.getLogger(__name__)
OVERLOADED_MESSAGE = "server busy, please try again.  maximum pending requests exceeded"
GIB = 1024 * MIB

RunnerFactory = Callable[[StoredModel, LlamaParams], Awaitable[RunnerProcess]]


@dataclass(eq=False)
class LoadedModel:
    model: StoredModel
    load: LoadOptions
    params: LlamaParams
    runner: RunnerProcess
    keep_alive_s: float
    estimated_bytes: int
    refcount: int = 0
    last_used_s: float = 0.0
    expires_at_wall_s: float | None = None  # None: in use, or kept forever
    threads: int = 0  # llama.cpp threads the runner uses now
    timer: asyncio.TimerHandle | None = None
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def name(self) -> str:
        return self.model.name


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
        self._stopping: set[LoadedModel] = set()  # unloaded, but their process has not exited yet
        self._runner_gone = asyncio.Event()  # set (and replaced) each time a stopping runner exits

    # -- queries ---------------------------------------------------------------------------------

    def loaded(self) -> list[LoadedModel]:
        return list(self._loaded.values())

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
    async def lease(self, name: str, options: dict[str, Any], keep_alive_s: float | None) -> AsyncIterator[Lease]:
        """Hold a loaded runner for `name` for the duration of the block."""
        model = self._store.get(name)
        require_embedding_model(model.facts, model.name)
        load = resolve_load_options(self._settings, options)
        limit_tokens = context_limit(load.num_ctx, model.facts.context_length)
        started_ns = time.perf_counter_ns()
        loaded_now = False
        entry = self._loaded.get(model.name)
        if entry is not None and self._serves(entry, model, load, limit_tokens):
            # Fast path, no lock: a load of another model must not hold up a loaded one.
            self._acquire(entry, keep_alive_s, load)
        else:
            # This model's lock first (a second cold request waits here, then shares the load), then
            # the load lock: one load at a time, and stop/delete of other models never wait for it.
            async with self._model_locks[model.name], self._load_lock:
                entry = self._loaded.get(model.name)
                if entry is not None and not self._serves(entry, model, load, limit_tokens):
                    await self._retire(entry, "reloaded")
                    entry = None
                if entry is None:
                    entry = await self._load(model, load, keep_alive_s)
                    loaded_now = True
                self._acquire(entry, keep_alive_s, load)
        load_duration_ns = time.perf_counter_ns() - started_ns if loaded_now else 0
        try:
            yield Lease(entry, load_duration_ns, min(limit_tokens, entry.params.limit_tokens))
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
            entry.runner.set_batch_tokens(load.batch_tokens)
        if load.num_thread != previous.num_thread:
            if load.num_thread:
                entry.runner.set_threads(load.num_thread)
                entry.threads = load.num_thread
            else:
                entry.threads = 0  # automatic again: the share decides
                self._share_threads()

    def _acquire(self, entry: LoadedModel, keep_alive_s: float | None, load: LoadOptions) -> None:
        self._apply_live_options(entry, load)
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
            self._forget(entry)
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

    async def _load(self, model: StoredModel, load: LoadOptions, keep_alive_s: float | None) -> LoadedModel:
        params = llama_params(load, model.facts.context_length, model.facts.block_count)
        facts = model.facts
        if facts.vocab_size == 0:  # a manifest written before the estimate needed the vocabulary's size
            facts = await asyncio.to_thread(read_gguf_facts, model.blob_path)
        # Counted at its worst (its longest input) until runners report what they hold.
        estimated = estimate_runner(ModelShape.of(facts, model.size_bytes), params.n_batch, params.n_ubatch).worst_bytes
        await self._make_room(model.name, estimated)
        log.info(
            "loading %s (%s, ctx %d, %d threads)", model.name, model.facts.file_type, params.n_ctx, params.n_threads
        )
        started_s = self._clock()
        runner = await self._runner_factory(model, params)
        self._metrics.model_loaded(model.name, self._clock() - started_s)
        entry = LoadedModel(
            model=model,
            load=load,
            params=params,
            runner=runner,
            keep_alive_s=self._settings.keep_alive_s if keep_alive_s is None else keep_alive_s,
            estimated_bytes=estimated,
            last_used_s=self._clock(),
            threads=params.n_threads,
        )
        entry.idle.set()
        runner.on_exit(lambda _runner: self._runner_exited(entry))
        self._loaded[model.name] = entry
        return entry

    def _runner_exited(self, entry: LoadedModel) -> None:
        if not entry.runner.stopping:
            self._metrics.runner_crashed(entry.name)
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
        self._forget(entry)
        await asyncio.shield(self._spawn(self._stop_when_idle(entry, reason)))

    async def _stop_when_idle(self, entry: LoadedModel, reason: str) -> None:
        started_s = self._clock()
        await entry.idle.wait()
        await self._stop(entry, reason, self._settings.shutdown_timeout_s, started_s)

    async def _stop(self, entry: LoadedModel, reason: str, timeout_s: float, started_s: float) -> None:
        """Stop a runner; until its process has exited, its memory still counts."""
        self._stopping.add(entry)
        try:
            await entry.runner.stop(timeout_s)
        finally:
            self._stopping.discard(entry)
            self._runner_gone.set()
            self._runner_gone = asyncio.Event()
        self._metrics.model_unloaded(entry.name, reason, self._clock() - started_s)

    async def _make_room(self, name: str, required_bytes: int) -> None:
        """Unload idle models until `required_bytes` fits; wait (up to load_timeout) for busy ones
        and for runners on their way out; refuse at once, evicting nothing, if it never could."""
        reserve_bytes = self._settings.memory_reserve_mib * MIB
        max_loaded = self._settings.max_loaded_models
        max_memory = self._settings.max_memory_bytes
        deadline_s = asyncio.get_running_loop().time() + self._settings.load_timeout_s
        while True:
            snapshot = self._memory_probe.snapshot()
            budget = budget_bytes(snapshot, reserve_bytes)
            held = sum(e.estimated_bytes for e in [*self._loaded.values(), *self._stopping])
            count_ok = max_loaded == 0 or len(self._loaded) < max_loaded
            if count_ok and fits(required_bytes, budget, held, max_memory):
                return
            candidates = [
                EvictionCandidate(e.name, e.refcount > 0, e.last_used_s, e.estimated_bytes)
                for e in self._loaded.values()
            ]
            leaving = [EvictionCandidate(e.name, True, e.last_used_s, e.estimated_bytes) for e in self._stopping]
            if not could_ever_fit(required_bytes, budget, candidates + leaving, max_memory):
                raise InsufficientMemory(self._memory_report(name, required_bytes, snapshot, budget))
            victim = pick_victim(candidates)
            if victim is not None:
                log.info("unloading %s to make room for %s", victim.name, name)
                await self._retire(self._loaded[victim.name], "evicted")
                continue
            # Every loaded model is busy, or memory is still held by runners on their way out.
            waits = [asyncio.ensure_future(e.idle.wait()) for e in self._loaded.values()]
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
            f"{e.name} {e.estimated_bytes / GIB:.2f} GiB ({'busy' if e.refcount else 'idle'})"
            for e in self._loaded.values()
        ] + [f"{e.name} {e.estimated_bytes / GIB:.2f} GiB (stopping)" for e in self._stopping]
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
            self._forget(entry)
        remaining_s = max(0.0, deadline_s - asyncio.get_running_loop().time())
        await asyncio.gather(*(self._stop(entry, "shutdown", remaining_s, self._clock()) for entry in entries))
        for task in list(self._background):
            with contextlib.suppress(Exception):
                await task
