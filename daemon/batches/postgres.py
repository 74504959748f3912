"""Batches in PostgreSQL, shared by every daemon of a fleet (`batch_database_url = postgresql://...`):
the batches, their files (uploaded input and the output and error files, contents in parts of
PART_BYTES) and each chunk's output, so any daemon answers any batch route and every daemon takes
chunks of the same batches. The same interface as SQLite's (daemon.batches.database.BatchDatabase).

Claiming is hand-written: one UPDATE over `SELECT ... FOR UPDATE SKIP LOCKED` takes the oldest free
chunk, so daemons claiming at the same moment neither wait on each other nor take the same chunk. A
task-queue library (procrastinate) was weighed and left out: a chunk's output and its done mark must
be written in one transaction with our own rows, the batch's statuses and leases are ours already
(its jobs would be a second state to keep in step), and it brings its own schema, workers and
migrations for what is here one statement.

Leases run on the server's clock, never a daemon's (the clocks of a fleet's hosts may differ). A
daemon killed mid-chunk leaves the chunk to the others once its lease passes; the processor renews a
lease while its chunk runs. At start-up a daemon frees only its own claims: its owner name (host name,
listen address and port) is the same after a restart.

psycopg 3, synchronous, on one thread of its own (as SQLite's): one connection in autocommit with
explicit transactions, opened again on the next call when it broke (the server restarted).
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import shutil
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import orjson
import psycopg
import psycopg.errors

from daemon.batches import lines as batch_lines
from daemon.batches.database import BatchDatabase, Claim, Outputs, checked_change, output_file_object, page_after
from daemon.batches.lines import FINAL_STATUSES
from daemon.errors import BatchDatabaseUnavailable

T = TypeVar("T")
log = logging.getLogger(__name__)
PART_BYTES = 8 << 20  # a file's content is stored, read and served in rows of this size
CONNECT_TIMEOUT_S = 10
SCHEMA_LOCK = "emberd-batches-schema"  # daemons starting together create the tables one at a time
NOW_S = "extract(epoch FROM clock_timestamp())::float8"  # the server's clock, in unix seconds

SCHEMA = """
CREATE TABLE IF NOT EXISTS emberd_files (
    id TEXT PRIMARY KEY,
    object TEXT NOT NULL,           -- the file object (JSON) the routes answer
    created_at BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS emberd_file_parts (
    file_id TEXT NOT NULL REFERENCES emberd_files (id) ON DELETE CASCADE,
    part_no INTEGER NOT NULL,
    data BYTEA NOT NULL,            -- PART_BYTES of the content (the last part fewer)
    PRIMARY KEY (file_id, part_no)
);
CREATE TABLE IF NOT EXISTS emberd_batches (
    id TEXT PRIMARY KEY,
    object TEXT NOT NULL,           -- the batch object (JSON), request_counts apart
    status TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS emberd_batches_by_status ON emberd_batches (status, created_at);
CREATE TABLE IF NOT EXISTS emberd_chunks (
    batch_id TEXT NOT NULL,
    chunk_no INTEGER NOT NULL,
    lines BYTEA NOT NULL,           -- the chunk's requests (lines.encode_lines)
    line_count INTEGER NOT NULL,
    done BOOLEAN NOT NULL DEFAULT false,
    claimed_by TEXT,                -- the daemon holding it; once done, the one that recorded it
    lease_until DOUBLE PRECISION NOT NULL DEFAULT 0,
    output BYTEA,                   -- output-file lines, once done
    errors BYTEA,                   -- error-file lines, once done
    completed INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (batch_id, chunk_no)
);
CREATE INDEX IF NOT EXISTS emberd_chunks_pending ON emberd_chunks (lease_until) WHERE NOT done;
"""


class PostgresBatchDatabase(BatchDatabase):
    """A fleet's batches in PostgreSQL; uploads land in staging_dir before they are copied in."""

    def __init__(self, url: str, staging_dir: Path, owner: str) -> None:
        super().__init__(owner, staging_dir)
        self.url = url
        self._connection: psycopg.Connection[Any] | None = None

    # -- lifetime --------------------------------------------------------------------------------

    def _open(self) -> None:
        """The staging folder, then the server if it answers: one that does not yet stops nothing
        (the daemon serves embeddings; the batch routes answer 503 until it does)."""
        shutil.rmtree(self.staging_dir, ignore_errors=True)  # uploads cut short before a restart
        self.staging_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._db  # noqa: B018 (connects, and makes the tables)
        except psycopg.OperationalError as error:
            log.warning("the batch database cannot be reached yet: %s", error)

    def _close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def _call(self, function: Callable[..., T], args: tuple[Any, ...]) -> T:
        with _as_daemon_errors():
            return function(*args)

    @property
    def _db(self) -> psycopg.Connection[Any]:
        if self._connection is None or self._connection.broken or self._connection.closed:
            if self._connection is not None:
                self._connection.close()
            connection = psycopg.connect(self.url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S)
            with connection.transaction():  # the tables, made once for the fleet (an advisory lock)
                connection.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (SCHEMA_LOCK,))
                connection.execute(SCHEMA)
            self._connection = connection
        return self._connection

    # -- files -----------------------------------------------------------------------------------

    def _store_file(self, file_object: dict[str, Any], path: Path) -> None:
        """The row and the parts in one transaction; one part in memory at a time."""
        db = self._db
        try:
            with db.transaction(), path.open("rb") as source:
                _insert_file(db, file_object)
                part_no = 0
                while part := source.read(PART_BYTES):
                    _insert_part(db, file_object["id"], part_no, part)
                    part_no += 1
        finally:
            path.unlink(missing_ok=True)

    def _file(self, file_id: str) -> dict[str, Any] | None:
        row = self._db.execute("SELECT object FROM emberd_files WHERE id = %s", (file_id,)).fetchone()
        return None if row is None else dict(orjson.loads(row[0]))

    def _files(self) -> list[dict[str, Any]]:
        rows = self._db.execute("SELECT object FROM emberd_files ORDER BY created_at DESC, id").fetchall()
        return [dict(orjson.loads(row[0])) for row in rows]

    async def content(self, file_id: str) -> AsyncIterator[bytes]:
        part_no = 0
        while (part := await self._run(self._part, file_id, part_no)) is not None:
            yield part
            part_no += 1

    def _part(self, file_id: str, part_no: int) -> bytes | None:
        row = self._db.execute(
            "SELECT data FROM emberd_file_parts WHERE file_id = %s AND part_no = %s", (file_id, part_no)
        ).fetchone()
        return None if row is None else bytes(row[0])

    def input_lines(self, file_id: str) -> Iterator[bytes]:
        """On a connection of its own (the caller's thread is not the database's), a part at a time."""
        with _as_daemon_errors(), psycopg.connect(self.url, connect_timeout=CONNECT_TIMEOUT_S) as db:
            if db.execute("SELECT 1 FROM emberd_files WHERE id = %s", (file_id,)).fetchone() is None:
                raise FileNotFoundError(f"no file {file_id}")

            def parts() -> Iterator[bytes]:
                for part_no in itertools.count():
                    row = db.execute(
                        "SELECT data FROM emberd_file_parts WHERE file_id = %s AND part_no = %s", (file_id, part_no)
                    ).fetchone()
                    if row is None:
                        return
                    yield bytes(row[0])

            yield from batch_lines.lines_of_parts(parts())

    def _delete_file(self, file_id: str) -> bool:
        return self._db.execute("DELETE FROM emberd_files WHERE id = %s", (file_id,)).rowcount > 0  # parts cascade

    # -- batches ---------------------------------------------------------------------------------

    def _add_batch(self, batch: dict[str, Any]) -> None:
        self._db.execute(
            "INSERT INTO emberd_batches (id, object, status, created_at) VALUES (%s, %s, %s, %s)",
            (batch["id"], orjson.dumps(batch).decode(), batch["status"], batch["created_at"]),
        )

    def _batch(self, batch_id: str) -> dict[str, Any] | None:
        row = self._db.execute("SELECT object FROM emberd_batches WHERE id = %s", (batch_id,)).fetchone()
        return None if row is None else self._with_counts(dict(orjson.loads(row[0])))

    def _with_counts(self, batch: dict[str, Any]) -> dict[str, Any]:
        """request_counts from the chunks recorded so far (a final batch has them in its object)."""
        if batch["status"] in FINAL_STATUSES:
            return batch
        row = self._db.execute(
            "SELECT coalesce(sum(completed), 0), coalesce(sum(failed), 0) FROM emberd_chunks"
            " WHERE batch_id = %s AND done",
            (batch["id"],),
        ).fetchone()
        assert row is not None
        total = batch["request_counts"]["total"]
        return {**batch, "request_counts": {"total": total, "completed": int(row[0]), "failed": int(row[1])}}

    def _batches(self, after: str | None, limit: int) -> list[dict[str, Any]]:
        """Newest first, from the one after `after` (OpenAI's cursor)."""
        rows = self._db.execute("SELECT id, object FROM emberd_batches ORDER BY created_at DESC, id DESC").fetchall()
        page = page_after([row[0] for row in rows], after, limit)
        return [self._with_counts(dict(orjson.loads(row[1]))) for row in rows[page]]

    def _batches_in(self, statuses: tuple[str, ...]) -> list[dict[str, Any]]:
        rows = self._db.execute(
            "SELECT object FROM emberd_batches WHERE status = ANY(%s) ORDER BY created_at, id", (list(statuses),)
        ).fetchall()
        return [self._with_counts(dict(orjson.loads(row[0]))) for row in rows]

    def _move(self, batch_id: str, change: Callable[[dict[str, Any]], dict[str, Any] | None]) -> dict[str, Any] | None:
        db = self._db
        with db.transaction():  # the row locked: daemons moving one batch take turns
            row = db.execute("SELECT object FROM emberd_batches WHERE id = %s FOR UPDATE", (batch_id,)).fetchone()
            if row is None:
                return None
            batch = dict(orjson.loads(row[0]))
            after = change(self._with_counts(batch))
            if after is None:
                return self._with_counts(batch)
            checked_change(batch_id, batch, after)
            db.execute(
                "UPDATE emberd_batches SET object = %s, status = %s WHERE id = %s",
                (orjson.dumps(after).decode(), after["status"], batch_id),
            )
            return after if after["status"] in FINAL_STATUSES else self._with_counts(after)

    # -- chunks ----------------------------------------------------------------------------------

    def _start_batch(self, batch_id: str, chunks: list[tuple[bytes, int]], started: dict[str, Any]) -> bool:
        db = self._db
        with db.transaction():
            row = db.execute("SELECT status FROM emberd_batches WHERE id = %s FOR UPDATE", (batch_id,)).fetchone()
            if row is None or row[0] != batch_lines.VALIDATING:
                return False  # cancelled meanwhile, or another daemon validated it first
            db.execute("DELETE FROM emberd_chunks WHERE batch_id = %s", (batch_id,))
            with db.cursor() as cursor:
                cursor.executemany(
                    "INSERT INTO emberd_chunks (batch_id, chunk_no, lines, line_count) VALUES (%s, %s, %s, %s)",
                    [(batch_id, number, lines, count) for number, (lines, count) in enumerate(chunks)],
                )
            db.execute(
                "UPDATE emberd_batches SET object = %s, status = %s WHERE id = %s",
                (orjson.dumps(started).decode(), started["status"], batch_id),
            )
            return True

    def _claim(self, lease_s: float) -> Claim | None:
        # One statement: the chunk is picked, locked (others skip it rather than wait) and held.
        row = self._db.execute(
            f"UPDATE emberd_chunks AS c SET claimed_by = %s, lease_until = {NOW_S} + %s"
            " FROM (SELECT f.batch_id, f.chunk_no FROM emberd_chunks f JOIN emberd_batches b ON b.id = f.batch_id"
            f"       WHERE b.status = 'in_progress' AND NOT f.done AND f.lease_until < {NOW_S}"
            "       ORDER BY b.created_at, b.id, f.chunk_no LIMIT 1 FOR UPDATE OF f SKIP LOCKED) AS free"
            " WHERE c.batch_id = free.batch_id AND c.chunk_no = free.chunk_no"
            " RETURNING c.batch_id, c.chunk_no, c.lines, c.lease_until",
            (self.owner, lease_s),
        ).fetchone()
        return None if row is None else Claim(row[0], row[1], bytes(row[2]), float(row[3]))

    def _renew(self, claim: Claim, lease_s: float) -> bool:
        return (
            self._db.execute(
                f"UPDATE emberd_chunks SET lease_until = {NOW_S} + %s"
                " WHERE batch_id = %s AND chunk_no = %s AND NOT done AND claimed_by = %s",
                (lease_s, claim.batch_id, claim.chunk_no, self.owner),
            ).rowcount
            > 0
        )

    def _give_back_claims(self) -> int:
        """This daemon's claims alone (the other daemons' stand)."""
        return self._db.execute(
            "UPDATE emberd_chunks SET lease_until = 0, claimed_by = NULL WHERE NOT done AND claimed_by = %s",
            (self.owner,),
        ).rowcount

    def _finish_chunk(self, claim: Claim, output: bytes, errors: bytes, completed: int, failed: int) -> bool:
        # Of two daemons finishing one chunk (a lease passed), the row lock orders them and the
        # second finds it done.
        return (
            self._db.execute(
                "UPDATE emberd_chunks SET done = true, claimed_by = %s, output = %s, errors = %s, completed = %s,"
                " failed = %s WHERE batch_id = %s AND chunk_no = %s AND NOT done",
                (self.owner, output, errors, completed, failed, claim.batch_id, claim.chunk_no),
            ).rowcount
            > 0
        )

    def _pending_chunks(self, batch_id: str) -> int:
        return self._count("NOT done", batch_id)

    def _held_chunks(self, batch_id: str) -> int:
        return self._count(f"NOT done AND lease_until >= {NOW_S}", batch_id)

    def _count(self, condition: str, batch_id: str) -> int:
        row = self._db.execute(
            f"SELECT count(*) FROM emberd_chunks WHERE batch_id = %s AND {condition}", (batch_id,)
        ).fetchone()
        assert row is not None
        return int(row[0])

    def _write_outputs(self, batch_id: str, now_s: int) -> Outputs | None:
        """Both files in one transaction, the chunks read through a server-side cursor: memory holds
        a part of each file and a few chunks, whatever the batch's size. One daemon at a time per
        batch (an advisory lock; the others answer None and leave it)."""
        db = self._db
        with db.transaction():
            locked = db.execute("SELECT pg_try_advisory_xact_lock(hashtext(%s))", (f"emberd-outputs:{batch_id}",))
            if not (row := locked.fetchone()) or not row[0]:
                return None
            writers = [
                _PartWriter(db, output_file_object(batch_id, batch_lines.new_id("file-"), suffix, 0, now_s))
                for suffix in ("output", "errors")
            ]
            with db.cursor(name=f"emberd_outputs_{batch_id}") as chunks:
                chunks.itersize = 16
                chunks.execute(
                    "SELECT output, errors FROM emberd_chunks WHERE batch_id = %s AND done ORDER BY chunk_no",
                    (batch_id,),
                )
                for chunk_lines in chunks:
                    for writer, lines in zip(writers, chunk_lines, strict=True):
                        if lines:
                            writer.write(bytes(lines) + b"\n")
            ids = [writer.close() for writer in writers]
            return Outputs(ids[0], ids[1])

    def _drop_chunks(self, batch_id: str) -> None:
        self._db.execute("DELETE FROM emberd_chunks WHERE batch_id = %s", (batch_id,))


class _PartWriter:
    """A file written into emberd_file_parts as its lines come, PART_BYTES a row, inside the
    caller's transaction; its row carries the size once closed (removed if it had no lines)."""

    def __init__(self, db: psycopg.Connection[Any], file_object: dict[str, Any]) -> None:
        self._db = db
        self._object = file_object
        self._buffer = bytearray()
        self._part_no = 0
        self._size = 0
        _insert_file(db, file_object)  # the parts refer to it; its size is set by close()

    def write(self, data: bytes) -> None:
        self._buffer += data
        self._size += len(data)
        while len(self._buffer) >= PART_BYTES:
            self._flush(PART_BYTES)

    def _flush(self, count: int) -> None:
        _insert_part(self._db, self._object["id"], self._part_no, bytes(self._buffer[:count]))
        del self._buffer[:count]
        self._part_no += 1

    def close(self) -> str | None:
        """The file's id, or None (no lines: no file)."""
        file_id = str(self._object["id"])
        if not self._size:
            self._db.execute("DELETE FROM emberd_files WHERE id = %s", (file_id,))
            return None
        if self._buffer:
            self._flush(len(self._buffer))
        sized = {**self._object, "bytes": self._size}
        self._db.execute("UPDATE emberd_files SET object = %s WHERE id = %s", (orjson.dumps(sized).decode(), file_id))
        return file_id


def _insert_file(db: psycopg.Connection[Any], file_object: dict[str, Any]) -> None:
    db.execute(
        "INSERT INTO emberd_files (id, object, created_at) VALUES (%s, %s, %s)",
        (file_object["id"], orjson.dumps(file_object).decode(), file_object["created_at"]),
    )


def _insert_part(db: psycopg.Connection[Any], file_id: str, part_no: int, data: bytes) -> None:
    db.execute("INSERT INTO emberd_file_parts (file_id, part_no, data) VALUES (%s, %s, %s)", (file_id, part_no, data))


@contextlib.contextmanager
def _as_daemon_errors() -> Iterator[None]:
    """The server's disk full (SQLSTATE 53100) as the OSError a local disk gives: the processor and
    the routes answer both alike (the batch fails with the reason, an upload is refused as
    InsufficientDisk); a server that cannot be reached as a 503, not a bug's 500."""
    try:
        yield
    except psycopg.errors.DiskFull as error:
        raise OSError(errno.ENOSPC, f"the batch database's disk is full: {error}") from error
    except psycopg.OperationalError as error:
        raise BatchDatabaseUnavailable(f"the batch database cannot be reached: {error}") from error
