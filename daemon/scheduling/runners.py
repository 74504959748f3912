"""The runners the scheduler holds: each one's state (LoadedModel) and the registry of every runner
whose process is alive, the one owner of runner state."""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass, field

from daemon.memory import ModelShape, counted_bytes, measure_process, runner_footprint_bytes
from daemon.memory.offload import Device
from daemon.options import LlamaParams, LoadOptions
from daemon.runner.client import RunnerProcess
from daemon.store import StoredModel


class RunnerStatus(enum.Enum):
    """Where a runner is in its life. Each counts against memory until its process has exited."""

    LOADING = "loading"  # its process starts (counted by estimate: Runners.loading)
    READY = "ready"  # serves requests
    DRAINING = "draining"  # unloaded: answers the requests that hold it, takes no new ones
    STOPPING = "stopping"  # asked to exit


@dataclass(frozen=True)
class Measurement:
    """What a runner's process held when last measured, and the largest decode it had run then: read
    together, so what the runner may still grow to is counted from that decode on."""

    held_bytes: int  # what its process adds to memory (runner_footprint_bytes)
    largest_decode_tokens: int  # the runner's largest_decode_tokens when held_bytes was read


@dataclass(eq=False)
class LoadedModel:
    model: StoredModel
    load: LoadOptions
    params: LlamaParams
    runner: RunnerProcess
    keep_alive_s: float
    shape: ModelShape
    # The largest decode memory is set aside for. It grows before a request that may need more is
    # sent (see leases), and falls back when the runner renews its context (see renewal).
    allowance_tokens: int
    measured: Measurement  # at the last refresh (until the first: the load's estimate)
    status: RunnerStatus = RunnerStatus.READY
    refcount: int = 0
    last_used_s: float = 0.0
    expires_at_wall_s: float | None = None  # None: in use, or kept forever
    threads: int = 0  # llama.cpp threads the runner uses now
    timer: asyncio.TimerHandle | None = None
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    # The GPU its offloaded layers are on (None: all on the CPU), how many (the output layer counted,
    # as llama.cpp's n_gpu_layers), and what it holds there: llama.cpp's own buffer log when the
    # runner reported one, else the estimate. Device buffers are allocated whole when the context is
    # made, so this does not grow. On a device whose memory is the host's it is in the runner's
    # measured memory too, and counted there once (see size_bytes).
    device: Device | None = None
    offloaded_layers: int = 0
    device_bytes: int = 0
    host_weights_bytes: int = -1  # the weights it maps from the file (-1: all of them)

    @property
    def size_bytes(self) -> int:
        """What the model takes in all, as /api/ps's size: what is counted on the host, plus the
        device part on a GPU with memory of its own."""
        separate = self.device is not None and not self.device.host_memory
        return self.counted_bytes + (self.device_bytes if separate else 0)

    @property
    def fully_offloaded(self) -> bool:
        """Every layer on the GPU: its decodes hardly use the CPU's threads."""
        return self.device is not None and self.offloaded_layers > self.model.facts.block_count

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
            self.measured.held_bytes,
            self.measured.largest_decode_tokens,
            allowance_tokens,
            params.n_ubatch,
            self.runner.unused_quick_lane_tokens,
        )

    def growth_bytes(self, allowance_tokens: int) -> int:
        """What counting the runner for a decode of `allowance_tokens` adds to what it counts now."""
        return self.counted_bytes_for(allowance_tokens) - self.counted_bytes

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
            weights = self.model.size_bytes if self.host_weights_bytes < 0 else self.host_weights_bytes
            held_bytes = runner_footprint_bytes(memory, weights, self.params.use_mmap)
            self.measured = Measurement(held_bytes, largest)


class Runners:
    """Every runner whose process is alive, by state, and the signal that memory may have been
    freed. Each job of the scheduler reads and changes runners here, and nowhere else."""

    def __init__(self) -> None:
        self.loaded: dict[str, LoadedModel] = {}  # serving, by canonical name
        self.leaving: set[LoadedModel] = set()  # draining or stopping: their process has not exited yet
        self.loading: dict[str, int] = {}  # model -> estimated bytes, while its runner starts
        # model -> (GPU index, estimated bytes there), from its placement until its runner is loaded.
        self.loading_device: dict[str, tuple[int, int]] = {}
        # Set (and replaced) each time memory may have been freed: a runner went idle or exited, a
        # load ended. Whoever waits for room looks again then.
        self.memory_changed = asyncio.Event()

    def alive(self) -> list[LoadedModel]:
        """Every runner whose process is alive: loaded, draining or stopping."""
        return [*self.loaded.values(), *self.leaving]

    def notify_memory(self) -> None:
        """Wake whoever waits for room (see room.Room.make)."""
        self.memory_changed.set()
        self.memory_changed = asyncio.Event()
