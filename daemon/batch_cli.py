"""`emberd batch`: submit a file of requests (or of plain texts) as a batch, follow it with a
progress bar, and write its output beside the input; `--status ID`, `--cancel ID`.

An HTTP client of the daemon's Batch API (/v1/files, /v1/batches), like the other verbs. Leaving
the command (Ctrl-C) leaves the batch running: the daemon owns it.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, BinaryIO

import httpx
from tqdm import tqdm

FINAL_STATUSES = ("completed", "failed", "expired", "cancelled")
POLL_S = 1.0
TIMEOUT_S = 600.0


def is_request_file(first_line: bytes) -> bool:
    """Whether a file's first non-blank line is a batch request (JSON with a custom_id), not a text."""
    try:
        parsed = json.loads(first_line)
    except ValueError:
        return False
    return isinstance(parsed, dict) and "custom_id" in parsed


def text_requests(texts: BinaryIO, model: str, target: BinaryIO) -> int:
    """Plain texts, one a line (blank lines skipped), as /v1/embeddings requests whose custom_id is
    the line's number ("line-1" is the file's first line). Answers how many."""
    count = 0
    for number, raw in enumerate(texts, start=1):
        text = raw.decode("utf-8").rstrip("\r\n")
        if not text.strip():
            continue
        request = {
            "custom_id": f"line-{number}",
            "method": "POST",
            "url": "/v1/embeddings",
            "body": {"model": model, "input": text},
        }
        target.write(json.dumps(request, ensure_ascii=False).encode() + b"\n")
        count += 1
    return count


def output_paths(source: Path) -> tuple[Path, Path]:
    """Where a batch's output and errors go: beside the input, named after it."""
    stem = source.name.removesuffix(".jsonl").removesuffix(".txt")
    return source.with_name(f"{stem}.output.jsonl"), source.with_name(f"{stem}.errors.jsonl")


class BatchClient:
    def __init__(self, base_url: str) -> None:
        self._http = httpx.Client(base_url=base_url + "/v1", timeout=TIMEOUT_S)

    def _check(self, response: httpx.Response) -> Any:
        if response.status_code >= 400:
            try:
                message = response.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = response.text
            raise SystemExit(f"Error: {message}")
        return response.json()

    def upload(self, path: Path) -> Any:
        with path.open("rb") as content:
            files = {"file": (path.name, content, "application/jsonl")}
            return self._check(self._http.post("/files", files=files, data={"purpose": "batch"}))

    def create(self, file_id: str) -> Any:
        body = {"input_file_id": file_id, "endpoint": "/v1/embeddings", "completion_window": "24h"}
        return self._check(self._http.post("/batches", json=body))

    def retrieve(self, batch_id: str) -> Any:
        return self._check(self._http.get(f"/batches/{batch_id}"))

    def cancel(self, batch_id: str) -> Any:
        return self._check(self._http.post(f"/batches/{batch_id}/cancel"))

    def download(self, file_id: str, target: Path) -> None:
        partial = target.with_name(target.name + ".partial")
        with self._http.stream("GET", f"/files/{file_id}/content") as response:
            if response.status_code >= 400:
                response.read()
                self._check(response)
            with partial.open("wb") as output:
                for chunk in response.iter_bytes():
                    output.write(chunk)
        partial.replace(target)


def summary(batch: dict[str, Any]) -> str:
    counts = batch["request_counts"]
    return (
        f"{batch['id']}: {batch['status']}, {counts['completed']} done, {counts['failed']} failed of {counts['total']}"
    )


def follow(client: BatchClient, batch: dict[str, Any], source: Path) -> int:
    """A progress bar (lines/s and ETA) until the batch ends, then its files beside `source`."""
    with tqdm(total=None, unit="line", desc=batch["id"], file=sys.stderr, dynamic_ncols=True) as bar:
        while batch["status"] not in FINAL_STATUSES:
            time.sleep(POLL_S)
            batch = client.retrieve(batch["id"])
            counts = batch["request_counts"]
            if counts["total"] and bar.total != counts["total"]:
                bar.total = counts["total"]
            bar.update(counts["completed"] + counts["failed"] - bar.n)
            bar.set_postfix_str(batch["status"])
    output, errors = output_paths(source)
    for file_id, target in ((batch.get("output_file_id"), output), (batch.get("error_file_id"), errors)):
        if file_id:
            client.download(file_id, target)
            print(f"wrote {target}")
    print(summary(batch))
    if batch["status"] == "failed" and batch.get("errors"):
        for error in batch["errors"]["data"]:
            print(f"  {error['code']}: {error['message']}", file=sys.stderr)
    return 0 if batch["status"] == "completed" else 1


def run(base_url: str, source: Path | None, model: str | None, status: str | None, cancel: str | None) -> int:
    client = BatchClient(base_url)
    if status:
        print(json.dumps(client.retrieve(status), indent=2))
        return 0
    if cancel:
        print(summary(client.cancel(cancel)))
        return 0
    if source is None:
        raise SystemExit("Error: name a file of requests (JSONL) or of texts (one a line, with --model)")
    with source.open("rb") as handle:
        first = next((line for line in handle if line.strip()), b"")
    if is_request_file(first):
        upload = source
        uploaded = client.upload(upload)
    else:
        if not model:
            raise SystemExit("Error: a file of plain texts needs --model NAME")
        with tempfile.TemporaryDirectory() as directory:
            upload = Path(directory) / (source.name.removesuffix(".txt") + ".jsonl")
            with source.open("rb") as texts, upload.open("wb") as requests:
                count = text_requests(texts, model, requests)
            if not count:
                raise SystemExit("Error: the file has no texts")
            uploaded = client.upload(upload)
    batch = client.create(uploaded["id"])
    print(f"batch {batch['id']} submitted ({uploaded['bytes']} bytes); Ctrl-C leaves it running", file=sys.stderr)
    try:
        return follow(client, batch, source)
    except KeyboardInterrupt:
        print(f"\nbatch {batch['id']} goes on: emberd batch --status {batch['id']}", file=sys.stderr)
        return 130
