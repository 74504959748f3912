"""The largest decode a request can cause (memory.decode_tokens_for): what a lease sets memory aside
for before the request is sent."""

from __future__ import annotations

import pytest

from daemon.memory import decode_tokens_for
from daemon.options import LlamaParams, LoadOptions


def runner_params(n_batch: int, n_ubatch: int, limit_tokens: int, batch_tokens: int) -> LlamaParams:
    return LlamaParams(
        n_gpu_layers=0,
        main_gpu=0,
        use_mmap=True,
        n_ctx=n_batch,
        n_batch=n_batch,
        n_ubatch=n_ubatch,
        n_threads=1,
        n_threads_batch=1,
        limit_tokens=limit_tokens,
        batch_tokens=batch_tokens,
    )


def request(batch_tokens: int = 0) -> LoadOptions:
    return LoadOptions(num_ctx=0, batch_tokens=batch_tokens, num_thread=0, num_gpu=-1, main_gpu=0, use_mmap=True)


# An encoder of 512 tokens: one decode is one ubatch of up to 512 tokens, packed up to 256.
ENCODER = runner_params(n_batch=512, n_ubatch=512, limit_tokens=512, batch_tokens=256)
# A causal model of 8,192 tokens that decodes a long input in ubatches of 512.
CAUSAL = runner_params(n_batch=8192, n_ubatch=512, limit_tokens=8192, batch_tokens=512)


@pytest.mark.parametrize(
    ("params", "load", "limit_tokens", "longest_input_tokens", "expected"),
    [
        (ENCODER, request(), 512, 10, 256),  # short inputs: the runner's token budget
        (ENCODER, request(), 512, 400, 400),  # a longer input goes alone
        (ENCODER, request(), 512, 5000, 512),  # cut at the context
        (ENCODER, request(), 128, 5000, 256),  # the request's num_ctx cuts it, the budget stays
        (ENCODER, request(64), 512, 10, 64),  # the request's num_batch
        (ENCODER, request(1024), 512, 10, 512),  # ... never above a ubatch
        (ENCODER, request(), 512, 0, 256),  # no inputs known
        (CAUSAL, request(), 8192, 20, 512),
        (CAUSAL, request(), 8192, 3000, 3000),  # alone, over several ubatches
        (CAUSAL, request(), 8192, 20000, 8192),
        (CAUSAL, request(2048), 8192, 20, 512),  # packing stops at a ubatch
    ],
)
def test_decode_tokens_for(
    params: LlamaParams, load: LoadOptions, limit_tokens: int, longest_input_tokens: int, expected: int
) -> None:
    assert decode_tokens_for(params, load, limit_tokens, longest_input_tokens) == expected
