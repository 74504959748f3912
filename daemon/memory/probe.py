"""The memory probe: what the machine and the service's own cgroup have left, and what a runner's
process holds, read from psutil, the cgroup files and /proc. The I/O edge of memory; the texts it
reads are parsed by pure functions, table-tested.

The cgroup is the process's own, found through /proc/self/cgroup: under systemd that is
/sys/fs/cgroup/system.slice/emberd.service (where MemoryMax= lands), in a container the container's.
What a cgroup is charged counts the page cache too; what it cannot reclaim is the charge less the
cached file pages no process maps (the kubelet's "working set" subtracts every inactive file page,
which would leave out the weights of a runner idle for a while).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import orjson
import psutil

from daemon.memory.budget import MemorySnapshot
from daemon.memory.estimate import ProcessMemory
from daemon.memory.offload import Device, gpus_of

log = logging.getLogger(__name__)

# cgroup v1 writes "no limit" as the largest page-aligned counter (9223372036854771712).
_NO_LIMIT_BYTES = 1 << 62


@dataclass(frozen=True)
class OwnCgroup:
    version: int  # 1 or 2
    directory: Path  # its memory controller's directory
    root: Path  # the controller's mount: limits are looked for up to here


def find_own_cgroup(proc_self_cgroup: str, cgroup_root: Path) -> OwnCgroup | None:
    """The memory cgroup a /proc/self/cgroup text names. v1's memory controller wins on hybrid
    systems (it is where limits are kept there); else the v2 unified hierarchy."""
    v2_path = None
    for line in proc_self_cgroup.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy != "0" and "memory" in controllers.split(","):
            root = cgroup_root / "memory"
            return OwnCgroup(1, root / path.lstrip("/"), root)
        if hierarchy == "0" and controllers == "":
            v2_path = path
    if v2_path is None:
        return None
    root = cgroup_root if (cgroup_root / "cgroup.controllers").exists() else cgroup_root / "unified"
    return OwnCgroup(2, root / v2_path.lstrip("/"), root)


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _read_stat(path: Path) -> dict[str, int]:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return {}
    stat = {}
    for line in lines:
        key, _, value = line.partition(" ")
        if value.strip().isdigit():
            stat[key] = int(value)
    return stat


def read_cgroup_memory(cgroup: OwnCgroup) -> tuple[int | None, int]:
    """(limit, charge less reclaimable page cache) of a cgroup, the limit being the lowest on the way
    up to the root (a parent's limit binds its children too); (None, 0) when unreadable."""
    if cgroup.version == 1:
        stat = _read_stat(cgroup.directory / "memory.stat")
        limit = stat.get("hierarchical_memory_limit") or _read_int(cgroup.directory / "memory.limit_in_bytes")
        usage = _read_int(cgroup.directory / "memory.usage_in_bytes") or 0
        file_cache = stat.get("total_cache", 0)
        mapped_file = stat.get("total_mapped_file", 0)
    else:
        limits = []
        directory = cgroup.directory
        while True:
            limits += [_read_int(directory / name) for name in ("memory.max", "memory.high")]
            if directory == cgroup.root or directory.parent == directory:
                break
            directory = directory.parent
        limit = min((value for value in limits if value is not None), default=None)
        usage = _read_int(cgroup.directory / "memory.current") or 0
        stat = _read_stat(cgroup.directory / "memory.stat")
        file_cache = stat.get("file", 0)
        mapped_file = stat.get("file_mapped", 0)
    if limit is not None and limit >= _NO_LIMIT_BYTES:
        limit = None
    # Page cache can be reclaimed, unless a process maps it: a runner's weights (active or not:
    # reclaiming them would only make the runner read them back). The weights of a runner that has
    # exited stay cached, and count no more.
    reclaimable = max(0, file_cache - mapped_file)
    return limit, max(0, usage - reclaimable)


class MemoryProbe:
    """What a new runner could use now: the machine's available memory and the headroom of the
    cgroup this process runs in."""

    def __init__(
        self, cgroup_root: Path = Path("/sys/fs/cgroup"), proc_self_cgroup: Path = Path("/proc/self/cgroup")
    ) -> None:
        self._cgroup_root = cgroup_root
        self._proc_self_cgroup = proc_self_cgroup

    def own_cgroup(self) -> OwnCgroup | None:
        try:
            text = self._proc_self_cgroup.read_text()
        except OSError:
            return None  # not Linux
        return find_own_cgroup(text, self._cgroup_root)

    def snapshot(self) -> MemorySnapshot:
        virtual = psutil.virtual_memory()
        available, total = int(virtual.available), int(virtual.total)
        cgroup = self.own_cgroup()
        limit, used = read_cgroup_memory(cgroup) if cgroup is not None else (None, 0)
        return MemorySnapshot(available, min(total, limit or total), limit, used)


def parse_smaps_rollup(text: str) -> ProcessMemory:
    """/proc/PID/smaps_rollup's totals (kB) as a ProcessMemory."""
    fields: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        value = rest.split()
        if len(value) == 2 and value[1] == "kB" and value[0].isdigit():
            fields[key] = int(value[0]) * 1024
    return ProcessMemory(fields.get("Anonymous", 0), fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0))


def measure_process(pid: int) -> ProcessMemory | None:
    """A process's own memory (Linux: smaps_rollup; elsewhere psutil's USS); None if it is gone."""
    try:
        return parse_smaps_rollup(Path(f"/proc/{pid}/smaps_rollup").read_text())
    except FileNotFoundError:
        pass  # not Linux, or the process is gone
    except OSError:
        return None
    try:
        uss = int(psutil.Process(pid).memory_full_info().uss)
        return ProcessMemory(uss, uss)  # no anonymous/file split here: the private pages
    except psutil.Error:
        return None


# The child that reports llama.cpp's devices (daemon/runner/devices.py).
DEVICES_COMMAND = (sys.executable, "-m", "daemon.runner.devices")
DEVICES_TIMEOUT_S = 60.0  # a GPU driver's first initialisation may compile shaders
# Environment variables that choose which devices a backend shows (GGML_VK_VISIBLE_DEVICES, ...).
_DEVICE_VARIABLE_PREFIXES = ("GGML_", "CUDA_", "HIP_", "ROCR_", "GPU_", "MESA_", "VK_")


class DeviceProbe:
    """The GPUs llama.cpp sees and their free memory, read by a child (GPU drivers are initialised
    in processes that may die of it, never in the daemon) before each load that may offload, since
    other programs move a GPU's free memory. A build with no GPU is known after the first read, and
    costs nothing after that."""

    # Builds and environments found without a GPU, for the whole process (a test suite starts many
    # daemons): the probe's command and the environment variables that choose devices.
    _without_gpu: ClassVar[set[tuple[tuple[str, ...], frozenset[tuple[str, str]]]]] = set()

    def __init__(self, environment: Mapping[str, str] | None = None, command: Sequence[str] = DEVICES_COMMAND) -> None:
        self._environment = environment
        self._command = tuple(command)

    def _key(self) -> tuple[tuple[str, ...], frozenset[tuple[str, str]]]:
        environment = self._environment if self._environment is not None else os.environ
        chosen = {(k, v) for k, v in environment.items() if k.startswith(_DEVICE_VARIABLE_PREFIXES)}
        return self._command, frozenset(chosen)

    async def gpus(self) -> list[Device]:
        key = self._key()
        if key in DeviceProbe._without_gpu:
            return []
        reported = await self._read()
        if reported is None:
            return []  # the probe failed (logged): load on the CPU this time
        gpus = gpus_of(reported)
        if not gpus:
            DeviceProbe._without_gpu.add(key)
        return gpus

    async def _read(self) -> list[dict[str, object]] | None:
        environment = dict(self._environment if self._environment is not None else os.environ)
        environment["GGML_NO_BACKTRACE"] = "1"
        try:
            process = await asyncio.create_subprocess_exec(
                *self._command,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=environment,
            )
        except OSError as error:
            log.warning("cannot start the device probe: %s", error)
            return None
        try:
            async with asyncio.timeout(DEVICES_TIMEOUT_S):
                stdout, stderr = await process.communicate()
        except TimeoutError:
            process.kill()
            await process.wait()
            log.warning("the device probe took longer than %gs", DEVICES_TIMEOUT_S)
            return None
        try:
            devices = orjson.loads(stdout)["devices"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            tail = stderr.decode("utf-8", "replace").strip().splitlines()[-3:]
            log.warning("the device probe failed (exit %s): %s", process.returncode, " | ".join(tail))
            return None
        return [item for item in devices if isinstance(item, dict)] if isinstance(devices, list) else None
