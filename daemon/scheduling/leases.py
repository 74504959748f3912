"""Leases: a request's hold on a runner that serves it, found or loaded, with memory set aside for
the largest decode it can cause, and kept loaded for keep_alive after the last lease ends."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from typing import Any

from daemon.config import Settings
from daemon.errors import InvalidInput
from daemon.gguf_info import GGUFFacts
from daemon.memory import ModelShape, decode_tokens_for, peak_bytes
from daemon.memory.offload import (
    DEVICE_RUNTIME_BYTES,
    Device,
    DevicePart,
    device_part,
    layers_for,
    may_offload,
    offloadable_layers,
)
from daemon.options import (
    MAX_SEQUENCES_PER_DECODE,
    LlamaParams,
    LoadOptions,
    context_limit,
    llama_params,
    needs_new_runner,
    resolve_load_options,
    splits_across_ubatches,
)
from daemon.runner.client import RunnerProcess
from daemon.scheduling.lifecycle import Lifecycle
from daemon.scheduling.room import Room
from daemon.scheduling.runners import LoadedModel, Runners
from daemon.scheduling.threads import share_threads
from daemon.scheduling.waits import holding
from daemon.store import ModelStore, StoredModel, loadable_facts, require_embedding_model

# One logger for the whole scheduler, named as before it was split into jobs: log filters keep working.
log = logging.getLogger("daemon.scheduler")


def _host_shape(shape: ModelShape, device: Device | None, part: DevicePart) -> ModelShape:
    """The model as the host counts it with `part` on `device`: a GPU with memory of its own takes
    the offloaded weights off the host (their pages are read once to upload them, then unmapped);
    one whose memory is the host's adds its KV and compute buffers to it (the weights are in host
    memory either way, counted once)."""
    if device is None:
        return shape
    if device.host_memory:
        return replace(shape, file_bytes=shape.file_bytes + part.kv_bytes + part.compute_bytes)
    return replace(shape, file_bytes=max(0, shape.file_bytes - part.weights_bytes))


def _place(entry: LoadedModel, device: Device, part: DevicePart, offloaded_weights_bytes: int) -> None:
    """Record where a new runner's layers went: what llama.cpp says it put on the device, when its
    log said so, else the estimate."""
    facts = entry.runner.facts
    logged = sum(facts.device_buffer_bytes.values()) if facts is not None else 0
    entry.device = device
    entry.offloaded_layers = facts.offloaded_layers if facts is not None and facts.offloaded_layers else part.layers
    entry.device_bytes = logged or part.total_bytes
    if not device.host_memory:
        entry.host_weights_bytes = max(0, entry.model.size_bytes - offloaded_weights_bytes)


@dataclass(frozen=True)
class Lease:
    loaded: LoadedModel
    load_duration_ns: int
    limit_tokens: int  # this request's context: its num_ctx, at most the runner's


class Leases:
    def __init__(
        self,
        settings: Settings,
        store: ModelStore,
        runners: Runners,
        lifecycle: Lifecycle,
        room: Room,
        cpus: int,
        clock: Callable[[], float],
        wall_clock: Callable[[], float],
    ) -> None:
        self._settings = settings
        self._store = store
        self._runners = runners
        self._lifecycle = lifecycle
        self._room = room
        self._cpus = cpus
        self._clock = clock
        self._wall_clock = wall_clock

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
            entry = self._runners.loaded.get(model.name)
            if entry is not None and self._serves(entry, model, load, limit_tokens):
                # No lock on this path: a load of another model must not hold up a loaded one.
                decode_tokens = decode_tokens_for(entry.params, load, limit_tokens, longest_input_tokens)
                if decode_tokens <= entry.allowance_tokens:
                    self._acquire(entry, keep_alive_s)
                    return entry, False
                growth_bytes = entry.growth_bytes(decode_tokens)
                if self._room.check(growth_bytes)[0]:
                    entry.allowance_tokens = decode_tokens
                    self._acquire(entry, keep_alive_s)
                    return entry, False
                await self._room.make(entry.name, growth_bytes, deadline_s, growing=entry)
                continue  # look again: the runner may have been evicted meanwhile, or room taken
            # This model's lock (a second cold request waits here, then shares the load); other
            # models' requests, stops and deletes never wait for it.
            model_lock = self._lifecycle.model_lock(model.name)
            async with holding(model_lock, deadline_s, f"another load of {model.name}", self._settings.load_timeout_s):
                entry = self._runners.loaded.get(model.name)
                if entry is not None and self._serves(entry, model, load, limit_tokens):
                    continue
                if entry is not None:
                    # Other options: the runner answers its requests in flight and exits; it counts
                    # against memory until then, and the new one loads beside it if that fits.
                    self._lifecycle.retire(entry, "reloaded")
                entry = await self._load(model, load, limit_tokens, longest_input_tokens, keep_alive_s, deadline_s)
                self._acquire(entry, keep_alive_s)  # in the step that registered it: nobody evicts it first
                return entry, True

    async def _load(
        self,
        model: StoredModel,
        load: LoadOptions,
        limit_tokens: int,
        longest_input_tokens: int,
        keep_alive_s: float | None,
        deadline_s: float,
    ) -> LoadedModel:
        """Make room for a runner, then start it in the same step (one start at a time)."""
        # Today's header checks on every load (read once per file): a model stored before a check
        # gets its refusal here, not an abort of its runner at its first decode.
        header = await asyncio.to_thread(loadable_facts, model)
        # A manifest written before the estimate needed the vocabulary's size takes the header's facts.
        facts = model.facts if model.facts.vocab_size else header
        splits = splits_across_ubatches(facts.causal_attention, facts.pooling_type)
        params = replace(
            llama_params(load, facts.context_length, facts.block_count, splits, facts.vocab_size),
            append_eos=model.prompts.append_eos,
        )
        # Task adapters are read into llama.cpp's buffers: their bytes count as the weights' do.
        shape = ModelShape.of(facts, model.size_bytes + model.adapter_bytes)
        # Set aside what the first request's largest decode needs, not the model's longest input: a
        # 32k-context model serving short queries must not reserve its worst case up front.
        allowance = decode_tokens_for(params, load, limit_tokens, longest_input_tokens)

        device, part = await self._place_on_gpu(model.name, load, facts, header, shape, params, deadline_s)
        if device is not None:
            self._runners.loading_device[model.name] = (device.index, part.total_bytes)  # promised in this step
            # A device runner has no quick lane (engine), and its backend's runtime takes host memory.
            params = replace(params, n_gpu_layers=part.layers, quick_lane_tokens=0)
        else:
            params = replace(params, n_gpu_layers=0)
        try:
            host_shape = _host_shape(shape, device, part)
            estimated = peak_bytes(host_shape, params.n_batch, allowance, params.n_ubatch, params.quick_lane_tokens)
            estimated += DEVICE_RUNTIME_BYTES if device is not None else 0
            await self._room.make(model.name, estimated, deadline_s)
            entry = await self._lifecycle.start(
                model, load, params, host_shape, allowance, estimated, keep_alive_s, deadline_s
            )
        finally:
            self._runners.loading_device.pop(model.name, None)
        if device is not None:
            _place(entry, device, part, shape.file_bytes - host_shape.file_bytes)
        return entry

    async def _place_on_gpu(
        self,
        name: str,
        load: LoadOptions,
        facts: GGUFFacts,
        header: GGUFFacts,
        shape: ModelShape,
        params: LlamaParams,
        deadline_s: float,
    ) -> tuple[Device | None, DevicePart]:
        """The GPU a new runner offloads to and its part there (None: all on the CPU), as num_gpu
        asks and the device's room allows (Room.place)."""
        n_seq_max = min(params.n_batch, MAX_SEQUENCES_PER_DECODE)
        block_count, architecture = facts.block_count, facts.architecture

        def part_of(layers: int) -> DevicePart:
            return device_part(
                shape, header.layer_bytes, header.output_layer_bytes, layers, params.n_batch, params.n_ubatch, n_seq_max
            )

        def part_bytes(layers: int) -> int:
            # A placement llama.cpp cannot run never fits: automatic offload takes all or nothing.
            return part_of(layers).total_bytes if may_offload(architecture, layers, block_count) else sys.maxsize

        wanted_layers = layers_for(load.num_gpu, block_count)
        exact = load.num_gpu >= 0
        if exact and not may_offload(architecture, wanted_layers, block_count):
            raise InvalidInput(
                f"num_gpu {load.num_gpu}: llama.cpp cannot run part of a {architecture} model on a GPU; "
                f"offload all of it (-1 or {offloadable_layers(block_count)}) or none (0)"
            )
        device, layers = await self._room.place(name, load.main_gpu, wanted_layers, exact, part_bytes, deadline_s)
        return device, part_of(layers)

    @contextlib.asynccontextmanager
    async def lease_if_loaded(self, model: StoredModel) -> AsyncIterator[RunnerProcess | None]:
        """Hold the model's runner if it is loaded and serving, without ever loading it; else None."""
        entry = self._runners.loaded.get(model.name)
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
            and entry.model.adapters == model.adapters  # created again with other task adapters
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
                share_threads(self._cpus, self._runners.loaded.values())

    def _acquire(self, entry: LoadedModel, keep_alive_s: float | None) -> None:
        entry.refcount += 1
        if entry.refcount == 1:
            share_threads(self._cpus, self._runners.loaded.values())
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
        share_threads(self._cpus, self._runners.loaded.values())
        self._runners.notify_memory()  # an idle runner can be evicted or renewed to make room
        if self._runners.loaded.get(entry.name) is not entry:
            return  # already retired or crashed
        if entry.keep_alive_s < 0:
            entry.expires_at_wall_s = None
        elif entry.keep_alive_s == 0:
            self._expire(entry)
        else:
            entry.expires_at_wall_s = self._wall_clock() + entry.keep_alive_s
            entry.timer = asyncio.get_running_loop().call_later(entry.keep_alive_s, self._expire, entry)

    def _expire(self, entry: LoadedModel) -> None:
        if entry.refcount == 0 and self._runners.loaded.get(entry.name) is entry:
            log.info("unloading %s (keep_alive expired)", entry.name)
            # Retired now, so no request leases a runner that is about to stop.
            self._lifecycle.retire(entry, "expired")
