"""GPU offload's pure parts: which devices take layers, what n layers put on a device, the room a
device has, how many layers fit; and the header and log facts they are computed from."""

from __future__ import annotations

import pytest

from daemon.gguf_info import layer_placement_bytes
from daemon.memory import ModelShape
from daemon.memory.offload import (
    Device,
    device_part,
    device_room_bytes,
    gpus_of,
    layers_for,
    most_layers_within,
)
from daemon.runner.protocol import parse_device_buffer_log

MIB = 1 << 20


def _reported(name: str, kind: str, description: str = "", free: int = 0, total: int = 0) -> dict[str, object]:
    return {"name": name, "type": kind, "description": description, "free_bytes": free, "total_bytes": total}


def test_gpus_are_the_discrete_ones_or_else_the_integrated_ones_in_llama_cpps_order() -> None:
    cpu = _reported("CPU", "cpu")
    blas = _reported("BLAS", "accel")
    igpu = _reported("Vulkan1", "igpu", "AMD Radeon 780M")
    gpus = gpus_of([cpu, _reported("CUDA0", "gpu", free=7, total=8), blas, igpu, _reported("CUDA1", "gpu")])
    assert [(g.index, g.name, g.free_bytes, g.total_bytes) for g in gpus] == [(0, "CUDA0", 7, 8), (1, "CUDA1", 0, 0)]
    assert [(g.index, g.name) for g in gpus_of([cpu, igpu])] == [(0, "Vulkan1")]
    assert gpus_of([cpu, blas]) == []
    # A malformed report (a child of another version) gives zeros, not an exception.
    [odd] = gpus_of([{"name": "X", "type": "gpu", "free_bytes": "lots"}])
    assert (odd.free_bytes, odd.total_bytes) == (0, 0)


@pytest.mark.parametrize(
    ("kind", "description", "host_memory"),
    [
        ("gpu", "NVIDIA H200", False),
        ("igpu", "AMD Radeon 780M", True),
        ("gpu", "llvmpipe (LLVM 15.0.6, 256 bits)", True),  # Mesa's lavapipe: a CPU-run Vulkan device
        ("gpu", "SwiftShader Device (Subzero)", True),
    ],
)
def test_a_device_whose_memory_is_the_hosts_is_known(kind: str, description: str, host_memory: bool) -> None:
    assert Device(0, "Vulkan0", description, kind, 0, 0).host_memory is host_memory


@pytest.mark.parametrize(
    ("num_gpu", "block_count", "layers"),
    [(-1, 6, 7), (0, 6, 0), (3, 6, 3), (7, 6, 7), (999, 6, 7), (-1, 24, 25)],
)
def test_num_gpu_asks_for_layers_the_output_layer_counted(num_gpu: int, block_count: int, layers: int) -> None:
    assert layers_for(num_gpu, block_count) == layers


def _encoder(n_embd: int = 64) -> ModelShape:
    return ModelShape(file_bytes=1000, n_embd=n_embd, n_ff=4 * n_embd, n_vocab=100, architecture="bert")


def test_the_device_part_is_the_output_layer_first_then_the_last_layers() -> None:
    layer_bytes = (10, 20, 30)
    parts = [device_part(_encoder(), layer_bytes, 5, layers, 512, 512, 64) for layers in range(6)]
    assert [part.weights_bytes for part in parts] == [0, 5, 5 + 30, 5 + 30 + 20, 5 + 30 + 20 + 10, 65]
    assert [part.layers for part in parts] == [0, 1, 2, 3, 4, 5]
    # No layer offloaded: nothing on the device, not even a compute buffer.
    assert parts[0].total_bytes == 0
    # The compute buffer: the graph's widest stage for every count, and a partial offload adds
    # attention's scores (one head, as the shape gives none, x 512 x 512 tokens in f32).
    full = parts[4].compute_bytes
    assert full > 0 and parts[5].compute_bytes == full
    assert {part.compute_bytes for part in parts[1:4]} == {full + 4 * 512 * 512}
    assert all(part.kv_bytes == 0 for part in parts)  # an encoder has no KV cache


def test_a_causal_models_kv_cache_goes_with_its_offloaded_layers() -> None:
    shape = ModelShape(
        file_bytes=1000, n_embd=64, n_ff=192, n_vocab=100, n_layer=4, q_width=64, kv_width=64, architecture="qwen3"
    )
    # f16 keys and values: 2 bytes x kv_width x 256 cells (512 tokens pad to 512) per layer.
    per_layer = 2 * 64 * 512
    kv = [device_part(shape, (1, 1, 1, 1), 0, layers, 512, 512, 64).kv_bytes for layers in range(6)]
    assert kv == [0, 0, per_layer, 2 * per_layer, 3 * per_layer, 4 * per_layer]


@pytest.mark.parametrize(
    ("free", "total", "cap", "counted", "promised", "room"),
    [
        (1000, 2000, 0, 0, 0, 1000),  # the free memory the device reports
        (600, 2000, 0, 400, 0, 600),  # a device that reports its buffers: free already left them out
        (2048, 2048, 0, 1500, 0, 548),  # one whose free memory does not move (lavapipe): total less held
        (2048, 2048, 24, 10, 0, 14),  # max_gpu_memory bounds it
        (2048, 2048, 24, 30, 0, 0),  # never below zero
        (2048, 2048, 0, 0, 500, 1548),  # a starting runner's promise is not handed out again
        (5000, 0, 0, 0, 0, 5000),  # a device that reports no total
    ],
)
def test_a_devices_room(free: int, total: int, cap: int, counted: int, promised: int, room: int) -> None:
    device = Device(0, "Vulkan0", "", "gpu", free, total)
    assert device_room_bytes(device, cap, counted, promised) == room


@pytest.mark.parametrize(
    ("room", "wanted", "layers"),
    [(0, 7, 0), (99, 7, 0), (100, 7, 1), (135, 7, 2), (1000, 7, 7), (1000, 3, 3), (1000, 0, 0)],
)
def test_the_most_layers_that_fit(room: int, wanted: int, layers: int) -> None:
    # 100 for the first layer (the output layer and the compute buffer), then 30 for each.
    assert most_layers_within(room, wanted, lambda n: 100 + 30 * (n - 1)) == layers


@pytest.mark.parametrize(("room", "layers"), [(99, 0), (160, 7), (170, 7), (155, 2)])
def test_every_layer_can_fit_where_fewer_do_not(room: int, layers: int) -> None:
    # A partial offload's scores (+40 here) make 6 layers dearer than all 7 (see device_part).
    def part_bytes(n: int) -> int:
        return 100 + 10 * (n - 1) + (0 if n == 7 else 40)

    assert most_layers_within(room, 7, part_bytes) == layers


def test_a_headers_tensors_are_placed_as_llama_cpp_places_them() -> None:
    sizes = {
        "token_embd.weight": 1000,  # the input layer: always on the CPU
        "position_embd.weight": 100,
        "token_types.weight": 10,
        "token_embd_norm.weight": 3,  # with the first repeating layer
        "blk.0.attn_q.weight": 20,
        "blk.0.ffn_up.weight": 40,
        "blk.1.attn_q.weight": 21,
        "blk.1.ffn_up.weight": 41,
        "cls.weight": 7,  # a reranker's head: the output layer
        "output_norm.weight": 2,
    }
    assert layer_placement_bytes("bert", 2, sizes) == ((63, 62), 9)
    # Qwen3 without output.weight: llama.cpp copies the token embedding for the output layer.
    assert layer_placement_bytes("qwen3", 2, sizes) == ((63, 62), 1009)
    assert layer_placement_bytes("qwen3", 2, {**sizes, "output.weight": 500}) == ((63, 62), 509)


def test_the_buffers_llama_cpp_logs_on_one_device() -> None:
    lines = [
        "load_tensors:      Vulkan0 model buffer size =    21.50 MiB",
        "load_tensors:   CPU_Mapped model buffer size =    23.41 MiB",
        "llama_context: Vulkan_Host  output buffer size =     0.12 MiB",
        "llama_kv_cache:    Vulkan0 KV buffer size =     2.00 MiB",
        "sched_reserve:    Vulkan0 compute buffer size =    12.25 MiB",
        "sched_reserve: Vulkan_Host compute buffer size =     1.00 MiB",
        "sched_reserve:    Vulkan1 compute buffer size =    99.00 MiB",
    ]
    assert parse_device_buffer_log(lines, "Vulkan0") == {
        "model": round(21.5 * MIB),
        "kv": 2 * MIB,
        "compute": round(12.25 * MIB),
    }
    assert parse_device_buffer_log(lines, "CUDA0") == {}
