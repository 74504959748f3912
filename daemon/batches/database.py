"""Where batches live: their files, their state, their chunks and each chunk's output. One interface
(BatchDatabase) with two backends, chosen by `batch_database_url` (open_batch_database):

- SQLite (the default, empty url): `$EMBERD_HOME/batches/batches.sqlite3`, file contents beside it in
  `files/`; one daemon's own (this module).
- PostgreSQL (`postgresql://...`): batches, files (contents in parts) and chunk output in one database
  that every daemon of a fleet shares (daemon.batches.postgres).

Durability is by transactions. A chunk's output and its "done" mark are written in one transaction,
so a daemon killed at any point has either recorded a chunk whole or not at all, and a restart runs
the chunks not recorded: every custom_id is answered exactly once. Claims carry a lease, so a chunk
claimed by a process that died is claimed again once the lease has passed (at start-up, this
daemon's own earlier claims are given back at once). A file's row and its content appear together
or not at all.

SQLite runs on one thread of its own (its calls never block the event loop); a file's content is
moved into `files/` whole before its row names it, and a file on disk that no row names is removed
at start-up.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sqlite3
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import orjson

from daemon.batches import lines as batch_lines
from daemon.batches.lines import FINAL_STATUSES, may_become
from daemon.durable import fsync_directory

if TYPE_CHECKING:
    from daemon.config import Settings

T = TypeVar("T")
DATABASE_FILE = "batches.sqlite3"
BUSY_TIMEOUT_S = 10.0
READ_PIECE_BYTES = 1 << 20  # a file's content is served and read in pieces this large
POSTGRES_SCHEMES = ("postgresql://", "postgres://")

SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY,
    object TEXT NOT NULL,           -- the file object (JSON) the routes answer
    created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS batches (
    id TEXT PRIMARY KEY,
    object TEXT NOT NULL,           -- the batch object (JSON), request_counts apart
    status TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS batches_by_status ON batches (status, created_at);
CREATE TABLE IF NOT EXISTS chunks (
    batch_id TEXT NOT NULL,
    chunk_no INTEGER NOT NULL,
    lines BLOB NOT NULL,            -- the chunk's requests (lines.encode_lines)
    line_count INTEGER NOT NULL,
    done INTEGER NOT NULL DEFAULT 0,
    claimed_by TEXT,
    lease_until REAL NOT NULL DEFAULT 0,
    output BLOB,                    -- output-file lines, once done
    errors BLOB,                    -- error-file lines, once done
    completed INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (batch_id, chunk_no)
);
CREATE INDEX IF NOT EXISTS chunks_pending ON chunks (done, lease_until);
"""


@dataclass(frozen=True)
class Claim:
    """A chunk a processor holds until `lease_until` (unix seconds; on PostgreSQL, the server's clock)."""

    batch_id: str
    chunk_no: int
    lines: bytes
    lease_until: float


@dataclass(frozen=True)
class Outputs:
    """A batch's output and error files as stored (None: no lines, no file, as OpenAI leaves it null)."""

    output_file_id: str | None
    error_file_id: str | None


class BatchDatabase(ABC):
    """What the routes and the processor need of a backend (SQLite or PostgreSQL). Each call runs the
    backend's blocking method of the same name (`_file` for `file`) on the database's own thread, one
    at a time, so a backend's calls never block the event loop and never overlap."""

    def __init__(self, owner: str, staging_dir: Path) -> None:
        self.owner = owner  # this daemon's name in claims: host name, listen address and port, stable across restarts
        self.staging_dir = staging_dir  # where an upload is written before store_file takes it
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="emberd-batches")

    async def _run(self, function: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._call, function, args)

    def _call(self, function: Callable[..., T], args: tuple[Any, ...]) -> T:
        """On the database's thread: where a backend turns its driver's errors into the daemon's."""
        return function(*args)

    async def open(self) -> None:
        await self._run(self._open)

    async def close(self) -> None:
        await self._run(self._close)
        self._executor.shutdown(wait=True)

    async def store_file(self, file_object: dict[str, Any], path: Path) -> None:
        """The file's row and the content of `path` (a file under staging_dir, taken over: moved in
        or removed), stored together."""
        await self._run(self._store_file, file_object, path)

    async def file(self, file_id: str) -> dict[str, Any] | None:
        return await self._run(self._file, file_id)

    async def files(self) -> list[dict[str, Any]]:
        return await self._run(self._files)

    @abstractmethod
    def content(self, file_id: str) -> AsyncIterator[bytes]:
        """A file's content in pieces (none if it is gone), never whole in memory."""

    @abstractmethod
    def input_lines(self, file_id: str) -> Iterator[bytes]:
        """A file's lines (a batch's input, to validate it), read as they are asked for: blocking,
        on a worker thread of the caller's, never the database's (a large file would hold it up).
        FileNotFoundError when the file is gone."""

    async def delete_file(self, file_id: str) -> bool:
        return await self._run(self._delete_file, file_id)

    async def add_batch(self, batch: dict[str, Any]) -> None:
        await self._run(self._add_batch, batch)

    async def batch(self, batch_id: str) -> dict[str, Any] | None:
        return await self._run(self._batch, batch_id)

    async def batches(self, after: str | None, limit: int) -> list[dict[str, Any]]:
        """Newest first, from the one after `after` (OpenAI's cursor)."""
        return await self._run(self._batches, after, limit)

    async def batches_in(self, statuses: tuple[str, ...]) -> list[dict[str, Any]]:
        return await self._run(self._batches_in, statuses)

    async def move(
        self, batch_id: str, change: Callable[[dict[str, Any]], dict[str, Any] | None]
    ) -> dict[str, Any] | None:
        """Apply `change` to the batch in one transaction: it answers the new object, or None to
        leave it; a new status must be one the old may become (lines.NEXT_STATUSES). Answers the
        batch as it is afterwards (None: no such batch)."""
        return await self._run(self._move, batch_id, change)

    async def start_batch(self, batch_id: str, chunks: list[tuple[bytes, int]], started: dict[str, Any]) -> bool:
        """A validated batch's chunks (encoded lines, line count) and the batch in_progress, in one
        transaction; False if it is no longer validating (cancelled, or another daemon started it)."""
        return await self._run(self._start_batch, batch_id, chunks, started)

    async def claim(self, lease_s: float) -> Claim | None:
        """The oldest in-progress batch's first chunk that nobody holds (or whose holder's lease has
        passed), now held by this daemon until the lease ends."""
        return await self._run(self._claim, lease_s)

    async def renew(self, claim: Claim, lease_s: float) -> bool:
        """A chunk still running held `lease_s` longer; False if it is no longer this daemon's."""
        return await self._run(self._renew, claim, lease_s)

    async def give_back_claims(self) -> int:
        """At start-up: this daemon's claims from before a restart are free at once."""
        return await self._run(self._give_back_claims)

    async def finish_chunk(self, claim: Claim, output: bytes, errors: bytes, completed: int, failed: int) -> bool:
        """Record a chunk's lines whole; False if it was recorded already (another daemon took it
        over after this one's lease passed, and finished first): its lines are answered once."""
        return await self._run(self._finish_chunk, claim, output, errors, completed, failed)

    async def pending_chunks(self, batch_id: str) -> int:
        return await self._run(self._pending_chunks, batch_id)

    async def held_chunks(self, batch_id: str) -> int:
        """Chunks of the batch that some daemon holds now (a cancelled batch waits for them)."""
        return await self._run(self._held_chunks, batch_id)

    async def write_outputs(self, batch_id: str, now_s: int) -> Outputs | None:
        """The output and error files of a batch from its recorded chunks, each stored whole with its
        row; None if another daemon is writing them right now. OSError when the disk is full."""
        return await self._run(self._write_outputs, batch_id, now_s)

    async def drop_chunks(self, batch_id: str) -> None:
        """A final batch's chunks, once its files hold their lines."""
        await self._run(self._drop_chunks, batch_id)

    # -- the backend's blocking methods, on the database's thread ---------------------------------

    @abstractmethod
    def _open(self) -> None: ...
    @abstractmethod
    def _close(self) -> None: ...
    @abstractmethod
    def _store_file(self, file_object: dict[str, Any], path: Path) -> None: ...
    @abstractmethod
    def _file(self, file_id: str) -> dict[str, Any] | None: ...
    @abstractmethod
    def _files(self) -> list[dict[str, Any]]: ...
    @abstractmethod
    def _delete_file(self, file_id: str) -> bool: ...
    @abstractmethod
    def _add_batch(self, batch: dict[str, Any]) -> None: ...
    @abstractmethod
    def _batch(self, batch_id: str) -> dict[str, Any] | None: ...
    @abstractmethod
    def _batches(self, after: str | None, limit: int) -> list[dict[str, Any]]: ...
    @abstractmethod
    def _batches_in(self, statuses: tuple[str, ...]) -> list[dict[str, Any]]: ...
    @abstractmethod
    def _move(
        self, batch_id: str, change: Callable[[dict[str, Any]], dict[str, Any] | None]
    ) -> dict[str, Any] | None: ...
    @abstractmethod
    def _start_batch(self, batch_id: str, chunks: list[tuple[bytes, int]], started: dict[str, Any]) -> bool: ...
    @abstractmethod
    def _claim(self, lease_s: float) -> Claim | None: ...
    @abstractmethod
    def _renew(self, claim: Claim, lease_s: float) -> bool: ...
    @abstractmethod
    def _give_back_claims(self) -> int: ...
    @abstractmethod
    def _finish_chunk(self, claim: Claim, output: bytes, errors: bytes, completed: int, failed: int) -> bool: ...
    @abstractmethod
    def _pending_chunks(self, batch_id: str) -> int: ...
    @abstractmethod
    def _held_chunks(self, batch_id: str) -> int: ...
    @abstractmethod
    def _write_outputs(self, batch_id: str, now_s: int) -> Outputs | None: ...
    @abstractmethod
    def _drop_chunks(self, batch_id: str) -> None: ...


def daemon_owner(settings: Settings) -> str:
    """This daemon's name in claims: the same after a restart (no pid), distinct per daemon of a host
    (the port too: daemons of one host listen on one address, on their own ports)."""
    return f"{socket.gethostname()}:{settings.host}:{settings.port}"


def open_batch_database(settings: Settings) -> BatchDatabase:
    """The backend `batch_database_url` names (not yet opened)."""
    url = settings.batch_database_url
    if not url:
        return SQLiteBatchDatabase(settings.home / "batches", daemon_owner(settings))
    if url.startswith(POSTGRES_SCHEMES):
        from daemon.batches.postgres import PostgresBatchDatabase  # psycopg only where it is used

        return PostgresBatchDatabase(url, settings.home / "batches" / "staging", daemon_owner(settings))
    raise ValueError(f"batch_database_url must be empty (SQLite) or postgresql://..., got {url.split(':')[0]}:...")


def checked_change(batch_id: str, before: dict[str, Any], after: dict[str, Any]) -> None:
    if after["status"] != before["status"] and not may_become(before["status"], after["status"]):
        raise ValueError(f"batch {batch_id}: {before['status']} cannot become {after['status']}")


def page_after(ids: list[str], after: str | None, limit: int) -> slice:
    """OpenAI's cursor: the page of at most `limit` from the one after `after` (the start if unknown)."""
    start = ids.index(after) + 1 if after in ids else 0
    return slice(start, start + limit)


def output_file_object(batch_id: str, file_id: str, suffix: str, size: int, now_s: int) -> dict[str, Any]:
    return batch_lines.file_object(file_id, f"{batch_id}_{suffix}.jsonl", "batch_output", size, now_s)


class SQLiteBatchDatabase(BatchDatabase):
    """One daemon's batches in SQLite under EMBERD_HOME."""

    def __init__(self, directory: Path, owner: str) -> None:
        # An upload is written into files/ and renamed into place: the same file system.
        super().__init__(owner, staging_dir=directory / "files")
        self.directory = directory
        self.files_dir = directory / "files"
        self._connection: sqlite3.Connection | None = None

    # -- lifetime --------------------------------------------------------------------------------

    def _open(self) -> None:
        self.files_dir.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(
            self.directory / DATABASE_FILE, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
        )
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=FULL")  # a committed chunk survives a power cut too
        connection.executescript(SCHEMA)
        self._connection = connection
        named = {row[0] for row in connection.execute("SELECT id FROM files")}
        for path in self.files_dir.iterdir():  # a partial upload or output file no row names
            if path.name.removesuffix(".jsonl") not in named:
                path.unlink(missing_ok=True)

    def _close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    @property
    def _db(self) -> sqlite3.Connection:
        assert self._connection is not None, "the batch database is not open"
        return self._connection

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)

    # -- files -----------------------------------------------------------------------------------

    def stored_path(self, file_id: str) -> Path:
        """Where a file's content lives (moved there whole before its row names it)."""
        return self.files_dir / f"{file_id}.jsonl"

    def _store_file(self, file_object: dict[str, Any], path: Path) -> None:
        final = self.stored_path(file_object["id"])
        try:
            os.replace(path, final)
            fsync_directory(final.parent)
            self._add_files([file_object])
        except BaseException:
            path.unlink(missing_ok=True)
            final.unlink(missing_ok=True)
            raise

    def _add_files(self, file_objects: list[dict[str, Any]]) -> None:
        with self._transaction() as db:
            db.executemany(
                "INSERT INTO files (id, object, created_at) VALUES (?, ?, ?)",
                [(item["id"], orjson.dumps(item), item["created_at"]) for item in file_objects],
            )

    async def content(self, file_id: str) -> AsyncIterator[bytes]:
        try:
            source = await asyncio.to_thread(self.stored_path(file_id).open, "rb")
        except FileNotFoundError:
            return
        try:
            while piece := await asyncio.to_thread(source.read, READ_PIECE_BYTES):
                yield piece
        finally:
            source.close()

    def input_lines(self, file_id: str) -> Iterator[bytes]:
        with self.stored_path(file_id).open("rb") as source:
            yield from source

    def _file(self, file_id: str) -> dict[str, Any] | None:
        row = self._db.execute("SELECT object FROM files WHERE id = ?", (file_id,)).fetchone()
        return None if row is None else dict(orjson.loads(row[0]))

    def _files(self) -> list[dict[str, Any]]:
        rows = self._db.execute("SELECT object FROM files ORDER BY created_at DESC, id").fetchall()
        return [dict(orjson.loads(row[0])) for row in rows]

    def _delete_file(self, file_id: str) -> bool:
        with self._transaction() as db:
            deleted = db.execute("DELETE FROM files WHERE id = ?", (file_id,)).rowcount > 0
        if deleted:
            self.stored_path(file_id).unlink(missing_ok=True)
        return deleted

    # -- batches ---------------------------------------------------------------------------------

    def _add_batch(self, batch: dict[str, Any]) -> None:
        with self._transaction() as db:
            db.execute(
                "INSERT INTO batches (id, object, status, created_at) VALUES (?, ?, ?, ?)",
                (batch["id"], orjson.dumps(batch), batch["status"], batch["created_at"]),
            )

    def _batch(self, batch_id: str) -> dict[str, Any] | None:
        row = self._db.execute("SELECT object FROM batches WHERE id = ?", (batch_id,)).fetchone()
        return None if row is None else self._with_counts(dict(orjson.loads(row[0])))

    def _with_counts(self, batch: dict[str, Any]) -> dict[str, Any]:
        """request_counts from the chunks recorded so far (a final batch has them in its object)."""
        if batch["status"] in FINAL_STATUSES:
            return batch
        completed, failed = self._db.execute(
            "SELECT coalesce(sum(completed), 0), coalesce(sum(failed), 0) FROM chunks WHERE batch_id = ? AND done = 1",
            (batch["id"],),
        ).fetchone()
        total = batch["request_counts"]["total"]
        return {**batch, "request_counts": {"total": total, "completed": completed, "failed": failed}}

    def _batches(self, after: str | None, limit: int) -> list[dict[str, Any]]:
        """Newest first, from the one after `after` (OpenAI's cursor)."""
        rows = self._db.execute("SELECT id, object FROM batches ORDER BY created_at DESC, id DESC").fetchall()
        page = page_after([row[0] for row in rows], after, limit)
        return [self._with_counts(dict(orjson.loads(row[1]))) for row in rows[page]]

    def _batches_in(self, statuses: tuple[str, ...]) -> list[dict[str, Any]]:
        marks = ", ".join("?" * len(statuses))
        rows = self._db.execute(
            f"SELECT object FROM batches WHERE status IN ({marks}) ORDER BY created_at, id", statuses
        ).fetchall()
        return [self._with_counts(dict(orjson.loads(row[0]))) for row in rows]

    def _move(self, batch_id: str, change: Callable[[dict[str, Any]], dict[str, Any] | None]) -> dict[str, Any] | None:
        with self._transaction() as db:
            row = db.execute("SELECT object FROM batches WHERE id = ?", (batch_id,)).fetchone()
            if row is None:
                return None
            batch = dict(orjson.loads(row[0]))
            after = change(self._with_counts(batch))
            if after is None:
                return self._with_counts(batch)
            checked_change(batch_id, batch, after)
            db.execute(
                "UPDATE batches SET object = ?, status = ? WHERE id = ?",
                (orjson.dumps(after), after["status"], batch_id),
            )
            return after if after["status"] in FINAL_STATUSES else self._with_counts(after)

    # -- chunks ----------------------------------------------------------------------------------

    def _start_batch(self, batch_id: str, chunks: list[tuple[bytes, int]], started: dict[str, Any]) -> bool:
        with self._transaction() as db:
            row = db.execute("SELECT status FROM batches WHERE id = ?", (batch_id,)).fetchone()
            if row is None or row[0] != "validating":
                return False
            db.execute("DELETE FROM chunks WHERE batch_id = ?", (batch_id,))
            db.executemany(
                "INSERT INTO chunks (batch_id, chunk_no, lines, line_count) VALUES (?, ?, ?, ?)",
                [(batch_id, number, lines, count) for number, (lines, count) in enumerate(chunks)],
            )
            db.execute(
                "UPDATE batches SET object = ?, status = ? WHERE id = ?",
                (orjson.dumps(started), started["status"], batch_id),
            )
            return True

    def _claim(self, lease_s: float) -> Claim | None:
        now_s = time.time()
        with self._transaction() as db:
            row = db.execute(
                "SELECT c.batch_id, c.chunk_no, c.lines FROM chunks c JOIN batches b ON b.id = c.batch_id"
                " WHERE b.status = 'in_progress' AND c.done = 0 AND c.lease_until < ?"
                " ORDER BY b.created_at, b.id, c.chunk_no LIMIT 1",
                (now_s,),
            ).fetchone()
            if row is None:
                return None
            lease_until = now_s + lease_s
            db.execute(
                "UPDATE chunks SET claimed_by = ?, lease_until = ? WHERE batch_id = ? AND chunk_no = ?",
                (self.owner, lease_until, row[0], row[1]),
            )
            return Claim(row[0], row[1], bytes(row[2]), lease_until)

    def _renew(self, claim: Claim, lease_s: float) -> bool:
        with self._transaction() as db:
            return (
                db.execute(
                    "UPDATE chunks SET lease_until = ? WHERE batch_id = ? AND chunk_no = ? AND done = 0"
                    " AND claimed_by = ?",
                    (time.time() + lease_s, claim.batch_id, claim.chunk_no, self.owner),
                ).rowcount
                > 0
            )

    def _give_back_claims(self) -> int:
        """Every claim: a SQLite file under EMBERD_HOME is one daemon's, so every claim in it was this
        daemon's, from before its restart."""
        with self._transaction() as db:
            return db.execute("UPDATE chunks SET lease_until = 0, claimed_by = NULL WHERE done = 0").rowcount

    def _finish_chunk(self, claim: Claim, output: bytes, errors: bytes, completed: int, failed: int) -> bool:
        with self._transaction() as db:
            return (
                db.execute(
                    "UPDATE chunks SET done = 1, output = ?, errors = ?, completed = ?, failed = ?"
                    " WHERE batch_id = ? AND chunk_no = ? AND done = 0",
                    (output, errors, completed, failed, claim.batch_id, claim.chunk_no),
                ).rowcount
                > 0
            )

    def _pending_chunks(self, batch_id: str) -> int:
        row = self._db.execute("SELECT count(*) FROM chunks WHERE batch_id = ? AND done = 0", (batch_id,)).fetchone()
        return int(row[0])

    def _held_chunks(self, batch_id: str) -> int:
        row = self._db.execute(
            "SELECT count(*) FROM chunks WHERE batch_id = ? AND done = 0 AND lease_until >= ?", (batch_id, time.time())
        ).fetchone()
        return int(row[0])

    def chunk_outputs(self, batch_id: str) -> Iterator[tuple[bytes, bytes]]:
        """Each recorded chunk's (output lines, error lines), in chunk order. Called on the
        database's thread (see write_outputs)."""
        cursor = self._db.execute(
            "SELECT output, errors FROM chunks WHERE batch_id = ? AND done = 1 ORDER BY chunk_no", (batch_id,)
        )
        for output, errors in cursor:
            yield bytes(output or b""), bytes(errors or b"")

    def _write_outputs(self, batch_id: str, now_s: int) -> Outputs:
        """Each file written whole (an fsynced temporary file renamed), then the rows of those with
        lines in one transaction; the others removed."""
        output_id, error_id = batch_lines.new_id("file-"), batch_lines.new_id("file-")
        output_path, error_path = self.stored_path(output_id), self.stored_path(error_id)
        partial_output, partial_errors = output_path.with_suffix(".partial"), error_path.with_suffix(".partial")
        try:
            with partial_output.open("wb") as output, partial_errors.open("wb") as errors:
                for chunk_output, chunk_errors in self.chunk_outputs(batch_id):
                    for target, lines in ((output, chunk_output), (errors, chunk_errors)):
                        if lines:
                            target.write(lines)
                            target.write(b"\n")
                for target in (output, errors):
                    target.flush()
                    os.fsync(target.fileno())
            sizes = partial_output.stat().st_size, partial_errors.stat().st_size
            os.replace(partial_output, output_path)
            os.replace(partial_errors, error_path)
            fsync_directory(output_path.parent)
        finally:
            partial_output.unlink(missing_ok=True)
            partial_errors.unlink(missing_ok=True)
        named: list[dict[str, Any]] = []
        for file_id, path, size, suffix in (
            (output_id, output_path, sizes[0], "output"),
            (error_id, error_path, sizes[1], "errors"),
        ):
            if size:
                named.append(output_file_object(batch_id, file_id, suffix, size, now_s))
            else:
                path.unlink(missing_ok=True)
        self._add_files(named)
        return Outputs(output_id if sizes[0] else None, error_id if sizes[1] else None)

    def _drop_chunks(self, batch_id: str) -> None:
        with self._transaction() as db:
            db.execute("DELETE FROM chunks WHERE batch_id = ?", (batch_id,))


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on an error): a writer takes the lock at once, so two
    daemons on one file never both read and then both write."""

    def __init__(self, connection: sqlite3.Connection) -> None:
        self._connection = connection

    def __enter__(self) -> sqlite3.Connection:
        self._connection.execute("BEGIN IMMEDIATE")
        return self._connection

    def __exit__(self, kind: object, error: object, trace: object) -> None:
        self._connection.execute("COMMIT" if kind is None else "ROLLBACK")
