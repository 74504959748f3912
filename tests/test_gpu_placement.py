"""The scheduler's GPU placement on any machine: a daemon whose device probe reports a GPU (a child
that prints what llama.cpp's would), over this CPU build of llama.cpp. The runners run on the CPU
(the build ignores n_gpu_layers), so what is proven here is the scheduler's part: how many layers
it asks for, the device memory it counts (the estimate, since no device buffer is logged), the 507
and 400 refusals, and idle models giving way on the device. tests/gpu/ proves the same on a real
Vulkan device (`make test-gpu`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from daemon.api.app import build_app
from daemon.config import Settings
from daemon.gguf_info import read_gguf_facts
from daemon.memory.probe import DeviceProbe
from daemon.store import ModelStore
from tests.family_ggufs import make_family_gguf

Client = TestClient[Any, Any]
MIB = 1 << 20
MINILM_LAYERS = 7  # six repeating layers and the output layer


def probe_reporting(*gpus: tuple[str, int]) -> DeviceProbe:
    """A device probe whose child reports the CPU and these GPUs (name, MiB free and total)."""
    devices = [{"name": "CPU", "description": "cpu", "type": "cpu", "free_bytes": 1 << 34, "total_bytes": 1 << 34}]
    devices += [
        {"name": name, "description": "a GPU", "type": "gpu", "free_bytes": mib * MIB, "total_bytes": mib * MIB}
        for name, mib in gpus
    ]
    script = f"import sys; sys.stdout.write({json.dumps(json.dumps({'devices': devices}))})"
    return DeviceProbe(command=[sys.executable, "-c", script])


@pytest.fixture
def make_gpu_client(aiohttp_client: Any, tmp_path: Path) -> Any:
    async def make(models: dict[str, Path], probe: DeviceProbe, **overrides: Any) -> Client:
        settings = Settings(home=tmp_path / "home", **{"calibrate_on_store": False, **overrides})
        store = ModelStore(settings.home)
        store.open()
        for name, path in models.items():
            store.create(name, path)
        client: Client = await aiohttp_client(build_app(settings, device_probe=probe))
        return client

    return make


async def embed(client: Client, model: str, **options: Any) -> tuple[int, Any]:
    response = await client.post("/api/embed", json={"model": model, "input": ["hello"], "options": options})
    return response.status, await response.json()


async def loaded(client: Client) -> dict[str, dict[str, Any]]:
    answer = await (await client.get("/api/ps")).json()
    return {entry["name"]: entry for entry in answer["models"]}


async def test_a_model_that_fits_goes_to_the_gpu_whole(make_gpu_client: Any, minilm_gguf: Path) -> None:
    client = await make_gpu_client({"m": minilm_gguf}, probe_reporting(("FakeGPU0", 100)))
    status, answer = await embed(client, "m")
    assert status == 200, answer
    entry = (await loaded(client))["m:latest"]
    assert (entry["gpu_layers"], entry["gpu_device"]) == (MINILM_LAYERS, "FakeGPU0")
    # At least every repeating layer's weights (the token embeddings stay on the CPU), within the GPU.
    assert sum(read_gguf_facts(minilm_gguf).layer_bytes) < entry["size_vram"] <= 100 * MIB
    assert entry["size"] > entry["size_vram"]  # the whole model: the host part and the device part


async def test_under_a_cap_automatic_offload_takes_part_and_an_exact_count_is_a_507(
    make_gpu_client: Any, minilm_gguf: Path
) -> None:
    probe = probe_reporting(("FakeGPU0", 100))
    client = await make_gpu_client({"m": minilm_gguf}, probe, max_gpu_memory_bytes=24 * MIB)
    status, answer = await embed(client, "m", num_gpu=MINILM_LAYERS)
    assert status == 507, answer
    assert "for 7 layers" in answer["error"] and "max_gpu_memory is 24 MiB" in answer["error"], answer
    status, answer = await embed(client, "m")
    assert status == 200, answer
    entry = (await loaded(client))["m:latest"]
    assert 0 < entry["gpu_layers"] < MINILM_LAYERS, entry
    assert 0 < entry["size_vram"] <= 24 * MIB


async def test_a_gpu_too_small_for_any_layer_leaves_the_model_on_the_cpu(
    make_gpu_client: Any, minilm_gguf: Path
) -> None:
    client = await make_gpu_client({"m": minilm_gguf}, probe_reporting(("FakeGPU0", 4)))
    status, answer = await embed(client, "m")
    assert status == 200, answer
    entry = (await loaded(client))["m:latest"]
    assert (entry["gpu_layers"], entry["gpu_device"], entry["size_vram"]) == (0, "", 0)


async def test_main_gpu_past_the_gpus_is_a_400(make_gpu_client: Any, minilm_gguf: Path) -> None:
    client = await make_gpu_client({"m": minilm_gguf}, probe_reporting(("FakeGPU0", 100), ("FakeGPU1", 100)))
    status, answer = await embed(client, "m", main_gpu=2)
    assert status == 400 and "main_gpu 2" in answer["error"] and "2 GPU(s)" in answer["error"], answer
    status, answer = await embed(client, "m", main_gpu=1)
    assert status == 200, answer
    assert (await loaded(client))["m:latest"]["gpu_device"] == "FakeGPU1"


async def test_two_models_on_a_gpu_that_holds_one_take_turns(make_gpu_client: Any, minilm_gguf: Path) -> None:
    probe = probe_reporting(("FakeGPU0", 40))  # one all-MiniLM whole (about 26 MiB), never two
    client = await make_gpu_client({"first": minilm_gguf, "second": minilm_gguf}, probe)
    for model in ("first", "second", "first"):
        status, answer = await embed(client, model)
        assert status == 200, answer
        models = await loaded(client)
        assert models[f"{model}:latest"]["gpu_layers"] == MINILM_LAYERS
        assert sum(entry["size_vram"] for entry in models.values()) <= 40 * MIB


async def test_a_probe_that_fails_loads_on_the_cpu(make_gpu_client: Any, minilm_gguf: Path) -> None:
    probe = DeviceProbe(command=[sys.executable, "-c", "import sys; sys.exit('no driver')"])
    client = await make_gpu_client({"m": minilm_gguf}, probe)
    status, answer = await embed(client, "m")
    assert status == 200, answer
    assert (await loaded(client))["m:latest"]["gpu_layers"] == 0


async def test_a_family_llama_cpp_cannot_split_is_offloaded_whole_or_not_at_all(
    make_gpu_client: Any, tmp_path: Path
) -> None:
    path = make_family_gguf("nomic-bert-moe", tmp_path / "moe.gguf", layers=2)
    client = await make_gpu_client({"moe": path}, probe_reporting(("FakeGPU0", 100)))
    status, answer = await embed(client, "moe", num_gpu=2)
    assert status == 400 and "cannot run part of a nomic-bert-moe model" in answer["error"], answer
    status, answer = await embed(client, "moe")
    assert status == 200, answer
    assert (await loaded(client))["moe:latest"]["gpu_layers"] == 3  # both layers and the output layer
