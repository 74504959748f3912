"""The Batch API's pure rules: an input file's lines checked and chunked, and the status table."""

from __future__ import annotations

import json
from typing import Any

import pytest

from daemon.batches.lines import (
    CANCELLED,
    CANCELLING,
    COMPLETED,
    EXPIRED,
    FAILED,
    FINALIZING,
    IN_PROGRESS,
    VALIDATING,
    decode_lines,
    may_become,
    validate_input,
)

ENDPOINT = "/v1/embeddings"


def line(custom_id: Any, body: Any = None, url: str = ENDPOINT, method: str = "POST") -> bytes:
    fields = {"custom_id": custom_id, "method": method, "url": url, "body": body or {"model": "m", "input": "x"}}
    return json.dumps(fields).encode()


def test_lines_are_chunked_in_order_and_blank_lines_skipped() -> None:
    content = b"\n".join([line("a"), b"", line("b"), b"   ", line("c"), line("d"), line("e")])
    validated = validate_input(content, ENDPOINT, chunk_lines=2)
    assert validated.errors == [] and validated.total == 5
    assert [count for _lines, count in validated.chunks] == [2, 2, 1]
    requests = [request for lines, _count in validated.chunks for request in decode_lines(lines)]
    assert [(request.number, request.custom_id) for request in requests] == [
        (1, "a"),
        (3, "b"),
        (5, "c"),
        (6, "d"),
        (7, "e"),
    ]


@pytest.mark.parametrize(
    ("raw", "status", "message"),
    [
        (line("x", url="/v1/chat/completions"), 400, "url must be the batch's endpoint"),
        (line("x", method="GET"), 400, "method must be POST"),
        (json.dumps({"custom_id": "x", "method": "POST", "url": ENDPOINT, "body": [1]}).encode(), 400, "body must be"),
    ],
)
def test_a_request_for_another_endpoint_or_without_an_object_body_goes_to_the_error_file(
    raw: bytes, status: int, message: str
) -> None:
    validated = validate_input(raw, ENDPOINT)
    assert validated.errors == []
    (request,) = decode_lines(validated.chunks[0][0])
    assert request.body is None and request.error_status == status and message in request.error_message


@pytest.mark.parametrize(
    ("content", "code", "line_number"),
    [
        (b"{not json", "invalid_json_line", 1),
        (line("a") + b"\n[1, 2]", "invalid_request", 2),
        (line("a") + b"\n" + line(""), "missing_required_parameter", 2),
        (line("a") + b"\n" + line(7), "missing_required_parameter", 2),
        (line("a") + b"\n" + line("b") + b"\n" + line("a"), "duplicate_custom_id", 3),
        (line("x" * 513), "invalid_value", 1),
        (b"\n\n", "empty_file", None),
    ],
)
def test_a_line_that_cannot_be_answered_fails_validation(content: bytes, code: str, line_number: int | None) -> None:
    validated = validate_input(content, ENDPOINT)
    assert [(error["code"], error["line"]) for error in validated.errors] == [(code, line_number)]
    assert validated.chunks == []


@pytest.mark.parametrize(
    ("status", "after", "allowed"),
    [
        (VALIDATING, IN_PROGRESS, True),
        (VALIDATING, FAILED, True),
        (VALIDATING, COMPLETED, False),
        (IN_PROGRESS, FINALIZING, True),
        (IN_PROGRESS, CANCELLING, True),
        (IN_PROGRESS, EXPIRED, True),
        (IN_PROGRESS, FAILED, True),  # the disk filled
        (IN_PROGRESS, COMPLETED, False),  # through finalizing
        (FINALIZING, COMPLETED, True),
        (CANCELLING, CANCELLED, True),
        (CANCELLING, IN_PROGRESS, False),
        (COMPLETED, CANCELLING, False),  # final
        (CANCELLED, IN_PROGRESS, False),
        (FAILED, IN_PROGRESS, False),
    ],
)
def test_the_status_table(status: str, after: str, allowed: bool) -> None:
    assert may_become(status, after) is allowed
