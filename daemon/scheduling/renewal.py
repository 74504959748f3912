"""Context renewal: an idle runner that grew for a long input gives that memory back with a fresh
llama.cpp context, before any model is unloaded for room."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable

from daemon.errors import RunnerCrashed, ShuttingDown
from daemon.metrics import Metrics
from daemon.scheduling.runners import LoadedModel

# One logger for the whole scheduler, named as before it was split into jobs: log filters keep working.
log = logging.getLogger("daemon.scheduler")


def pick_renewal(candidates: Iterable[LoadedModel]) -> LoadedModel | None:
    """The idle runner that grew and was unused longest; None when no idle runner grew."""
    grown = [e for e in candidates if e.refcount == 0 and e.grown]
    return min(grown, key=lambda e: e.last_used_s, default=None)


async def renew(entry: LoadedModel, metrics: Metrics) -> None:
    """Give back what a runner grew to: a fresh context, and memory set aside for its token budget
    again (requests from now on reserve more if they need it)."""
    log.info("renewing the context of %s to give back memory", entry.name)
    entry.allowance_tokens = entry.params.batch_tokens
    with contextlib.suppress(RunnerCrashed, ShuttingDown):  # a runner that died gave it all back
        await entry.runner.renew_context()
    entry.refresh()
    metrics.context_renewed(entry.name)
