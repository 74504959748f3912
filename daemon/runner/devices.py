"""llama.cpp's devices, read with ctypes from the libggml that llama-cpp-python ships: each one's name,
type, free and total memory. Runs in a child (`python -m daemon.runner.devices` prints them as
JSON, or a runner), never in the daemon: a GPU driver's initialisation belongs in a process that
may die of it.

ggml registers its backends (CPU, and Vulkan, CUDA or Metal when built in) the first time its
registry is used; the device calls below do that.
"""

from __future__ import annotations

import ctypes
import importlib.util
import sys
from pathlib import Path

import orjson

# ggml_backend_dev_type (ggml-backend.h), as the names the daemon uses.
DEVICE_TYPES = {0: "cpu", 1: "gpu", 2: "igpu", 3: "accel", 4: "meta"}


def _ggml_library_path() -> Path:
    """The libggml of the installed llama-cpp-python (found without importing it: importing
    llama_cpp loads every library and is the runner's business)."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        raise RuntimeError("llama-cpp-python is not installed")
    library_dir = Path(spec.origin).parent / "lib"
    for name in ("libggml.so", "libggml.dylib", "ggml.dll"):
        if (library_dir / name).exists():
            return library_dir / name
    raise RuntimeError(f"no libggml in {library_dir}")


def _ggml() -> ctypes.CDLL:
    ggml = ctypes.CDLL(str(_ggml_library_path()), mode=ctypes.RTLD_GLOBAL)
    ggml.ggml_backend_dev_count.restype = ctypes.c_size_t
    ggml.ggml_backend_dev_get.restype = ctypes.c_void_p
    ggml.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
    for function in (ggml.ggml_backend_dev_name, ggml.ggml_backend_dev_description):
        function.restype = ctypes.c_char_p
        function.argtypes = [ctypes.c_void_p]
    ggml.ggml_backend_dev_type.restype = ctypes.c_int
    ggml.ggml_backend_dev_type.argtypes = [ctypes.c_void_p]
    ggml.ggml_backend_dev_memory.restype = None
    ggml.ggml_backend_dev_memory.argtypes = [
        ctypes.c_void_p,
        ctypes.POINTER(ctypes.c_size_t),
        ctypes.POINTER(ctypes.c_size_t),
    ]
    return ggml


def read_devices() -> list[dict[str, object]]:
    """Every device llama.cpp sees, in its order (the CPU's too): name, description, type, free and
    total bytes as the backend reports them."""
    ggml = _ggml()
    devices: list[dict[str, object]] = []
    for index in range(ggml.ggml_backend_dev_count()):
        device = ggml.ggml_backend_dev_get(index)
        free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
        ggml.ggml_backend_dev_memory(device, ctypes.byref(free), ctypes.byref(total))
        devices.append(
            {
                "name": (ggml.ggml_backend_dev_name(device) or b"").decode("utf-8", "replace"),
                "description": (ggml.ggml_backend_dev_description(device) or b"").decode("utf-8", "replace"),
                "type": DEVICE_TYPES.get(ggml.ggml_backend_dev_type(device), "unknown"),
                "free_bytes": free.value,
                "total_bytes": total.value,
            }
        )
    return devices


def main() -> None:
    sys.stdout.buffer.write(orjson.dumps({"devices": read_devices()}) + b"\n")


if __name__ == "__main__":
    main()
