"""Fuzz every route of a live daemon with generated requests; print a report.

    .venv/bin/python -m tests.reliability.fuzz_routes [--requests 10000] [--seed 1]

The daemon runs `emberd serve` on the tiny test model (and a tiny reranker), with the Hub offline
(a pull fails at once). Its routes and field names come from the /openapi.json it serves, fetched
at the start. Requests are generated from a seeded random source: bodies valid by the document's
schemas, the same with one field broken, wrong types, huge and deeply nested JSON, invalid UTF-8,
giant strings, bodies that are not JSON, odd headers, methods and paths.

A failure is: a 5xx the document does not give for that route, or any 500 (the tiny models load and
their runners do not die: a 500 here is a bug); a request left without an answer; an answer to a
documented route whose status, media type or body the document does not describe. At the end the
daemon must still answer correctly (the same vector as before), with no traceback in its log and
its open files no higher than a margin over the start.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import yarl

from daemon.convert import convert_hf_directory
from daemon.store import ModelStore
from tests.live import running_daemon
from tests.openapi_check import Contract, Operation
from tests.tiny_models import make_tiny_bert_dir

ODD_METHODS = ["PUT", "PATCH", "DELETE", "OPTIONS", "HEAD", "TRACE", "FOO"]
# Names for model fields and {model} path parameters: the served models, others, and bad names.
MODELS = ["tiny", "tiny", "tiny:latest", "TINY", "reranker", "made", "nope", "hf.co/a/b:Q8_0", "../x", "x" * 201]
# Create and delete never touch the served models (the vectors are checked on tiny): they work on "made".
PROTECTED = re.compile(rb"(?i)(?<![/\w.])(tiny|reranker)(?![\w.])")  # names, not the files' paths
PASSAGE = "the sky is blue because the air scatters blue light more than red light, why is grass green? "
TEXTS = ["why is the sky blue?", "", " ", PASSAGE * 3, "é🙂 中文", "[CLS] [SEP]", "a" * 3000, "\u0000"]


def scalar(rng: random.Random) -> Any:
    return rng.choice(
        [
            None, True, False, 0, -1, 1, 2**63, -(2**63), 1e308, -1e-308, 3.5, float(rng.randint(-9, 9)),
            "", "tiny", "tiny:latest", "x" * rng.randint(0, 64), "\u0000", "\ud7ff\ue000", "🙂" * 8,
            "../../etc/passwd", "hf.co/a/b:Q8_0", "5m", "-1", "1e9", "NaN", "[CLS]", " ",
        ]
    )  # fmt: skip


class Generator:
    """Request bodies drawn from the served document: its fields, and values its schemas allow."""

    def __init__(self, contract: Contract, sources: list[str]) -> None:
        self.contract = contract
        self.sources = sources  # `from` paths for /api/create: real ones among them
        self.fields = sorted({name for op in contract.operations for name in self._field_names(op.request_schema)})
        self.with_body = [op for op in contract.operations if op.request_schema is not None]
        self.without_body = [op for op in contract.operations if op.request_schema is None]
        self.paths = sorted({op.path for op in contract.operations})

    def _field_names(self, schema: dict[str, Any] | None, depth: int = 0) -> set[str]:
        if schema is None or depth > 4:
            return set()
        schema = self.contract.resolve(schema)
        names = set(schema.get("properties", {}))
        children = [*schema.get("properties", {}).values(), *schema.get("oneOf", []), *schema.get("anyOf", [])]
        if isinstance(schema.get("items"), dict):
            children.append(schema["items"])
        for child in children:
            names |= self._field_names(child, depth + 1)
        return names

    def value(self, rng: random.Random, depth: int = 0) -> Any:
        """Any JSON value, mostly of the wrong type for the field it lands in."""
        roll = rng.random()
        if depth > 3 or roll < 0.5:
            return scalar(rng)
        if roll < 0.75:
            return [self.value(rng, depth + 1) for _ in range(rng.randint(0, 6))]
        return {rng.choice(self.fields): self.value(rng, depth + 1) for _ in range(rng.randint(0, 5))}

    def valid(self, rng: random.Random, schema: dict[str, Any], name: str = "", depth: int = 0) -> Any:
        """A value the schema allows (most of the time: pool strings may break a length bound)."""
        schema = self.contract.resolve(schema)
        if "const" in schema:
            return schema["const"]
        if "enum" in schema:
            choice = rng.choice(schema["enum"])
            return choice.upper() if isinstance(choice, str) and rng.random() < 0.1 else choice
        branches = schema.get("oneOf") or schema.get("anyOf")
        if branches:
            return self.valid(rng, rng.choice(branches), name, depth)
        kind = schema.get("type", "object")
        if isinstance(kind, list):
            kind = rng.choice([k for k in kind if k != "null"] or kind)
        if kind == "string":
            return self._string(rng, schema, name)
        if kind == "integer":
            low = schema.get("minimum", -3)
            high = schema.get("maximum", max(low, 0) + 40)
            return rng.choice([low, low, low + 1, rng.randint(low, min(high, low + 10)), high])
        if kind == "number":
            return rng.choice([0, -1, 1.5, rng.uniform(-1e3, 1e3)])
        if kind == "boolean":
            return rng.random() < 0.5
        if kind == "null":
            return None
        if kind == "array":
            low = schema.get("minItems", 0)
            count = rng.randint(low, min(schema.get("maxItems", low + 6), low + 6))
            return [self.valid(rng, schema["items"], name, depth + 1) for _ in range(count)]
        properties = schema.get("properties", {})
        required = set(schema.get("required", []))
        document = {
            key: self.valid(rng, sub, key, depth + 1)
            for key, sub in properties.items()
            if key in required or (not sub.get("deprecated") and rng.random() < 0.3)
        }
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for _ in range(rng.randint(0, 2)):
                document[rng.choice(["query", "document", "q"])] = self.valid(rng, extra, "", depth + 1)
        return document

    def _string(self, rng: random.Random, schema: dict[str, Any], name: str) -> str:
        if name in ("model", "name"):
            return rng.choice(MODELS)
        if name == "from":
            return rng.choice(self.sources)
        examples = schema.get("examples")
        if examples and (rng.random() < 0.7 or "pattern" in schema):
            return str(rng.choice(examples))
        text = rng.choice(TEXTS)
        return text[: schema.get("maxLength", len(text))] if len(text) >= schema.get("minLength", 0) else "abc"

    def broken(self, rng: random.Random, document: dict[str, Any]) -> dict[str, Any]:
        """A valid body with one field replaced by something of the wrong type, huge, or nested."""
        key = rng.choice([*document, *self.fields]) if document else rng.choice(self.fields)
        document[key] = rng.choice(
            [
                self.value(rng),
                "x" * rng.choice([10_000, 300_000]),
                [[[[["deep"]]]]],
                {"$ref": "#/components"},
                [1.5, "mixed", None, True],
                -(2**70),
            ]
        )
        return document


def body(rng: random.Random, op: Operation | None, generator: Generator) -> tuple[bytes, dict[str, str], str]:
    """A request body, its headers, and its kind (for the report)."""
    headers = {"Content-Type": rng.choice(["application/json", "text/plain", "", "application/x-www-form-urlencoded"])}
    if rng.random() < 0.1:
        headers["Host"] = rng.choice(["evil.example", "", "localhost:1", "[::1]"])
    if rng.random() < 0.05:
        headers["Origin"] = "http://evil.example"
    schema = op.request_schema if op is not None else None
    kind = rng.random()
    if schema is not None and kind < 0.3:
        document = generator.valid(rng, schema)
        if op is not None and op.path.endswith("/rerank") and rng.random() < 0.7:
            document["model"] = "reranker"
        if "default_prompt_name" in document and rng.random() < 0.8:  # mostly one of its prompts
            names = list(document.get("prompts") or {})
            document["default_prompt_name"] = rng.choice(names) if names else None
            document = {key: value for key, value in document.items() if value is not None}
        valid = not generator.contract.schema_errors(schema, document)
        return json.dumps(document).encode(), headers, "schema-valid" if valid else "near-valid"
    if schema is not None and kind < 0.45:
        return json.dumps(generator.broken(rng, generator.valid(rng, schema))).encode(), headers, "one field broken"
    if kind < 0.65:
        fields = sorted(generator.fields)
        document = {field: generator.value(rng) for field in rng.sample(fields, rng.randint(0, 6))}
        if rng.random() < 0.5:
            document["model"] = rng.choice([*MODELS, 5, None])
        return json.dumps(document).encode(), headers, "wrong types"
    if kind < 0.71:
        depth = rng.choice([100, 1000, 5000])
        return (b'{"model": "tiny", "input": ' + b"[" * depth + b"]" * depth + b"}"), headers, "nested"
    if kind < 0.78:
        size = rng.choice([10_000, 200_000, 1_000_000])
        if rng.random() < 0.5:
            return json.dumps({"model": "tiny", "input": "word " * (size // 5)}).encode(), headers, "huge"
        document = {"model": "tiny", "input": ["a"] * rng.choice([2048, 2049, 5000])}
        return json.dumps(document).encode(), headers, "huge"
    if kind < 0.87:
        junk = bytes(rng.randrange(256) for _ in range(64))
        return b'{"model": "tiny", "input": "' + junk + b'"}', headers, "invalid UTF-8"
    junk = rng.choice([b"", b"{", b"null", b"[]", b"42", b'"x"', b"{}" * 3, b"\xff\xfe", b'{"model":'])
    return junk, headers, "not JSON"


def fill(path: str, rng: random.Random) -> str:
    return re.sub(r"\{[^}]+\}", lambda _match: rng.choice(MODELS), path)


async def one(
    session: aiohttp.ClientSession, url: str, rng: random.Random, generator: Generator
) -> tuple[str, str, int, list[str]]:
    """One request: (its label, its body's kind, the status (-1: no answer), what is wrong)."""
    contract = generator.contract
    roll = rng.random()
    if roll < 0.7:
        chosen = rng.choice(generator.with_body)
        method, path = chosen.method, fill(chosen.path, rng)
    elif roll < 0.8:
        chosen = rng.choice(generator.without_body)
        method, path = chosen.method, fill(chosen.path, rng)
    elif roll < 0.9:
        method, path = "GET", fill(rng.choice(generator.paths), rng)
    else:
        method, path = rng.choice(ODD_METHODS), fill(rng.choice(generator.paths), rng)
    if rng.random() < 0.03:
        path += rng.choice(["/", "?x=1", "%00", "/../../etc", "//"])
    # The URL as the client sends it: "/v1/models/../x" goes out as "/v1/x".
    target = yarl.URL(url + path)
    path = target.path
    op = contract.operation(method, path)
    data, headers, kind = body(rng, op, generator)
    if path.startswith(("/api/delete", "/api/create")):
        data = PROTECTED.sub(b"made", data)
    headers = {key: value for key, value in headers.items() if value}
    label = f"{method} {op.path if op is not None else path}"
    try:
        async with session.request(
            method, target, data=data, headers=headers, skip_auto_headers=["Content-Type"]
        ) as response:
            raw = await response.read()
            status = response.status
            problems = contract.check_answer(method, path, status, response.headers.get("Content-Type", ""), raw)
    except aiohttp.ClientError as error:
        return f"{label} ({type(error).__name__})", kind, -1, ["no answer"]
    if status >= 500 and (op is None or str(status) not in op.spec["responses"] or status == 500):
        problems.append(f"{label} -> {status}: {raw[:200]!r}")
    return label, kind, status, problems


def home_with_tiny_model(prefix: str, reranker: bool = False) -> Path:
    """A fresh EMBERD_HOME whose store holds the tiny test model as "tiny" (and, with `reranker`, a
    tiny cross-encoder as "reranker"). The models' files and the tiny model's Hugging Face directory
    stay beside it, in the returned home's parent."""
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    path = workdir / "tiny.gguf"
    convert_hf_directory(make_tiny_bert_dir(workdir / "tiny"), path, "f32", "tiny")
    store = ModelStore(workdir / "home")
    store.open()
    store.create("tiny", path)
    if reranker:
        reranker_path = workdir / "reranker.gguf"
        directory = make_tiny_bert_dir(workdir / "tiny-reranker", classifier=True, seed=7)
        convert_hf_directory(directory, reranker_path, "f32", "reranker")
        store.create("reranker", reranker_path)
    return workdir / "home"


# The daemon's pipes to one runner (stdin, stdout, stderr).
FDS_PER_RUNNER = 3


def process_tree_usage(pid: int) -> tuple[float, int, int, int]:
    """(RSS MiB of the daemon and its runners, the daemon's open files, its threads, its runners)."""
    daemon = psutil.Process(pid)
    runners = daemon.children(recursive=True)
    rss = sum(p.memory_info().rss for p in [daemon, *runners]) / 2**20
    return rss, daemon.num_fds(), daemon.num_threads(), len(runners)


async def embed_vector(session: aiohttp.ClientSession, url: str) -> list[float]:
    async with session.post(url + "/api/embed", json={"model": "tiny", "input": "why is the sky blue?"}) as response:
        assert response.status == 200, await response.text()
        return list((await response.json())["embeddings"][0])


async def fuzz(url: str, pid: int, workdir: Path, requests: int, seed: int, concurrency: int) -> bool:
    """Send the requests and print the report, but for its RESULT line; whether all went well."""
    rng = random.Random(seed)
    outcomes: Counter[int] = Counter()
    kinds: Counter[str] = Counter()
    kinds_ok: Counter[str] = Counter()
    failures: list[str] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        async with session.get(url + "/openapi.json") as response:
            document = await response.json()
        contract = Contract(document)
        sources = ["/nonexistent/model.gguf", "/etc/passwd", "/", str(workdir / "tiny.gguf"), str(workdir / "tiny")]
        generator = Generator(contract, sources)
        before_vector = await embed_vector(session, url)
        before = process_tree_usage(pid)
        started_s = time.monotonic()
        queue = [random.Random(rng.random()) for _ in range(requests)]

        async def worker() -> None:
            while queue:
                label, kind, status, problems = await one(session, url, queue.pop(), generator)
                outcomes[status] += 1
                kinds[kind] += 1
                kinds_ok[kind] += 200 <= status < 300
                failures.extend(f"{label} [{kind}]: {problem}" for problem in problems)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed_s = time.monotonic() - started_s
        after_vector = await embed_vector(session, url)
        after = process_tree_usage(pid)
    alive = psutil.pid_exists(pid)
    operations = len(contract.operations)
    print(f"\nfuzzed {requests} requests in {elapsed_s:.0f} s (seed {seed}, {concurrency} at a time)")
    print(f"routes from /openapi.json: {operations} operations on {len(document['paths'])} paths, "
          f"{len(generator.fields)} field names")  # fmt: skip
    print("bodies: " + ", ".join(f"{kind}: {count} ({kinds_ok[kind]} 2xx)" for kind, count in sorted(kinds.items())))
    print("statuses: " + ", ".join(f"{status}: {count}" for status, count in sorted(outcomes.items())))
    print(f"failures (undocumented 5xx, any 500, no answer, an answer the document does not describe): {len(failures)}")
    for failure in failures[:20]:
        print(f"  {failure}")
    print(f"daemon alive and answering correctly after: {alive and after_vector == before_vector}")
    print(f"RSS MiB (daemon + runners) before {before[0]:.0f}, after {after[0]:.0f}")
    print(f"open files before {before[1]}, after {after[1]}; threads before {before[2]}, after {after[2]}; "
          f"runners before {before[3]}, after {after[3]}")  # fmt: skip
    # Open files may grow by the fuzzing connections still open and the pipes of runners started since.
    files_ok = after[1] - FDS_PER_RUNNER * after[3] <= before[1] - FDS_PER_RUNNER * before[3] + concurrency
    return not failures and alive and after_vector == before_vector and files_ok


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    home = home_with_tiny_model("emberd-fuzz-", reranker=True)
    with running_daemon(home, {}, {"EMBERD_HUB_OFFLINE": "1", "EMBERD_MAX_QUEUE": "64"}) as daemon:
        ok = asyncio.run(fuzz(daemon.url, daemon.process.pid, home.parent, args.requests, args.seed, args.concurrency))
        log = daemon.log_text()
    unexpected = [line for line in log.splitlines() if "unexpected error" in line or "Traceback" in line]
    print(f"tracebacks in the daemon's log: {len(unexpected)}")
    for line in unexpected[:10]:
        print(f"  {line}")
    ok = ok and not unexpected
    print("RESULT: " + ("pass" if ok else "FAIL"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
