"""OpenAI's Batch API for embeddings: /v1/files (upload, read, delete) and /v1/batches (create,
read, list, cancel). The state lives in daemon.batches.database; daemon.batches.processor runs them."""

from __future__ import annotations

import asyncio
import errno
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from aiohttp import BodyPartReader, web

from daemon.api.common import SETTINGS, admitted, json_response, read_model
from daemon.api.models import BatchCreateRequest
from daemon.batches import lines as batch_lines
from daemon.batches.database import BatchDatabase
from daemon.batches.processor import BatchProcessor, cancel
from daemon.errors import InsufficientDisk, InvalidInput, UnknownObject, UploadTooLarge


@dataclass(frozen=True)
class Batches:
    database: BatchDatabase
    processor: BatchProcessor


BATCHES = web.AppKey("batches", Batches)
UPLOAD_CHUNK_BYTES = 1 << 20
MAX_FIELD_BYTES = 1024  # a form field other than the file (purpose)
MAX_LIST = 100


# -- files ------------------------------------------------------------------------------------------


async def _field_text(part: BodyPartReader) -> str:
    data = bytearray()
    while chunk := await part.read_chunk(MAX_FIELD_BYTES):
        data += chunk
        if len(data) > MAX_FIELD_BYTES:
            raise InvalidInput(f"form field {part.name!r} is longer than {MAX_FIELD_BYTES} bytes")
    return data.decode("utf-8", errors="replace")


async def upload_file(request: web.Request) -> web.Response:
    """multipart/form-data with `purpose` (batch) and `file` (JSONL lines), streamed to disk."""
    batches = request.app[BATCHES]
    limit = request.app[SETTINGS].max_upload_bytes
    if request.content_length is not None and request.content_length > limit + 64 * 1024:
        raise UploadTooLarge(f"the upload is larger than max_upload_bytes ({limit} bytes)")
    if not request.content_type.startswith("multipart/"):
        raise InvalidInput("upload the file as multipart/form-data, with the fields purpose and file")
    file_id = batch_lines.new_id("file-")
    # Streamed to a local file first (never whole in memory), then stored by the database whole
    # with its row: SQLite renames it into place, PostgreSQL copies it in parts.
    partial = batches.database.staging_dir / f"{file_id}.partial"
    purpose, filename, size = None, None, 0
    try:
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                raise InvalidInput("nested multipart bodies are not accepted")
            if part.name == "purpose":
                purpose = await _field_text(part)
            elif part.name == "file" and filename is None:
                filename = part.filename or "upload.jsonl"
                size = await _stream_to(part, partial, limit)
            else:
                await part.release()
        if filename is None:
            raise InvalidInput("the form has no file field")
        if purpose != batch_lines.PURPOSE:
            raise InvalidInput(f"purpose must be batch, got {purpose!r}")
        file_object = batch_lines.file_object(file_id, filename, purpose, size, int(time.time()))
        try:
            await batches.database.store_file(file_object, partial)
        except OSError as error:
            if error.errno == errno.ENOSPC:
                raise InsufficientDisk("no space left for the upload in the batch database; free some space") from None
            raise
    finally:
        partial.unlink(missing_ok=True)
    return json_response(file_object)


async def _stream_to(part: BodyPartReader, path: Path, limit: int) -> int:
    """A file part written to `path` as it arrives, at most `limit` bytes, fsynced; the writes and
    the fsync on a worker thread, never the event loop's (a slow disk must not stall every request)."""
    size = 0
    try:
        with open(path, "wb") as target:
            while chunk := await part.read_chunk(UPLOAD_CHUNK_BYTES):
                size += len(chunk)
                if size > limit:
                    raise UploadTooLarge(f"the file is larger than max_upload_bytes ({limit} bytes)")
                await asyncio.to_thread(target.write, chunk)
            await asyncio.to_thread(_flush_and_sync, target)
    except OSError as error:
        if error.errno == errno.ENOSPC:
            raise InsufficientDisk("no space left on device for the upload; free some space") from None
        raise
    return size


def _flush_and_sync(target: BinaryIO) -> None:
    target.flush()
    os.fsync(target.fileno())


async def _file_or_404(request: web.Request) -> dict[str, Any]:
    file_id = request.match_info["file_id"]
    found = await request.app[BATCHES].database.file(file_id)
    if found is None:
        raise UnknownObject(f"no file {file_id!r}")
    return found


async def get_file(request: web.Request) -> web.Response:
    return json_response(await _file_or_404(request))


async def list_files(request: web.Request) -> web.Response:
    files = await request.app[BATCHES].database.files()
    return json_response({"object": "list", "data": files, "has_more": False})


async def file_content(request: web.Request) -> web.StreamResponse:
    """The content streamed from the database in pieces (a file may be larger than memory allows)."""
    found = await _file_or_404(request)
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    response.content_length = found["bytes"]
    await response.prepare(request)
    async for piece in request.app[BATCHES].database.content(found["id"]):
        await response.write(piece)
    await response.write_eof()
    return response


async def delete_file(request: web.Request) -> web.Response:
    found = await _file_or_404(request)
    deleted = await request.app[BATCHES].database.delete_file(found["id"])
    return json_response({"id": found["id"], "object": "file", "deleted": deleted})


# -- batches ----------------------------------------------------------------------------------------


@admitted(queue_slot=False)
async def create_batch(request: web.Request) -> web.Response:
    body = await read_model(request, BatchCreateRequest)
    for field_name in BatchCreateRequest.required:
        if getattr(body, field_name) is None:
            raise InvalidInput(f"{field_name} is required")
    if body.endpoint != batch_lines.BATCH_ENDPOINT:
        raise InvalidInput(f"endpoint must be {batch_lines.BATCH_ENDPOINT}: emberd's batches embed")
    if body.completion_window != batch_lines.COMPLETION_WINDOW:
        raise InvalidInput(f"completion_window must be {batch_lines.COMPLETION_WINDOW}")
    if body.metadata is not None and len(body.metadata) > 16:
        raise InvalidInput("metadata holds at most 16 pairs")
    batches = request.app[BATCHES]
    assert body.input_file_id is not None
    input_file = await batches.database.file(body.input_file_id)
    if input_file is None:
        raise UnknownObject(f"no file {body.input_file_id!r}")
    if input_file["purpose"] != batch_lines.PURPOSE:
        raise InvalidInput(f"file {body.input_file_id} was not uploaded with purpose batch")
    batch = batch_lines.new_batch(
        batch_lines.new_id("batch_"), body.input_file_id, body.endpoint, body.metadata, int(time.time())
    )
    await batches.database.add_batch(batch)
    batches.processor.wake()
    return json_response(batch)


async def _batch_or_404(request: web.Request) -> dict[str, Any]:
    batch_id = request.match_info["batch_id"]
    found = await request.app[BATCHES].database.batch(batch_id)
    if found is None:
        raise UnknownObject(f"no batch {batch_id!r}")
    return found


async def get_batch(request: web.Request) -> web.Response:
    return json_response(await _batch_or_404(request))


async def list_batches(request: web.Request) -> web.Response:
    try:
        limit = max(1, min(MAX_LIST, int(request.query.get("limit", "20"))))
    except ValueError:
        raise InvalidInput("limit must be an integer") from None
    found = await request.app[BATCHES].database.batches(request.query.get("after"), limit + 1)
    page = found[:limit]
    first, last = (page[0]["id"], page[-1]["id"]) if page else (None, None)
    return json_response(
        {"object": "list", "data": page, "first_id": first, "last_id": last, "has_more": len(found) > limit}
    )


async def cancel_batch(request: web.Request) -> web.Response:
    batches = request.app[BATCHES]
    batch_id = request.match_info["batch_id"]
    after = await cancel(batches.database, batch_id)
    if after is None:
        raise UnknownObject(f"no batch {batch_id!r}")
    batches.processor.wake()
    return json_response(after)


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/files", upload_file)
    app.router.add_get("/v1/files", list_files)
    app.router.add_get("/v1/files/{file_id}", get_file)
    app.router.add_delete("/v1/files/{file_id}", delete_file)
    app.router.add_get("/v1/files/{file_id}/content", file_content)
    app.router.add_post("/v1/batches", create_batch)
    app.router.add_get("/v1/batches", list_batches)
    app.router.add_get("/v1/batches/{batch_id}", get_batch)
    app.router.add_post("/v1/batches/{batch_id}/cancel", cancel_batch)
