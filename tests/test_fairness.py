"""A huge request does not hold small ones back: requests take turns in the runner's decodes.

Proved by what the runner did, not by how fast: each frame it sends carries the decodes it ran since
the previous one, so the decodes between two answers are counted."""

from __future__ import annotations

import asyncio
from pathlib import Path

from daemon.runner.batching import OVERDUE_AFTER_DECODES
from tests.test_cancellation import PASSAGE, start_minilm

HUGE_INPUTS = 1024
SMALL_REQUESTS = 12


async def test_one_input_requests_are_answered_within_a_few_decodes_while_a_huge_request_decodes(
    minilm_gguf: Path,
) -> None:
    # No quick lane: the main context's own turns are what is tested.
    runner, frames = await start_minilm(minilm_gguf, quick_lane=False)
    try:
        await runner.embed([PASSAGE], True)  # warm up
        huge = asyncio.create_task(runner.embed([f"{PASSAGE} [{i}]" for i in range(HUGE_INPUTS)], True))
        small = []
        for index in range(SMALL_REQUESTS):
            small.append(await runner.embed([f"why is the sky blue? ({index})"], True))
            assert not huge.done(), f"the huge request finished before small request {index} was answered"
        huge.cancel()  # what is left of it is dropped
    finally:
        await runner.stop(5.0)
    # Every small answer came while the huge request still decoded (above), each after a few decodes
    # since the previous answer: its own, and the huge request's decodes
    # that ran while the answer before it travelled (a huge request passed over this long goes first).
    between = [len(result.decodes) for result in small]
    assert max(between) <= OVERDUE_AFTER_DECODES + 2, between
    assert all(result.vectors.shape == (1, 384) for result in small)
    assert len(frames.results) == SMALL_REQUESTS + 1  # and the warm-up: the huge request was never answered
