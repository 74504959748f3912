"""Memory: a probe of what the machine really has (psutil + cgroup v2) and pure policy functions."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

MIB = 1024 * 1024
# A runner is a Python interpreter with llama.cpp loaded, before any model weights.
RUNNER_BASE_BYTES = 80 * MIB


@dataclass(frozen=True)
class MemorySnapshot:
    available_bytes: int
    total_bytes: int


def _read_cgroup_value(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return None if text == "max" else int(text)


class MemoryProbe:
    """What a new runner could use now: the lesser of the machine's and the cgroup's headroom."""

    def __init__(self, cgroup_root: Path = Path("/sys/fs/cgroup")) -> None:
        self._cgroup_root = cgroup_root

    def snapshot(self) -> MemorySnapshot:
        virtual = psutil.virtual_memory()
        available, total = int(virtual.available), int(virtual.total)
        limit = _read_cgroup_value(self._cgroup_root / "memory.max")
        used = _read_cgroup_value(self._cgroup_root / "memory.current")
        if limit is not None and used is not None:
            available = min(available, max(0, limit - used))
            total = min(total, limit)
        return MemorySnapshot(available, total)


def estimate_runner_bytes(model_file_bytes: int, n_ctx: int, n_embd: int, n_ubatch: int) -> int:
    """What a runner will hold once loaded: its weights (mmapped pages count once touched), the
    compute buffers (scale with ubatch x context for attention, and ubatch x embedding width), and
    the interpreter."""
    attention_bytes = 4 * n_ubatch * n_ctx * 4  # a few f32 score matrices per layer, reused
    activations_bytes = 16 * n_ubatch * max(n_embd, 1) * 4
    return model_file_bytes + attention_bytes + activations_bytes + RUNNER_BASE_BYTES


def fits(required_bytes: int, available_bytes: int, reserve_bytes: int) -> bool:
    return required_bytes + reserve_bytes <= available_bytes


@dataclass(frozen=True)
class EvictionCandidate:
    name: str
    in_use: bool  # leased by a request right now
    last_used_s: float  # monotonic time of the last lease's end
    size_bytes: int


def pick_victim(candidates: Sequence[EvictionCandidate]) -> EvictionCandidate | None:
    """The idle model unused longest; None when every model is busy."""
    idle = [candidate for candidate in candidates if not candidate.in_use]
    return min(idle, key=lambda candidate: candidate.last_used_s, default=None)
