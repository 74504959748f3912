"""The vector cache: pooled vectors by model and exact token ids, in SQLite on disk or a shared Redis.

A key is the model's digest, the llama.cpp that computed the vector, the output kind, the task
adapter and the exact token ids decoded (see `cache_key`): prompts, truncation, num_ctx, windows and
token-id inputs are all in the ids, so two requests that decode the same sequence share an entry
and nothing else does. A value is the vector as the model gave it (float32, not normalised);
normalisation, `dimensions` and typed outputs are applied after the lookup, by the callers.

SQLite (`$EMBERD_HOME/cache/vectors.sqlite3`) runs in WAL mode on one thread of its own per daemon,
so its calls never block the event loop, and a request's lookups are one query. Every write is one
transaction: a daemon killed mid-write loses that write alone, and daemons sharing a home share the
file (SQLite's locks). The keys and vectors stored are bounded by `cache_max_bytes`, least recently
used out first (see `evictions`). A corrupt file is moved aside and replaced, with a warning; any
other failure is a miss, never an error of the request. Redis (`cache_url`) serves a fleet: its own
`maxmemory` and `allkeys-lru` policy bound it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

log = logging.getLogger(__name__)

# Output kinds: the pooled vector (what /api/embed returns). Token vectors, BGE-M3's sparse weights
# and ColBERT vectors are other outputs of the same ids, and would take other kinds.
POOLED = "pooled"
_KEY_VERSION = b"emberd vector cache 1"
CACHE_FILE = "vectors.sqlite3"
# Entries are evicted until the stored bytes are at most this share of cache_max_bytes, so that a
# full cache does not evict at every write.
EVICT_TO_SHARE = 0.9
# An entry's last use is written again only when older than this: a hit costs no write unless the
# entry is that old (a re-index within the minute writes nothing); LRU order is kept to the minute.
TOUCH_AFTER_S = 60.0
# How long a write waits for another daemon's transaction on the same file.
BUSY_TIMEOUT_S = 5.0
# Keys per query: a request's lookups are one query up to this many inputs (max_inputs is 2,048 by
# default; SQLite's bound on parameters is 32,766).
_KEYS_PER_QUERY = 4096
_EVICTION_CHUNK = 256
_SQLITE_CORRUPT = 11
_SQLITE_NOTADB = 26
REDIS_PREFIX = b"emberd:v1:"
REDIS_TIMEOUT_S = 2.0
_FAILURE_LOG_EVERY_S = 60.0


def cache_key(model_digest: str, llama_version: str, kind: str, task: str | None, token_ids: bytes) -> bytes:
    """The key of one decoded sequence: a SHA-256 of its parts, each length-prefixed (so no two
    different part lists hash the same bytes), with `task` None apart from every task name.
    `token_ids`: the sequence as little-endian int32, special tokens included."""
    digest = hashlib.sha256(_KEY_VERSION)
    for part in (model_digest, llama_version, kind):
        encoded = part.encode("utf-8")
        digest.update(len(encoded).to_bytes(4, "little") + encoded)
    if task is None:
        digest.update(b"\xff\xff\xff\xff")
    else:
        encoded = task.encode("utf-8")
        digest.update(len(encoded).to_bytes(4, "little") + encoded)
    digest.update(token_ids)
    return digest.digest()


def evictions(oldest_bytes: Sequence[int], stored_bytes: int, max_bytes: int) -> int:
    """How many of the least recently used entries (their sizes, oldest first) go: none while the
    stored bytes are within `max_bytes`; past it, the oldest until at most EVICT_TO_SHARE of it is
    left (all of them if that is what it takes)."""
    if stored_bytes <= max_bytes:
        return 0
    target = int(max_bytes * EVICT_TO_SHARE)
    count = 0
    for size in oldest_bytes:
        if stored_bytes <= target:
            break
        stored_bytes -= size
        count += 1
    return count


def entry_bytes(key: bytes, value: bytes) -> int:
    """What an entry counts against cache_max_bytes: its key and vector (SQLite's pages and index
    add about a sixth to the file)."""
    return len(key) + len(value)


@dataclass
class StoreOutcome:
    """What one write did: entries added, entries evicted, the bytes stored after it (None: not
    known, as with Redis)."""

    added: int = 0
    evicted: int = 0
    stored_bytes: int | None = None


class VectorStore(Protocol):
    """A backend: values by key, many at a time."""

    async def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]: ...

    async def put_many(self, items: Sequence[tuple[bytes, bytes]]) -> StoreOutcome: ...

    async def close(self) -> None: ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS vectors (key BLOB PRIMARY KEY, value BLOB NOT NULL, used_ms INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS vectors_by_use ON vectors (used_ms);
CREATE TABLE IF NOT EXISTS stored (id INTEGER PRIMARY KEY CHECK (id = 0), bytes INTEGER NOT NULL);
INSERT OR IGNORE INTO stored (id, bytes) VALUES (0, 0);
"""

_T = TypeVar("_T")


def _is_corrupt(error: sqlite3.DatabaseError) -> bool:
    code = getattr(error, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (_SQLITE_CORRUPT, _SQLITE_NOTADB)
    text = str(error)
    return "malformed" in text or "not a database" in text


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class SqliteVectors:
    """The cache in a SQLite file. The blocking methods run on the calling thread (tests and the
    async methods' single thread); the async ones on a thread of their own, in order."""

    def __init__(self, path: Path, max_bytes: int, touch_after_s: float = TOUCH_AFTER_S) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self._touch_after_ms = int(touch_after_s * 1000)
        self._connection: sqlite3.Connection | None = None
        self._identity: tuple[int, int] | None = None  # (device, inode) of the file opened
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vector-cache")
        self.stored_bytes = 0  # as of this daemon's last write (others' writes show at its next)

    # -- async, on the cache's thread ------------------------------------------------------------

    async def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        return await asyncio.get_running_loop().run_in_executor(self._executor, self.get_many_blocking, keys)

    async def put_many(self, items: Sequence[tuple[bytes, bytes]]) -> StoreOutcome:
        return await asyncio.get_running_loop().run_in_executor(self._executor, self.put_many_blocking, items)

    async def close(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._executor, self.close_blocking)
        self._executor.shutdown(wait=True)

    # -- blocking --------------------------------------------------------------------------------

    def get_many_blocking(self, keys: Sequence[bytes]) -> list[bytes | None]:
        """The values of `keys` (None: a miss); the hits' last use refreshed."""
        return self._guarded(lambda connection: self._get(connection, keys))

    def put_many_blocking(self, items: Sequence[tuple[bytes, bytes]]) -> StoreOutcome:
        """Add entries (an existing key keeps its value), then evict past the bound: one transaction."""
        return self._guarded(lambda connection: self._put(connection, items))

    def close_blocking(self) -> None:
        if self._connection is not None:
            with contextlib.suppress(sqlite3.Error):
                self._connection.close()
            self._connection = None

    def _get(self, connection: sqlite3.Connection, keys: Sequence[bytes]) -> list[bytes | None]:
        found: dict[bytes, bytes] = {}
        stale: list[bytes] = []
        now_ms = _now_ms()
        for start in range(0, len(keys), _KEYS_PER_QUERY):
            chunk = keys[start : start + _KEYS_PER_QUERY]
            marks = ",".join("?" * len(chunk))
            rows = connection.execute(f"SELECT key, value, used_ms FROM vectors WHERE key IN ({marks})", chunk)
            for key, value, used_ms in rows:
                found[key] = value
                if now_ms - used_ms >= self._touch_after_ms:
                    stale.append(key)
        if stale:
            with self._transaction(connection):
                connection.executemany("UPDATE vectors SET used_ms = ? WHERE key = ?", [(now_ms, key) for key in stale])
        return [found.get(key) for key in keys]

    def _put(self, connection: sqlite3.Connection, items: Sequence[tuple[bytes, bytes]]) -> StoreOutcome:
        outcome = StoreOutcome()
        now_ms = _now_ms()
        with self._transaction(connection):
            added_bytes = 0
            for key, value in items:
                cursor = connection.execute(
                    "INSERT OR IGNORE INTO vectors (key, value, used_ms) VALUES (?, ?, ?)", (key, value, now_ms)
                )
                if cursor.rowcount == 1:
                    outcome.added += 1
                    added_bytes += entry_bytes(key, value)
            connection.execute("UPDATE stored SET bytes = bytes + ? WHERE id = 0", (added_bytes,))
            (stored_bytes,) = connection.execute("SELECT bytes FROM stored WHERE id = 0").fetchone()
            while stored_bytes > self.max_bytes:
                oldest = connection.execute(
                    "SELECT key, length(key) + length(value) FROM vectors ORDER BY used_ms, key LIMIT ?",
                    (_EVICTION_CHUNK,),
                ).fetchall()
                if not oldest:
                    stored_bytes = 0  # nothing left: the count was off (it can only have been too high)
                    break
                count = evictions([size for _key, size in oldest], stored_bytes, self.max_bytes)
                connection.executemany("DELETE FROM vectors WHERE key = ?", [(key,) for key, _size in oldest[:count]])
                stored_bytes -= sum(size for _key, size in oldest[:count])
                outcome.evicted += count
                if count < len(oldest):
                    break
            connection.execute("UPDATE stored SET bytes = ? WHERE id = 0", (stored_bytes,))
        outcome.stored_bytes = self.stored_bytes = stored_bytes
        return outcome

    @contextlib.contextmanager
    def _transaction(self, connection: sqlite3.Connection) -> Any:
        # IMMEDIATE: the write lock is taken first, so two daemons' writes queue (busy timeout)
        # instead of one failing when it upgrades a read to a write.
        connection.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                connection.execute("ROLLBACK")
            raise
        connection.execute("COMMIT")

    def _guarded(self, operation: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run an operation; a corrupt file is replaced and the operation tried once more on the new
        one. Other failures (a full disk, a lock held past the busy timeout) are raised: VectorCache
        logs them, at most once a minute, as misses."""
        try:
            return operation(self._open())
        except sqlite3.DatabaseError as error:
            if not _is_corrupt(error):
                raise
            self._replace(error)
        return operation(self._open())

    def _open(self) -> sqlite3.Connection:
        if self._connection is not None:
            return self._connection
        self.path.parent.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        try:
            connection.execute("PRAGMA journal_mode=WAL")
            # In WAL mode, NORMAL syncs at checkpoints, not at every commit: a killed process loses
            # nothing committed; a power cut may lose the last commits, never the file.
            connection.execute("PRAGMA synchronous=NORMAL")
            with self._transaction(connection):
                for statement in _SCHEMA.strip().split(";\n"):
                    connection.execute(statement)
            (self.stored_bytes,) = connection.execute("SELECT bytes FROM stored WHERE id = 0").fetchone()
        except BaseException:
            connection.close()
            raise
        stat = os.stat(self.path)
        self._identity = (stat.st_dev, stat.st_ino)
        self._connection = connection
        return connection

    def _replace(self, error: sqlite3.DatabaseError) -> None:
        """Move a corrupt file aside (one copy kept, `vectors.sqlite3.corrupt`) for a fresh one. If
        another daemon on the same home replaced it already, the new file is opened instead."""
        opened = self._identity
        self.close_blocking()
        self._identity = None
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            return
        if opened is not None and (stat.st_dev, stat.st_ino) != opened:
            return  # replaced by another daemon since this one opened it
        aside = self.path.with_name(self.path.name + ".corrupt")
        os.replace(self.path, aside)
        for suffix in ("-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path.with_name(self.path.name + suffix))
        log.warning("vector cache %s is corrupt (%s): moved to %s, starting an empty one", self.path, error, aside)


class RedisVectors:
    """The cache in a Redis server shared by a fleet (redis-py's asyncio client): one MGET a lookup,
    one pipeline a write. Bounded by the server's own maxmemory and eviction policy."""

    def __init__(self, url: str) -> None:
        import redis.asyncio

        self._client: Any = redis.asyncio.Redis.from_url(
            url, socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S
        )

    async def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        values: list[bytes | None] = await self._client.mget([REDIS_PREFIX + key for key in keys])
        return values

    async def put_many(self, items: Sequence[tuple[bytes, bytes]]) -> StoreOutcome:
        pipeline = self._client.pipeline(transaction=False)
        for key, value in items:
            pipeline.set(REDIS_PREFIX + key, value)
        await pipeline.execute()
        return StoreOutcome(added=len(items))

    async def close(self) -> None:
        await self._client.aclose()


@dataclass(frozen=True)
class CacheEvents:
    """Where the cache reports (the daemon's metrics)."""

    looked_up: Callable[[str, int, int], None]  # model, hits, misses
    stored: Callable[[StoreOutcome], None]


class VectorCache:
    """The daemon's cache: lookups awaited, writes in the background (a daemon's writes and lookups
    run in order on the SQLite thread), failures logged as misses, never raised."""

    def __init__(self, backend: VectorStore, events: CacheEvents | None = None) -> None:
        self.backend = backend
        self._events = events
        self._writes: set[asyncio.Task[None]] = set()
        self._failure_logged_s = -_FAILURE_LOG_EVERY_S

    async def lookup(self, model: str, keys: Sequence[bytes]) -> list[bytes | None]:
        try:
            values = await self.backend.get_many(keys) if keys else []
        except Exception as error:  # a Redis down or slow: a miss
            self._log_failure("lookup", error)
            values = [None] * len(keys)
        if self._events is not None and keys:
            hits = sum(value is not None for value in values)
            self._events.looked_up(model, hits, len(keys) - hits)
        return values

    def store(self, items: Sequence[tuple[bytes, bytes]]) -> None:
        """Write entries in the background (close() waits for them)."""
        if items:
            task = asyncio.create_task(self._store(items))
            self._writes.add(task)
            task.add_done_callback(self._writes.discard)

    async def _store(self, items: Sequence[tuple[bytes, bytes]]) -> None:
        try:
            outcome = await self.backend.put_many(items)
        except Exception as error:
            self._log_failure("write", error)
            return
        if self._events is not None:
            self._events.stored(outcome)

    async def flush(self) -> None:
        """Wait for the writes under way."""
        while self._writes:
            await asyncio.gather(*self._writes)

    async def close(self) -> None:
        await self.flush()
        await self.backend.close()

    def _log_failure(self, what: str, error: Exception) -> None:
        now_s = time.monotonic()
        if now_s - self._failure_logged_s >= _FAILURE_LOG_EVERY_S:
            self._failure_logged_s = now_s
            log.warning("vector cache %s failed: %s: %s (treated as a miss)", what, type(error).__name__, error)


def open_vector_cache(
    enabled: bool, home: Path, max_bytes: int, url: str, events: CacheEvents | None = None
) -> VectorCache | None:
    """The cache the settings ask for: none when off, Redis with a URL, else SQLite under the home.
    Nothing is opened here: the file at its first use, on the cache's thread."""
    if not enabled:
        return None
    backend: VectorStore = RedisVectors(url) if url else SqliteVectors(home / "cache" / CACHE_FILE, max_bytes)
    return VectorCache(backend, events)
