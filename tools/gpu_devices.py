"""Print the devices llama.cpp sees (name, description, type, free and total MiB) in this virtualenv.

    .venv-gpu/bin/python tools/gpu_devices.py          # lavapipe needs GGML_VK_VISIBLE_DEVICES=0

llama-cpp-python does not bind ggml's device API, so this reads it through ctypes from the
libllama it loaded: dlsym on that handle also finds libggml's and libggml-base's symbols, which
libllama links. The backends built in (CPU, and Vulkan or CUDA) register themselves on the first
registry call; nothing has to be loaded first.
"""

import ctypes

from llama_cpp import llama_cpp

# enum ggml_backend_dev_type in ggml/include/ggml-backend.h, in order.
DEVICE_TYPES = ("CPU", "GPU", "IGPU", "ACCEL", "META")


def main() -> None:
    lib = llama_cpp._lib
    lib.ggml_backend_dev_count.restype = ctypes.c_size_t
    lib.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
    lib.ggml_backend_dev_get.restype = ctypes.c_void_p
    for name in ("ggml_backend_dev_name", "ggml_backend_dev_description"):
        getattr(lib, name).argtypes = [ctypes.c_void_p]
        getattr(lib, name).restype = ctypes.c_char_p
    lib.ggml_backend_dev_type.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_dev_type.restype = ctypes.c_int
    size_p = ctypes.POINTER(ctypes.c_size_t)
    lib.ggml_backend_dev_memory.argtypes = [ctypes.c_void_p, size_p, size_p]
    lib.ggml_backend_dev_memory.restype = None

    for index in range(lib.ggml_backend_dev_count()):
        device = lib.ggml_backend_dev_get(index)
        free_b, total_b = ctypes.c_size_t(), ctypes.c_size_t()
        lib.ggml_backend_dev_memory(device, ctypes.byref(free_b), ctypes.byref(total_b))
        kind = lib.ggml_backend_dev_type(device)
        print(
            f"{index}: {lib.ggml_backend_dev_name(device).decode()}"
            f" ({lib.ggml_backend_dev_description(device).decode()})"
            f" type={DEVICE_TYPES[kind] if kind < len(DEVICE_TYPES) else kind}"
            f" free={free_b.value / 2**20:.0f} MiB total={total_b.value / 2**20:.0f} MiB"
        )


if __name__ == "__main__":
    main()
