#!/usr/bin/env bash
# Builds llama-cpp-python's wheel with a GPU backend of llama.cpp once, into a cache folder named
# by its flags, and prints the wheel's path (the only thing on stdout; progress goes to stderr).
#   tools/build_gpu_wheel.sh vulkan   Vulkan (runs on Mesa's lavapipe, a CPU Vulkan driver, too)
#   tools/build_gpu_wheel.sh cuda     CUDA for CUDA_ARCH (default: native, this machine's GPUs)
#   tools/build_gpu_wheel.sh metal    Metal (macOS on Apple silicon)
# PYTHON is the interpreter whose pip builds the wheel (default python3).
set -euo pipefail
shopt -s inherit_errexit  # a failure inside $(...) stops the script too

backend=${1:?usage: tools/build_gpu_wheel.sh vulkan|cuda|metal}
version=0.3.36
python=${PYTHON:-python3}
cache=${XDG_CACHE_HOME:-$HOME/.cache}/emberd
sudo=$([ "$(id -u)" = 0 ] || echo sudo)

# Debian 12's Vulkan headers (1.3.239) lack VK_EXT_layer_settings, which ggml-vulkan uses: take
# Debian 13's libvulkan-dev headers (only the headers; the system's loader is linked) through a
# private apt state, so the system's apt sources and lists stay untouched.
vulkan_include_dir() {
    if grep -qs VK_EXT_layer_settings /usr/include/vulkan/vulkan_core.h; then
        echo /usr/include
        return
    fi
    local dir=$cache/vulkan-headers
    if [ ! -f "$dir/usr/include/vulkan/vulkan_core.h" ]; then
        # The system's own Debian mirror (comments dropped: they may name a snapshot).
        local mirror
        mirror=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources \
            2>/dev/null | grep -v '^[[:space:]]*#' | grep -m 1 -oE 'https?://[^[:space:]]*/debian/?([[:space:]]|$)' \
            | tr -d '[:space:]' || true)  # || true: some of those files may not exist
        [ -n "$mirror" ] || { echo "no Debian mirror in /etc/apt/sources.list*" >&2; exit 1; }
        local apt_dir
        apt_dir=$(mktemp -d)
        mkdir -p "$apt_dir/state/lists/partial" "$apt_dir/cache/archives/partial" "$apt_dir/parts"
        echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror trixie main" \
            >"$apt_dir/sources.list"
        local apt=(apt-get -q -o "Dir::Etc::SourceList=$apt_dir/sources.list" -o "Dir::Etc::SourceParts=$apt_dir/parts"
            -o "Dir::State=$apt_dir/state" -o "Dir::Cache=$apt_dir/cache")
        "${apt[@]}" update >&2
        (cd "$apt_dir" && "${apt[@]}" download libvulkan-dev >&2)
        mkdir -p "$dir"
        dpkg -x "$apt_dir"/libvulkan-dev_*.deb "$dir"
        rm -rf "$apt_dir"
    fi
    echo "$dir/usr/include"
}

case $backend in
    vulkan)
        wheels=$cache/wheels/llama-cpp-python-$version-vulkan
        # glslc compiles the shaders; ggml-vulkan's CMakeLists finds SPIRV-Headers' CMake config.
        packages=(glslc libvulkan-dev spirv-headers mesa-vulkan-drivers)
        ;;
    cuda)
        wheels=$cache/wheels/llama-cpp-python-$version-cuda-${CUDA_ARCH:-native}
        cmake_args="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=${CUDA_ARCH:-native} -DLLAVA_BUILD=OFF"
        packages=()
        ;;
    metal)
        wheels=$cache/wheels/llama-cpp-python-$version-metal
        cmake_args="-DGGML_METAL=on -DLLAVA_BUILD=OFF"
        packages=()
        ;;
    *)
        echo "unknown backend '$backend': vulkan, cuda or metal" >&2
        exit 2
        ;;
esac

wheel=$(ls "$wheels"/llama_cpp_python-"$version"-*.whl 2>/dev/null | head -n 1 || true)
if [ -z "$wheel" ]; then
    missing=()
    for package in "${packages[@]}"; do
        dpkg-query -W -f '${Status}' "$package" 2>/dev/null | grep -q 'install ok installed' || missing+=("$package")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        $sudo apt-get update -q >&2
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q "${missing[@]}" >&2
    fi
    if [ "$backend" = vulkan ]; then
        cmake_args="-DGGML_VULKAN=on -DVulkan_INCLUDE_DIR=$(vulkan_include_dir) -DLLAVA_BUILD=OFF"
    fi
    # pip's wheel cache ignores CMAKE_ARGS (it could hand back a CPU build): no cache, a folder per flags.
    echo "building llama-cpp-python $version with: $cmake_args" >&2
    CMAKE_ARGS=$cmake_args "$python" -m pip wheel --no-deps --no-binary llama-cpp-python --no-cache-dir \
        "llama-cpp-python==$version" -w "$wheels" >&2
    wheel=$(ls "$wheels"/llama_cpp_python-"$version"-*.whl | head -n 1)
fi
echo "$wheel"
