"""Runs batches in the background: validates new ones, claims chunks and embeds their lines below
interactive requests, writes each batch's output and error files, and moves batches through their
statuses (cancelled, expired, completed).

Each line runs as a /v1/embeddings request of its own would (api.openai.answer_embeddings): the same
checks, errors and answer. A chunk's lines run concurrently, so the runner packs them into shared
decodes, marked background: a decode takes them only when no interactive request waits. A line's
error becomes its line in the error file, but an error that says "later" (the daemon stopping, a
busy memory budget, a runner that crashed) leaves the whole chunk unrecorded for another try: a
chunk is recorded whole or not at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
from aiohttp import web

from daemon.api.common import BackgroundCall, error_body
from daemon.api.models import OpenAIEmbedRequest, decode_body
from daemon.batches import lines as batch_lines
from daemon.batches.database import BatchDatabase, Claim
from daemon.batches.lines import (
    CANCELLED,
    CANCELLING,
    COMPLETED,
    EXPIRED,
    FAILED,
    FINALIZING,
    IN_PROGRESS,
    VALIDATING,
    InputLine,
    moved,
)
from daemon.errors import (
    BatchDatabaseUnavailable,
    EmberdError,
    InsufficientDisk,
    MemoryBusy,
    Overloaded,
    RunnerCrashed,
    ShuttingDown,
)

log = logging.getLogger(__name__)

# Errors that say "not now": the chunk is tried again, never answered with them.
RETRY_LATER = (ShuttingDown, Overloaded, MemoryBusy, RunnerCrashed, BatchDatabaseUnavailable)
HOUSEKEEPING_S = 1.0  # how often batches are checked for a next status without a wake-up
RETRY_AFTER_S = 2.0  # a chunk given back for "later" waits this long before it is claimed again
BATCH_ERRORS_OBJECT = "list"


def is_disk_full(error: BaseException) -> bool:
    """Whether an error says the disk is full: the OS's ENOSPC, or SQLite's SQLITE_FULL."""
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return True
    return isinstance(error, sqlite3.OperationalError) and "disk is full" in str(error)


class BatchProcessor:
    def __init__(
        self,
        app: web.Application,
        database: BatchDatabase,
        status_for: Callable[[EmberdError], int],
        concurrency: int,
        lease_s: float,
    ) -> None:
        self._app = app
        self._database = database
        self._status_for = status_for
        self._concurrency = concurrency
        self._lease_s = lease_s
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False

    def wake(self) -> None:
        """Something changed (a batch created or cancelled): look now, not at the next tick."""
        self._wake.set()

    async def start(self) -> None:
        try:
            given_back = await self._database.give_back_claims()
        except BatchDatabaseUnavailable as error:  # its claims come back when their leases end
            log.warning("batches: %s", error.message)
            given_back = 0
        if given_back:
            log.info("batches: %d chunks claimed before a restart are free again", given_back)
        self._tasks = [asyncio.create_task(self._housekeeping(), name="emberd-batch-housekeeping")]
        self._tasks += [
            asyncio.create_task(self._chunks(), name=f"emberd-batch-chunks-{index}")
            for index in range(self._concurrency)
        ]

    async def stop(self) -> None:
        """Stop at once: a chunk in flight is not recorded, and runs again after a restart."""
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # -- statuses --------------------------------------------------------------------------------

    async def _housekeeping(self) -> None:
        while not self._stopping:
            try:
                await self._advance_all()
            except Exception:  # a bug must not stop every batch for the daemon's life
                log.exception("batches: housekeeping failed")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(HOUSEKEEPING_S):
                    await self._wake.wait()
            self._wake.clear()

    async def _advance_all(self) -> None:
        for batch in await self._database.batches_in((VALIDATING, IN_PROGRESS, FINALIZING, CANCELLING)):
            await self._advance(batch)

    async def _advance(self, batch: dict[str, Any]) -> None:
        batch_id, status, now_s = batch["id"], batch["status"], int(time.time())
        if status == VALIDATING:
            await self._validate(batch)
        elif status == IN_PROGRESS and now_s >= batch["expires_at"]:
            await self._write_files(batch_id, EXPIRED)  # what was done by then, as OpenAI keeps it
        elif status == IN_PROGRESS and await self._database.pending_chunks(batch_id) == 0:
            await self._database.move(
                batch_id, lambda b: moved(b, FINALIZING, now_s) if b["status"] == IN_PROGRESS else None
            )
            await self._write_files(batch_id, COMPLETED)
        elif status == FINALIZING:  # a restart during finalizing: write the files again
            await self._write_files(batch_id, COMPLETED)
        elif status == CANCELLING and await self._database.held_chunks(batch_id) == 0:
            await self._write_files(batch_id, CANCELLED)

    async def _validate(self, batch: dict[str, Any]) -> None:
        batch_id, now_s = batch["id"], int(time.time())
        validated = await asyncio.to_thread(validate_stored_input, self._database, batch)
        if validated.errors:
            errors = {"object": BATCH_ERRORS_OBJECT, "data": validated.errors}

            def fail(current: dict[str, Any]) -> dict[str, Any] | None:
                return {**moved(current, FAILED, now_s), "errors": errors} if current["status"] == VALIDATING else None

            await self._database.move(batch_id, fail)
            return
        chunks = validated.chunks
        started = moved(batch, IN_PROGRESS, now_s)
        started["request_counts"] = {"total": validated.total, "completed": 0, "failed": 0}
        try:
            if await self._database.start_batch(batch_id, chunks, started):
                log.info("batch %s: %d lines in %d chunks", batch_id, validated.total, len(chunks))
                self.wake()
        except (OSError, sqlite3.Error) as error:
            if not is_disk_full(error):
                raise
            await self._fail_for_disk(batch_id, error)

    async def _write_files(self, batch_id: str, final_status: str) -> None:
        """The output and error files from the recorded chunks, then the batch in its final status
        naming them (a file with no lines is not named, as OpenAI leaves it null)."""
        database = self._database
        now_s = int(time.time())
        try:
            written = await database.write_outputs(batch_id, now_s)
        except OSError as error:
            await self._fail_for_disk(batch_id, error)
            return
        if written is None:
            return  # another daemon of the fleet is writing them now
        named = {"output_file_id": written.output_file_id, "error_file_id": written.error_file_id}

        def finish(current: dict[str, Any]) -> dict[str, Any] | None:
            if current["status"] in batch_lines.FINAL_STATUSES:
                return None
            finished = moved(current, CANCELLED if current["status"] == CANCELLING else final_status, now_s)
            return {**finished, **named, "request_counts": current["request_counts"]}

        after = await database.move(batch_id, finish)
        if after is None or (after.get("output_file_id"), after.get("error_file_id")) != (
            named["output_file_id"],
            named["error_file_id"],
        ):
            # Gone, or another daemon of a fleet finished it first: its files are the batch's.
            for ours in named.values():
                if ours is not None:
                    await database.delete_file(ours)
            return
        await database.drop_chunks(batch_id)
        log.info("batch %s: %s", batch_id, after["status"])

    async def _fail_for_disk(self, batch_id: str, error: BaseException) -> None:
        """The disk filled: the batch fails with the reason. What was recorded stays in the
        database (nothing is dropped): its lines are not answered twice by a retry."""
        message = str(InsufficientDisk(f"the disk is full: {error}; free some space and submit the rest again"))
        now_s = int(time.time())
        errors = {"object": BATCH_ERRORS_OBJECT, "data": [batch_lines.validation_error("disk_full", message, None)]}

        def fail(current: dict[str, Any]) -> dict[str, Any] | None:
            if current["status"] in batch_lines.FINAL_STATUSES:
                return None
            return {**current, "status": FAILED, "failed_at": now_s, "errors": errors}

        with contextlib.suppress(ValueError):
            await self._database.move(batch_id, fail)
        log.error("batch %s failed: %s", batch_id, message)

    # -- chunks ----------------------------------------------------------------------------------

    async def _chunks(self) -> None:
        while not self._stopping:
            try:
                claim = await self._database.claim(self._lease_s)
            except Exception:
                log.exception("batches: claiming a chunk failed")
                claim = None
            if claim is None:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(HOUSEKEEPING_S):
                        await self._wake.wait()
                continue
            try:
                async with self._renewing(claim):
                    await self._run_chunk(claim)
            except Exception:  # a bug: the chunk stays unrecorded (claimed again when its lease ends)
                log.exception("batch %s chunk %d failed", claim.batch_id, claim.chunk_no)

    @contextlib.asynccontextmanager
    async def _renewing(self, claim: Claim) -> AsyncIterator[None]:
        """The claim's lease renewed while its chunk runs (a chunk below busy interactive traffic
        may outlast one lease), so no other daemon of a fleet takes it over meanwhile."""

        async def renew() -> None:
            while True:
                await asyncio.sleep(self._lease_s / 3)
                try:
                    if not await self._database.renew(claim, self._lease_s):
                        log.info("batch %s chunk %d: another daemon holds it now", claim.batch_id, claim.chunk_no)
                        return
                except Exception:  # the database away for a moment: the lease may still hold
                    log.exception("batch %s chunk %d: renewing its lease failed", claim.batch_id, claim.chunk_no)

        renewal = asyncio.create_task(renew(), name=f"emberd-batch-lease-{claim.batch_id}-{claim.chunk_no}")
        try:
            yield
        finally:
            renewal.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewal

    async def _run_chunk(self, claim: Claim) -> None:
        lines = batch_lines.decode_lines(claim.lines)
        later: BaseException | None = None
        try:
            async with asyncio.TaskGroup() as group:  # one line saying "later" stops the others
                tasks = [group.create_task(self._answer(line)) for line in lines]
        except* RETRY_LATER as errors:
            later = errors.exceptions[0]
        if later is not None:
            log.info("batch %s chunk %d: %s; tried again later", claim.batch_id, claim.chunk_no, later)
            await asyncio.sleep(RETRY_AFTER_S)  # its lease holds it meanwhile: no other daemon spins on it
            return
        answers = [task.result() for task in tasks]
        output = [answer for status, answer in answers if status < 300]
        error_lines = [answer for status, answer in answers if status >= 300]
        try:
            recorded = await self._database.finish_chunk(
                claim, b"\n".join(output), b"\n".join(error_lines), len(output), len(error_lines)
            )
        except (OSError, sqlite3.Error) as error:
            if not is_disk_full(error):
                raise
            await self._fail_for_disk(claim.batch_id, error)
            return
        if not recorded:
            log.info("batch %s chunk %d was recorded by another daemon first", claim.batch_id, claim.chunk_no)
        self.wake()

    async def _answer(self, line: InputLine) -> tuple[int, bytes]:
        """A line's status and its line for the output (2xx) or error file."""
        if line.body is None:
            return line.error_status, self._error_line(line.custom_id, line.error_status, line.error_message)
        try:
            body = decode_body(orjson.dumps(line.body), OpenAIEmbedRequest)
            answer, _headers = await _answer_embeddings(BackgroundCall(self._app), body)
        except RETRY_LATER:
            raise
        except EmberdError as error:
            status = self._status_for(error)
            return status, self._error_line(line.custom_id, status, error.message)
        return 200, batch_lines.output_line(line.custom_id, 200, answer)

    @staticmethod
    def _error_line(custom_id: str, status: int, message: str) -> bytes:
        return batch_lines.output_line(custom_id, status, error_body(batch_lines.BATCH_ENDPOINT, status, message))


async def _answer_embeddings(call: BackgroundCall, body: OpenAIEmbedRequest) -> tuple[dict[str, Any], dict[str, str]]:
    from daemon.api.openai import answer_embeddings  # the route module imports this package's routes

    return await answer_embeddings(call, body, background=True)


def validate_stored_input(database: BatchDatabase, batch: dict[str, Any]) -> batch_lines.Validated:
    """The batch's input file validated as its lines are read (on a worker thread)."""
    try:
        return batch_lines.validate_input(database.input_lines(batch["input_file_id"]), batch["endpoint"])
    except FileNotFoundError:
        deleted = batch_lines.validation_error("file_not_found", "the input file was deleted", None)
        return batch_lines.Validated(errors=[deleted])


async def cancel(database: BatchDatabase, batch_id: str) -> dict[str, Any] | None:
    """A batch moved to cancelling (its chunks in flight finish; the processor then writes what was
    done and moves it to cancelled). A final batch is answered as it is."""
    now_s = int(time.time())

    def cancelling(current: dict[str, Any]) -> dict[str, Any] | None:
        if current["status"] in (VALIDATING, IN_PROGRESS):
            return moved(current, CANCELLING, now_s)
        return None

    return await database.move(batch_id, cancelling)
