"""Thread sharing: the CPUs split among the busy runners whose llama.cpp threads are automatic and
whose layers run on the CPU."""

from __future__ import annotations

from collections.abc import Iterable

from daemon.options import thread_share
from daemon.scheduling.runners import LoadedModel


def share_threads(cpus: int, loaded: Iterable[LoadedModel]) -> None:
    """Give each automatic runner its share of `cpus` (see options.thread_share): all of them to a
    runner working alone, an equal part to each of several busy at once. A runner is told only when
    its share changes. A runner with every layer on a GPU hardly uses its threads (the CPU only
    looks up its token embeddings), so it is not counted among the busy ones."""
    automatic = [e for e in loaded if e.load.num_thread == 0]
    share = thread_share(cpus, sum(1 for e in automatic if e.refcount > 0 and not e.fully_offloaded))
    for entry in automatic:
        if entry.threads != share:
            entry.runner.set_threads(share)
            entry.threads = share
