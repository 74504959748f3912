"""The glossary of the token counts the daemon names: one meaning a name, and every `*_tokens` name
in the scheduler and memory code is one of these (tests/test_token_counts.py holds them to it).

A count of tokens always includes the special tokens a tokenizer adds (BERT's [CLS] and [SEP]).
llama.cpp's own parameters keep llama.cpp's names: n_ctx (a context's cells), n_batch (the most
tokens one llama_decode call takes) and n_ubatch (the most tokens of one ubatch, the part of a decode
llama.cpp computes at once).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

TOKEN_COUNTS: Final[Mapping[str, str]] = MappingProxyType(
    {
        "limit_tokens": (
            "The longest single input a runner takes: the model's trained context, cut by num_ctx."
            " A request's limit_tokens is its own num_ctx's, at most its runner's; a longer input is"
            " cut (truncate) or refused."
        ),
        "batch_tokens": (
            "The token budget of one decode: the runner packs sequences into a decode up to it"
            " (num_batch; 0 in the options: automatic, see options.auto_batch_tokens). A request's"
            " num_batch changes it on a live runner, never above n_ubatch."
        ),
        "capacity_tokens": (
            "The most tokens one decode holds: n_batch, which is n_ctx too. A single input longer"
            " than batch_tokens goes alone in one decode, up to this."
        ),
        "longest_input_tokens": (
            "An upper bound on the tokens of a request's longest input, known before tokenizing"
            " (memory.input_tokens_bound)."
        ),
        "decode_tokens": (
            "The largest decode one request can cause on a runner: its batch_tokens, or its longest"
            " input alone, at most capacity_tokens (memory.decode_tokens_for)."
        ),
        "allowance_tokens": (
            "The largest decode memory is set aside for on a runner. A request whose decode_tokens"
            " exceed it raises it before the request is sent; a renewed context lowers it to"
            " batch_tokens again."
        ),
        "largest_decode_tokens": (
            "The tokens of the largest decode a runner has run since its context was made or renewed"
            " (0: none yet): the buffers llama.cpp has touched and keeps. Read with a measurement of"
            " the runner's memory, it says which decodes that measurement holds."
        ),
        "ubatch_tokens": (
            "The tokens of one ubatch, which size llama.cpp's compute buffer: at most n_ubatch"
            " (llama.cpp calls it n_tokens)."
        ),
        "quick_lane_tokens": (
            "The quick lane's context, and the most tokens of one of its decodes"
            " (options.QUICK_LANE_TOKENS); 0: the runner has no quick lane."
        ),
        "unused_quick_lane_tokens": (
            "A runner's quick_lane_tokens until its quick lane's first decode touches the lane's"
            " buffers, 0 after: what its measurements leave out, counted from load on."
        ),
    }
)

# Names that meant the same count as another, merged into it: the daemon uses them no more.
MERGED_TOKEN_COUNTS: Final[Mapping[str, str]] = MappingProxyType(
    {
        # The worker's live token budget: batch_tokens, as a request's num_batch last set it.
        "budget_tokens": "batch_tokens",
        # A runner's largest_decode_tokens, as read with its last memory measurement.
        "measured_at_tokens": "largest_decode_tokens",
    }
)
