"""What a new runner may take now, and which idle model gives way: pure decisions on a snapshot of
memory (probe.py takes the snapshot), table-tested."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class MemorySnapshot:
    machine_available_bytes: int  # psutil's available: what the machine could still give
    total_bytes: int  # the machine's memory, or the cgroup's limit when that is less
    cgroup_limit_bytes: int | None = None  # the service's own cgroup limit, if it has one
    cgroup_used_bytes: int = 0  # what that cgroup is charged, less reclaimable page cache

    @property
    def cgroup_headroom_bytes(self) -> int | None:
        if self.cgroup_limit_bytes is None:
            return None
        return max(0, self.cgroup_limit_bytes - self.cgroup_used_bytes)


def budget_bytes(
    snapshot: MemorySnapshot, reserve_bytes: int, promised_bytes: int = 0, cached_weights_bytes: int = 0
) -> int:
    """What a new runner may take now. The reserve keeps memory for the rest of the machine; inside
    a cgroup limit the limit is the service's budget, and the reserve does not shrink it.

    `promised_bytes` is what loaded runners may still grow to (counted, not yet held), so it is not
    handed out twice. `cached_weights_bytes` is the weights loaded runners map: page cache that
    psutil's `available` counts as free, though evicting it would only make the runners read it back.
    """
    budget = snapshot.machine_available_bytes - reserve_bytes - cached_weights_bytes
    headroom = snapshot.cgroup_headroom_bytes
    if headroom is not None:
        budget = min(budget, headroom)
    return max(0, budget - promised_bytes)


def fits(required_bytes: int, budget: int, loaded_bytes: int = 0, max_memory_bytes: int = 0) -> bool:
    """Whether a runner of `required_bytes` fits: in the budget now, and under max_memory (0: no cap)
    beside the runners already loaded."""
    if max_memory_bytes and loaded_bytes + required_bytes > max_memory_bytes:
        return False
    return required_bytes <= budget


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


def could_ever_fit(
    required_bytes: int, budget: int, candidates: Sequence[EvictionCandidate], max_memory_bytes: int
) -> bool:
    """Whether unloading every loaded model could make room: if not, refuse at once and evict
    nothing. (Busy models count: they go idle in time.)"""
    if max_memory_bytes and required_bytes > max_memory_bytes:
        return False
    return required_bytes <= budget + sum(candidate.size_bytes for candidate in candidates)
