"""Pure policy of the runner: how an input is cut to the context, and how sequences are packed into
one llama.cpp decode. No llama_cpp import, so it is table-tested anywhere."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from daemon.errors import ContextExceeded

INPUT_TOO_LONG = "the input length exceeds the context length"
LIMIT_TOO_SMALL = "input after truncation exceeds maximum context length"


def fit_tokens(
    tokens: Sequence[int],
    head_specials: int,
    tail_specials: int,
    limit: int,
    truncate: bool,
    keep_end: bool = False,
) -> tuple[list[int], bool]:
    """Cut `tokens` (special tokens included) to `limit`, keeping the beginning (or with `keep_end`,
    Cohere's truncate START, the end) and the special tokens at both ends. Returns the tokens and
    whether they were cut.

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
    if keep_end:
        content_end = len(tokens) - tail_specials
        return list(tokens[:head_specials]) + list(tokens[content_end - keep_content : content_end]) + tail, True
    return list(tokens[: head_specials + keep_content]) + tail, True


# A request passed over for this many decodes in a row goes first (ageing: long inputs are not
# starved by a stream of short ones).
OVERDUE_AFTER_DECODES = 8
# A decode of a batch job's lines holds at most this many tokens: an interactive query that arrives
# meanwhile waits for it (then goes first), so it is kept short. Measured with bench_batch.py on
# all-MiniLM, 2 cores, 2026-12-03 (a 512-token decode takes about 130 ms), 200 queries one at a time
# beside a batch: p99 against W4's and the batch's pace against alone were 1.07x and 0.87 with the
# whole decode budget (512), 0.98x and 0.90 with 256, 0.66x and 0.87 with 128; opening the quick lane
# beside batch decodes instead gave 0.22x and 0.62.
BACKGROUND_DECODE_TOKENS = 128
# Sequences up to this many tokens share decodes whatever their lengths; longer ones share only with
# sequences within a factor of two (see same_bucket).
SHORT_SEQUENCE_TOKENS = 32


@dataclass(frozen=True)
class QueuedRequest:
    """A request waiting in a runner, as the packing policy sees it."""

    lengths: Sequence[int]  # tokens of its sequences not decoded yet, shortest first
    passed_over: int = 0  # decodes run in a row without any of its sequences
    # Its task adapter (None: the base model): one decode runs with one adapter set on its context,
    # so only requests of one task share a decode.
    task: str | None = None
    # Token vectors (pooling NONE) come from another context than pooled vectors: only requests of
    # one kind share a decode, as with tasks.
    tokens: bool = False
    # A batch job's lines (daemon.batches): decoded only when no interactive request waits.
    background: bool = False


def same_bucket(first: int, length: int) -> bool:
    """Whether a sequence may join a decode whose first sequence has `first` tokens. Attention costs
    the square of a decode's tokens, so a short query packed beside a long document waits as long as
    the document; short sequences share freely, longer ones with their own kind."""
    return max(first, length) <= max(2 * min(first, length), SHORT_SEQUENCE_TOKENS)


def is_short(length: int) -> bool:
    """A sequence the quick lane takes."""
    return length <= SHORT_SEQUENCE_TOKENS


def quick_lane_opens(threads: int, shortest_tokens: int, quick_lane: bool) -> bool:
    """Whether the quick lane (when the runner has one) may decode short inputs beside the next
    decode of the main context, whose shortest sequence has `shortest_tokens` tokens.

    A decode of short sequences is over soon: short inputs that arrive meanwhile wait for it, and
    share the next one. A long decode (a 400-token document: about 100 ms on two cores) lets the
    quick lane answer them while it runs. The long decode keeps every thread (measured with 16
    clients, 10% of them sending documents: queries' p99 111 to 181 ms with every thread, 149 ms
    with one fewer; 275 to 299 ms with no quick lane). One thread leaves nothing to share.

    A batch job's decodes (background) open it no more than others: a query beside a batch waits
    for the batch's current decode and then goes first (see take_batch). Opening it made the query
    and the batch share the cores (measured with bench_batch.py: the batch kept 0.62 of its pace).
    """
    return quick_lane and threads >= 2 and not is_short(shortest_tokens)


def window_overlap_tokens(window_content_tokens: int) -> int:
    """How many content tokens consecutive windows share: an eighth of a window (64 tokens of a
    512-token context), so no sentence is only ever seen cut at a window's edge."""
    return window_content_tokens // 8


def split_windows(tokens: Sequence[int], head_specials: int, tail_specials: int, limit: int) -> list[list[int]]:
    """An input longer than `limit` as windows of at most `limit` tokens, each between the special
    tokens as a text of its own would be, overlapping by window_overlap_tokens; an input that fits
    is its own single window."""
    if len(tokens) <= limit:
        return [list(tokens)]
    size = limit - head_specials - tail_specials
    if size < 1:
        raise ContextExceeded(LIMIT_TOO_SMALL)
    head = list(tokens[:head_specials])
    tail = list(tokens[len(tokens) - tail_specials :]) if tail_specials else []
    content = tokens[head_specials : len(tokens) - tail_specials]
    stride = max(1, size - window_overlap_tokens(size))
    windows = []
    start = 0
    while True:
        windows.append([*head, *content[start : start + size], *tail])
        if start + size >= len(content):
            return windows
        start += stride


def take_batch(
    requests: Sequence[QueuedRequest], batch_tokens: int, max_sequences: int, overdue_first: bool = True
) -> list[int]:
    """How many sequences of each waiting request go into the next decode.

    Requests take turns, one sequence a turn, so one request of 4,096 inputs cannot hold a 1-input
    request back for its whole length. Turns go to overdue requests first (when `overdue_first`:
    the runner alternates, so that overdue long inputs do not run back to back while short ones
    wait), then to the shortest next sequence, then by arrival. Background requests (a batch job's
    lines) take turns only when no interactive request waits. Only requests of the first turn's
    task and output kind (pooled or token vectors) take turns (the others are passed over, and so
    become overdue in time). Sequences are taken while they fit the token budget and the first
    one's bucket; the first is always taken, alone if longer than the budget (the context was sized
    so that any single input fits).
    """
    counts = [0] * len(requests)

    def turn_order(index: int) -> tuple[bool, int, int]:
        overdue = overdue_first and requests[index].passed_over >= OVERDUE_AFTER_DECODES
        return (not overdue, requests[index].lengths[0], index)

    turns = sorted((index for index, request in enumerate(requests) if request.lengths), key=turn_order)
    if any(not requests[index].background for index in turns):
        # Interactive requests first: a batch job's lines take decodes no interactive request wants.
        turns = [index for index in turns if not requests[index].background]
    elif turns:
        batch_tokens = min(batch_tokens, BACKGROUND_DECODE_TOKENS)
    if not turns:
        return counts
    task, tokens = requests[turns[0]].task, requests[turns[0]].tokens
    turns = [index for index in turns if (requests[index].task, requests[index].tokens) == (task, tokens)]
    first = requests[turns[0]].lengths[0]
    total = taken = 0
    while turns and taken < max_sequences:
        still_taking = []
        for index in turns:
            lengths = requests[index].lengths
            length = lengths[counts[index]]
            if taken >= max_sequences or (
                taken > 0 and (total + length > batch_tokens or not same_bucket(first, length))
            ):
                continue  # its later sequences are no shorter: its turns are over for this decode
            counts[index] += 1
            total += length
            taken += 1
            if counts[index] < len(lengths):
                still_taking.append(index)
        turns = still_taking
    return counts


def wrap_token_ids(ids: Sequence[int], head: Sequence[int], tail: Sequence[int]) -> list[int]:
    """Token ids between the model's special tokens, as a text's tokens are. Ids that already start
    (or end) with them, as a Hugging Face tokenizer gives them, are not wrapped again: [CLS] [CLS]
    ... [SEP] [SEP] embeds another vector (cosine 0.96 for "why is the sky blue?")."""
    ids = list(ids)
    starts = bool(head) and ids[: len(head)] == list(head)
    ends = bool(tail) and len(ids) >= len(head) * starts + len(tail) and ids[len(ids) - len(tail) :] == list(tail)
    return [*([] if starts else head), *ids, *([] if ends else tail)]


def special_token_split(with_specials: Sequence[int], without_specials: Sequence[int]) -> tuple[int, int]:
    """(leading, trailing) special tokens the tokenizer adds, found by comparing the two
    tokenizations of one probe text."""
    extra = len(with_specials) - len(without_specials)
    for head in range(extra + 1):
        if list(with_specials[head : head + len(without_specials)]) == list(without_specials):
            return head, extra - head
    # The tokenizer changes the text's own tokens when it adds specials: treat all as leading.
    return extra, 0
