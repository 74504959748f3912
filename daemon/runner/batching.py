"""Pure policy of the runner: how an input is cut to the context, and how sequences are packed into
one llama.cpp decode. No llama_cpp import, so it is table-tested anywhere."""

from __future__ import annotations

from collections.abc import Sequence

from daemon.errors import ContextExceeded

INPUT_TOO_LONG = "the input length exceeds the context length"
LIMIT_TOO_SMALL = "input after truncation exceeds maximum context length"


def fit_tokens(
    tokens: Sequence[int], head_specials: int, tail_specials: int, limit: int, truncate: bool
) -> tuple[list[int], bool]:
    """Cut `tokens` (special tokens included) to `limit`, keeping the beginning and the special
    tokens at both ends. Returns the tokens and whether they were cut.

    Cutting on token ids, never on text, so no detokenize/retokenize round trip can shift the cut.
    """
    if len(tokens) <= limit:
        return list(tokens), False
    if not truncate:
        raise ContextExceeded(INPUT_TOO_LONG)
    keep_content = limit - head_specials - tail_specials
    if keep_content < 1:
        raise ContextExceeded(LIMIT_TOO_SMALL)
    tail = list(tokens[len(tokens) - tail_specials :]) if tail_specials else []
    return list(tokens[: head_specials + keep_content]) + tail, True


def take_batch(lengths: Sequence[int], budget_tokens: int, max_sequences: int) -> int:
    """How many of the waiting sequences (in arrival order) go into the next decode.

    Sequences are taken while they fit the token budget; the first one is always taken, alone if it
    is longer than the budget (the context was sized so that any single input fits).
    """
    taken = 0
    total = 0
    for length in lengths:
        if taken >= max_sequences or (taken > 0 and total + length > budget_tokens):
            break
        taken += 1
        total += length
    return taken


def special_token_split(with_specials: Sequence[int], without_specials: Sequence[int]) -> tuple[int, int]:
    """(leading, trailing) special tokens the tokenizer adds, found by comparing the two
    tokenizations of one probe text."""
    extra = len(with_specials) - len(without_specials)
    for head in range(extra + 1):
        if list(with_specials[head : head + len(without_specials)]) == list(without_specials):
            return head, extra - head
    # The tokenizer changes the text's own tokens when it adds specials: treat all as leading.
    return extra, 0
