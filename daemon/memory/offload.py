"""GPU offload: the devices llama.cpp reports, what a model puts on one for a number of offloaded
layers, how many layers a device takes, and what it has left. Pure: no I/O, table-tested (the
devices are read by a child, see runner/devices.py and probe.DeviceProbe).

llama.cpp's rule (llama_model_base::load_tensors): n_gpu_layers = L puts the output layer on the
device first, then the last L - 1 repeating layers; the input layer (token embeddings) stays on the
CPU. A layer's KV cache lives with the layer. The device runs the offloaded part of the graph, and
its compute buffer is sized for the whole graph's widest stage.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from daemon.memory.estimate import ModelShape, compute_buffer_bytes, kv_cache_bytes

# Device types whose memory is the host's RAM (ggml's "integrated GPU using host memory"): what a
# runner puts there is also in its process's memory, and counted once, on the host (see
# Device.host_memory).
_HOST_MEMORY_TYPES = frozenset({"igpu"})


@dataclass(frozen=True)
class Device:
    """A GPU as llama.cpp reports it; `index` is its place among the GPUs (what main_gpu counts)."""

    index: int
    name: str  # "Vulkan0", "CUDA0", "Metal"
    description: str
    kind: str  # "gpu" (its own memory) or "igpu" (the host's)
    free_bytes: int
    total_bytes: int

    @property
    def host_memory(self) -> bool:
        """Whether its memory is the host's RAM (an integrated GPU, Apple's unified memory, Mesa's
        lavapipe): its bytes count against the host too."""
        return self.kind in _HOST_MEMORY_TYPES or _runs_on_the_cpu(self.description)


def _runs_on_the_cpu(description: str) -> bool:
    # Mesa's lavapipe and SwiftShader report a GPU type, but allocate in the process's own memory.
    lowered = description.lower()
    return "llvmpipe" in lowered or "lavapipe" in lowered or "swiftshader" in lowered


def gpus_of(reported: Sequence[dict[str, object]]) -> list[Device]:
    """The devices llama.cpp offloads layers to, among those a child reported (runner/devices.py's
    JSON), in llama.cpp's order (llama_model_load_from_file): the discrete GPUs, or the integrated
    ones when there is no discrete GPU. The CPU and accelerators (BLAS, AMX) are not among them."""
    discrete = [item for item in reported if item.get("type") == "gpu"]
    chosen = discrete or [item for item in reported if item.get("type") == "igpu"]
    gpus: list[Device] = []
    for index, item in enumerate(chosen):
        free, total = item.get("free_bytes", 0), item.get("total_bytes", 0)
        gpus.append(
            Device(
                index=index,
                name=str(item.get("name", "")),
                description=str(item.get("description", "")),
                kind=str(item.get("type")),
                free_bytes=free if isinstance(free, int) else 0,
                total_bytes=total if isinstance(total, int) else 0,
            )
        )
    return gpus


# What a GPU backend's runtime adds to a runner's host memory once it drives a device (its driver,
# loader, compiled kernels), counted in the load's host estimate beside the model: measured,
# a runner with all-MiniLM on Mesa's lavapipe held 142 MiB more than one on the CPU (2026-12-03).
# After the load the runner is measured, and that is what counts.
DEVICE_RUNTIME_BYTES = 144 * 1024 * 1024

# Families that llama.cpp (the pinned build) crashes on when only part of the model is offloaded:
# nomic-bert-moe's expert layers split between the CPU and a Vulkan device died of SIGSEGV at the
# first decode (2026-12-03); all of it on the device, or none, works.
WHOLE_OFFLOAD_ONLY = frozenset({"nomic-bert-moe"})
# Families whose attention llama.cpp never runs as flash attention (T5's position bias): their
# compute buffer already holds the scores (see estimate._relative_attention_floats).
_SCORES_COUNTED = frozenset({"t5encoder"})


def may_offload(architecture: str, layers: int, block_count: int) -> bool:
    """Whether `layers` offloaded is a placement llama.cpp can run for the family."""
    whole = layers <= 0 or layers >= offloadable_layers(block_count)
    return whole or architecture not in WHOLE_OFFLOAD_ONLY


def offloadable_layers(block_count: int) -> int:
    """llama.cpp's layer count for n_gpu_layers: the repeating layers and the output layer."""
    return block_count + 1


def layers_for(num_gpu: int, block_count: int) -> int:
    """The layers a request's num_gpu asks for: -1 (automatic) is all of them, as the most wanted;
    more than the model has is all of them."""
    most = offloadable_layers(block_count)
    return most if num_gpu < 0 else min(num_gpu, most)


@dataclass(frozen=True)
class DevicePart:
    """What a runner puts on its device with `layers` offloaded (llama.cpp's n_gpu_layers)."""

    layers: int
    weights_bytes: int
    kv_bytes: int
    compute_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_bytes + self.compute_bytes


def device_part(
    shape: ModelShape,
    layer_bytes: Sequence[int],
    output_layer_bytes: int,
    layers: int,
    n_batch: int,
    ubatch_tokens: int,
    n_seq_max: int,
) -> DevicePart:
    """The device's share of a runner with `layers` offloaded: the output layer's weights and the
    last `layers - 1` repeating layers', their KV cache (a causal model), and a compute buffer for a
    ubatch of `ubatch_tokens`. The output buffer (embeddings read back) stays in host memory.

    The compute buffer is the graph's widest stage, as on the CPU (compute_buffer_bytes). A partial
    offload adds attention's scores, n_head x ubatch x attended tokens in f32: measured on Vulkan
    with all-MiniLM (n_ubatch 512), every layer offloaded took a 5.1 MiB compute buffer on the
    device, and any fewer layers 17.0 MiB, even the output layer alone (llama.cpp then runs
    attention without flash attention, and sends the CPU layers' large products to the device
    too). So a partial offload can need more of the device than a full one."""
    if layers <= 0:
        return DevicePart(0, 0, 0, 0)
    repeating = min(layers - 1, len(layer_bytes))
    weights = output_layer_bytes + sum(layer_bytes[len(layer_bytes) - repeating :])
    kv = kv_cache_bytes(shape, n_batch) * repeating // max(shape.n_layer, 1) if shape.n_layer else 0
    n_kv = n_batch if shape.splits else 0
    compute = compute_buffer_bytes(shape, ubatch_tokens, n_seq_max, n_kv)
    if repeating < len(layer_bytes) and shape.architecture not in _SCORES_COUNTED:
        compute += 4 * max(shape.n_head, 1) * ubatch_tokens * (n_kv or ubatch_tokens)
    return DevicePart(layers, weights, kv, compute)


def device_room_bytes(device: Device, cap_bytes: int, counted_bytes: int, promised_bytes: int = 0) -> int:
    """What a new runner may put on `device` now. `counted_bytes` is what the runners already hold
    there, `promised_bytes` what starting runners will. Its free memory as reported is the most (it
    already leaves out what the runners allocated, on a device that reports them); the cap (0: none,
    else max_gpu_memory) or the device's total, less what the runners hold, bounds it too (a
    device whose reported free memory does not move as buffers are allocated, such as lavapipe's)."""
    limit = device_capacity_bytes(device, cap_bytes)
    return max(0, min(device.free_bytes, limit - counted_bytes) - promised_bytes)


def device_capacity_bytes(device: Device, cap_bytes: int) -> int:
    """The most runners may ever hold on `device`: its total (its free memory where a backend
    reports no total), or the cap (max_gpu_memory) when that is less."""
    reported_total = device.total_bytes or device.free_bytes
    return min(cap_bytes, reported_total) if cap_bytes else reported_total


def most_layers_within(room_bytes: int, wanted_layers: int, part_bytes: Callable[[int], int]) -> int:
    """The most layers up to `wanted_layers` whose device part fits `room_bytes` (0: none fits).
    Every count is tried: a partial offload's compute buffer can outweigh a full one's (see
    device_part)."""
    return max((n for n in range(1, wanted_layers + 1) if part_bytes(n) <= room_bytes), default=0)
