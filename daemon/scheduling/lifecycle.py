"""A runner's life: its start (one at a time), its unload once the requests holding it are
answered, and its exit, each recorded in the registry of runners."""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

from daemon.config import Settings
from daemon.errors import ShuttingDown
from daemon.memory import ModelShape, peak_bytes
from daemon.metrics import Metrics
from daemon.options import LlamaParams, LoadOptions
from daemon.runner.client import RunnerProcess
from daemon.scheduling.runners import LoadedModel, Measurement, Runners, RunnerStatus
from daemon.scheduling.threads import share_threads
from daemon.scheduling.waits import holding
from daemon.store import StoredModel

# One logger for the whole scheduler, named as before it was split into jobs: log filters keep working.
log = logging.getLogger("daemon.scheduler")

RunnerFactory = Callable[[StoredModel, LlamaParams], Awaitable[RunnerProcess]]


class Lifecycle:
    def __init__(
        self,
        settings: Settings,
        runners: Runners,
        runner_factory: RunnerFactory,
        metrics: Metrics,
        clock: Callable[[], float],
        cpus: int,
    ) -> None:
        self._settings = settings
        self._runners = runners
        self._runner_factory = runner_factory
        self._metrics = metrics
        self._clock = clock
        self._cpus = cpus
        # Each lock is held only for steps that wait on no request (see room.Room.make).
        self._load_lock = asyncio.Lock()  # one runner starts at a time
        # A model's lock: a second cold request waits here, then shares the load; an unload of that
        # model waits for the load. Other models' requests, stops and deletes never wait for it.
        self._model_locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self.background: set[asyncio.Task[Any]] = set()  # stops on their own tasks
        self.closed = False  # the stop has taken every runner: a load that ends now is stopped at once

    def model_lock(self, name: str) -> asyncio.Lock:
        return self._model_locks[name]

    async def start(
        self,
        model: StoredModel,
        load: LoadOptions,
        params: LlamaParams,
        shape: ModelShape,
        allowance_tokens: int,
        estimated_bytes: int,
        keep_alive_s: float | None,
        deadline_s: float,
    ) -> LoadedModel:
        """Start a runner that room was made for, one start at a time. Call it in the step that found
        the room: its estimate is set aside before the first wait, and stays promised while it waits
        for another load."""
        runners = self._runners
        runners.loading[model.name] = estimated_bytes
        try:
            async with holding(self._load_lock, deadline_s, "another model's load", self._settings.load_timeout_s):
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
            del runners.loading[model.name]
            runners.notify_memory()
        if self.closed:  # the daemon stopped while it loaded: nobody would stop it later
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
            allowance_tokens=allowance_tokens,
            measured=Measurement(peak_bytes(shape, params.n_batch, 0, 0, params.quick_lane_tokens), 0),
            last_used_s=self._clock(),
            threads=params.n_threads,
        )
        entry.refresh()
        entry.idle.set()
        runner.on_exit(lambda _runner: self._runner_exited(entry))
        runners.loaded[model.name] = entry
        return entry

    def _runner_exited(self, entry: LoadedModel) -> None:
        if not entry.runner.stopping:
            self._metrics.runner_crashed(entry.name)
        self.forget(entry)
        if entry in self._runners.leaving:
            return  # stop() counts it until then, and wakes the waiters
        self._runners.notify_memory()

    def leave(self, entry: LoadedModel) -> None:
        """Unloaded: no new request gets it; it counts against memory until its process exits."""
        entry.status = RunnerStatus.DRAINING
        self._runners.leaving.add(entry)
        self.forget(entry)

    def forget(self, entry: LoadedModel) -> None:
        """A runner exited (crash or unload): drop it so the next request starts a fresh one."""
        loaded = self._runners.loaded
        if loaded.get(entry.name) is entry:
            del loaded[entry.name]
            share_threads(self._cpus, loaded.values())
        if entry.timer is not None:
            entry.timer.cancel()
            entry.timer = None

    def retire(self, entry: LoadedModel, reason: str) -> asyncio.Future[None]:
        """Unload a model once the requests holding it are answered: no new request gets it now,
        and the stop runs on its own task (awaited shielded: a waiter that leaves stops nothing)."""
        self.leave(entry)
        return self._spawn(self._stop_when_idle(entry, reason))

    async def _stop_when_idle(self, entry: LoadedModel, reason: str) -> None:
        # Waits for the runner's own requests, holding nothing: a stuck one is killed by the stop.
        started_s = self._clock()
        await entry.idle.wait()
        await self.stop(entry, reason, self._settings.shutdown_timeout_s, started_s)

    async def stop(self, entry: LoadedModel, reason: str, timeout_s: float, started_s: float) -> None:
        """Stop a runner; until its process has exited, its memory still counts. A second stop of
        the same runner (the daemon's stop while it drained) bounds the wait by its own timeout, and
        is not counted again."""
        first = entry.status is not RunnerStatus.STOPPING
        entry.status = RunnerStatus.STOPPING
        self._runners.leaving.add(entry)
        try:
            await entry.runner.stop(timeout_s)
        finally:
            self._runners.leaving.discard(entry)
            self._runners.notify_memory()
        if first:
            self._metrics.model_unloaded(entry.name, reason, self._clock() - started_s)

    async def unload(self, canonical: str, reason: str) -> bool:
        """Unload by canonical name (after its in-flight requests); False if it was not loaded."""
        async with self._model_locks[canonical]:  # after a load of this model, not others' loads
            entry = self._runners.loaded.get(canonical)
            if entry is None:
                return False
            stopped = self.retire(entry, reason)
        await asyncio.shield(stopped)  # after its requests in flight, holding no lock
        return True

    def _spawn(self, coroutine: Awaitable[None]) -> asyncio.Future[None]:
        task = asyncio.ensure_future(coroutine)
        self.background.add(task)
        task.add_done_callback(self.background.discard)
        return task
