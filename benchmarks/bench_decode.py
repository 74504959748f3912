"""Decoding an /api/embed body: the declared msgspec model against a pydantic v2 model of the same
shape and the hand-written path emberd had before (orjson, then isinstance checks), in one run.

    .venv/bin/python benchmarks/bench_decode.py [--seconds 1]

Two bodies: 2,048 passages (the most inputs a request may carry by default) and one short query.
Each decoder turns the bytes into typed, checked fields; the time per body is the best of several
rounds, and each library's ratio is against the hand-written path measured in the same run.
pydantic comes with the test extras (the clients depend on it); emberd itself uses msgspec.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, ValidationError

from daemon.api.models import EmbedRequest, decode_body
from daemon.errors import InvalidInput

PASSAGE = "The sky is blue because the air scatters the short blue wavelengths of sunlight more than red. "
BODIES = {
    "2,048 inputs": orjson.dumps({"model": "all-minilm", "input": [f"{index} {PASSAGE}" for index in range(2048)]}),
    "1 input": orjson.dumps({"model": "all-minilm", "input": "why is the sky blue?", "keep_alive": "5m"}),
}


def hand_written(body: bytes) -> tuple[str, list[str]]:
    """What emberd's /api/embed did before the models (read_json_object, decode_embed_request)."""
    document = orjson.loads(body)
    if not isinstance(document, dict):
        raise InvalidInput("request body must be a JSON object")
    raw_input = document.get("input")
    if raw_input is None or raw_input == "":
        texts: list[str] = []
    elif isinstance(raw_input, str):
        texts = [raw_input]
    elif isinstance(raw_input, list) and all(isinstance(item, str) for item in raw_input):
        texts = raw_input
    else:
        raise InvalidInput("invalid input type")
    for key, expected in (("truncate", bool), ("dimensions", int), ("prompt_name", str), ("split_long_inputs", bool)):
        value = document.get(key)
        if value is not None and (
            not isinstance(value, expected) or (isinstance(value, bool) and expected is not bool)
        ):
            raise InvalidInput(f"{key} is of the wrong type")
    keep_alive = document.get("keep_alive")
    if keep_alive is not None and (isinstance(keep_alive, bool) or not isinstance(keep_alive, (int, float, str))):
        raise InvalidInput("keep_alive must be a duration string or a number of seconds")
    options = document.get("options")
    if options is not None and not isinstance(options, dict):
        raise InvalidInput("options must be an object")
    name = document.get("model", document.get("name"))
    if not isinstance(name, str):
        raise InvalidInput("model must be a string")
    return name, texts


class PydanticEmbedRequest(BaseModel):
    """EmbedRequest's shape as a pydantic model (strict: no "8" for 8, no 1 for true)."""

    model_config = ConfigDict(strict=True, extra="ignore")
    model: str | None = None
    name: str | None = None
    input: str | list[str] | None = None
    truncate: bool | None = None
    dimensions: int | None = None
    keep_alive: str | float | None = None
    options: dict[str, Any] | None = None
    prompt_name: str | None = None
    split_long_inputs: bool | None = None


def with_pydantic(body: bytes) -> tuple[str, list[str]]:
    try:
        request = PydanticEmbedRequest.model_validate_json(body)
    except ValidationError as error:
        raise InvalidInput(str(error)) from None
    texts = [] if not request.input else [request.input] if isinstance(request.input, str) else request.input
    return request.model or request.name or "", texts


def with_msgspec(body: bytes) -> tuple[str, list[str]]:
    request = decode_body(body, EmbedRequest)
    return request.model_name, request.texts


DECODERS: dict[str, Callable[[bytes], tuple[str, list[str]]]] = {
    "hand-written (orjson)": hand_written,
    "msgspec": with_msgspec,
    "pydantic v2": with_pydantic,
}


def best_time_s(decode: Callable[[bytes], object], body: bytes, seconds: float) -> float:
    """The fastest of several rounds, per body: each round decodes the body `calls` times."""
    calls = 1
    while True:  # enough calls that one round takes about a tenth of the time given
        started = time.perf_counter()
        for _ in range(calls):
            decode(body)
        if time.perf_counter() - started >= seconds / 10:
            break
        calls *= 2
    best = float("inf")
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        for _ in range(calls):
            decode(body)
        best = min(best, (time.perf_counter() - started) / calls)
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=1.0, help="per decoder and body")
    args = parser.parse_args()
    for label, body in BODIES.items():
        expected = hand_written(body)
        assert all(decode(body) == expected for decode in DECODERS.values()), "the decoders disagree"
        print(f"/api/embed body with {label} ({len(body):,} bytes):")
        baseline_s = 0.0
        for name, decode in DECODERS.items():
            elapsed_s = best_time_s(decode, body, args.seconds)
            baseline_s = baseline_s or elapsed_s
            print(f"  {name:<22} {elapsed_s * 1e6:10.1f} µs  {elapsed_s / baseline_s:5.2f}x the hand-written path")


if __name__ == "__main__":
    main()
