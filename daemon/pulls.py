"""Pulls: Hub file -> verified blob -> manifest, with Ollama's progress events.

Two pulls of one model share one download: the second subscribes to the first's events (replayed
from the start). A pull keeps going if its client disconnects, so a retry finds it done or joins it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

from daemon.errors import BlobMissing, DownloadFailed, EmberdError, InsufficientDisk, InvalidModelFile
from daemon.gguf_info import read_gguf_facts
from daemon.hub import HubClient, HubFile
from daemon.jobs import CancelToken, JobExecutor
from daemon.names import canonical_name
from daemon.store import ModelStore

log = logging.getLogger(__name__)
# Room kept free beyond the download itself, for manifests and the rest of the machine.
DISK_MARGIN_BYTES = 64 * 1024 * 1024
# Progress events per file: enough for a smooth bar, few enough to replay to a late subscriber.
PROGRESS_STEPS = 200

Event = dict[str, Any]


def disk_free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


def _staged_bytes(directory: Path) -> int:
    """What an earlier attempt, or the download under way, left in a staging folder: a partial
    file, or a complete one not yet verified. It is not fetched again."""
    staged = 0
    for path in directory.glob("*"):
        with contextlib.suppress(FileNotFoundError):  # verified and moved into the store meanwhile
            staged += path.stat().st_size if path.is_file() else 0
    return staged


def bytes_needed(total_bytes: int, already_bytes: int) -> int:
    return max(0, total_bytes - already_bytes) + DISK_MARGIN_BYTES


class PullJob:
    """The events of one pull, for any number of followers. Touched only from the event loop."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.error: EmberdError | None = None
        self.finished = False
        self.followers = 0  # streams that follow it (a second pull of the same name joins)
        self._changed = asyncio.Event()
        self._last_step = -1
        self._last_completed = -1

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def add(self, event: Event) -> None:
        self.events.append(event)
        self._wake()

    def progress(self, status: str, digest: str, total: int, completed: int) -> None:
        step = completed * PROGRESS_STEPS // total if total else 0
        if step == self._last_step and (completed != total or self._last_completed == completed):
            return
        self._last_step, self._last_completed = step, completed
        self.add({"status": status, "digest": digest, "total": total, "completed": completed})

    def finish(self, error: EmberdError | None) -> None:
        self.error = error
        self.finished = True
        self._wake()

    async def follow(self) -> AsyncIterator[Event]:
        """Every event from the first, then new ones as they come; raises the pull's error at the end."""
        self.followers += 1
        index = 0
        while True:
            changed = self._changed
            while index < len(self.events):
                yield self.events[index]
                index += 1
            if self.finished:
                if self.error is not None:
                    raise self.error
                return
            await changed.wait()


class PullManager:
    def __init__(
        self,
        store: ModelStore,
        hub: HubClient,
        jobs: JobExecutor,
        free_bytes: Callable[[Path], int] = disk_free_bytes,
        on_bytes: Callable[[int], None] = lambda _count: None,
        after_publish: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        self._store = store
        self._hub = hub
        self._executor = jobs
        self._free_bytes = free_bytes
        self._on_bytes = on_bytes  # bytes received from the Hub, for /metrics
        # Run once a pulled model is in the store, before the pull reports success (calibration).
        self._after_publish = after_publish
        self._jobs: dict[str, PullJob] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        # Downloads by blob sha256, with the jobs waiting on each: two names for one file (an alias
        # and its hf.co name) share one download and one staging folder.
        self._downloads: dict[str, tuple[asyncio.Task[None], list[PullJob]]] = {}
        # Downloads under way, by sha256: (size, staging folder). What they still lack is promised,
        # so two pulls that each fit alone do not both start on a disk that holds one.
        self._under_way: dict[str, tuple[int, Path]] = {}

    @property
    def in_flight(self) -> int:
        return len(self._jobs)

    def followers(self, name: str) -> int:
        """How many streams follow the pull of `name` now (0: none under way)."""
        job = self._jobs.get(canonical_name(name))
        return job.followers if job is not None else 0

    def waiting_for(self, sha256: str) -> int:
        """How many pulls wait on the download of one blob (one download, however many names)."""
        shared = self._downloads.get(sha256)
        return len(shared[1]) if shared is not None else 0

    def start(self, name: str) -> PullJob:
        """Start pulling `name`, or join the pull of it already under way."""
        canonical = canonical_name(name)
        job = self._jobs.get(canonical)
        if job is None:
            self._hub.check_pullable(name)
            # huggingface_hub is imported at the first pull, not at start-up (about 9 MiB the daemon
            # does not hold until then). Here, on the loop, once: in a job thread the import would
            # hold the GIL against every request for as long, in bursts.
            import daemon.hub_http  # noqa: F401

            job = PullJob()
            self._jobs[canonical] = job
            task = asyncio.create_task(self._run(name, canonical, job), name=f"pull-{canonical}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return job

    async def pull(self, name: str) -> None:
        """Pull to completion, ignoring progress (stream:false and auto_pull)."""
        async for _event in self.start(name).follow():
            pass

    async def wait_finished(self) -> None:
        """Until every pull has ended (after the job executor's cancel_all, they end at their next chunk)."""
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _run(self, name: str, canonical: str, job: PullJob) -> None:
        error: EmberdError | None = None
        try:
            job.add({"status": "pulling manifest"})
            hub_file = await self._executor.run(lambda _token: self._hub.resolve(name))
            heads_hex: str | None = None
            for attempt in range(2):
                for wanted in (hub_file, *hub_file.adapters):  # the model, then its task adapters
                    if not self._store.has_blob(wanted.sha256):
                        await self._download_once(wanted, job)
                if hub_file.heads and (heads_hex is None or not self._store.has_blob(heads_hex)):
                    heads_hex = await self._pull_heads(hub_file, job)
                job.add({"status": "writing manifest"})
                try:
                    await asyncio.to_thread(
                        self._store.publish_blob,
                        canonical,
                        hub_file.sha256,
                        hub_file.source,
                        hub_file.prompts,
                        [(adapter.sha256, None) for adapter in hub_file.adapters],
                        hub_file.default_task,
                        heads_hex,
                    )
                    break
                except BlobMissing:
                    if attempt == 1:
                        raise  # deleted twice in a row: the pull fails with the reason
                    log.info("the blob of %s was deleted meanwhile: downloading it again", canonical)
            if self._after_publish is not None:
                job.add({"status": "calibrating int8 and uint8 ranges"})
                await self._after_publish(canonical)
            job.add({"status": "success"})
        except EmberdError as failure:
            error = failure
        except Exception as failure:  # a bug must still end the stream with an error line
            log.exception("pull of %s failed", canonical)
            error = DownloadFailed(f"pull failed: {failure}")
        finally:
            del self._jobs[canonical]
            job.finish(error)

    async def _pull_heads(self, hub_file: HubFile, job: PullJob) -> str:
        """BGE-M3's head files (a few MiB, from the alias's heads_repo), each verified against the
        Hub's sha256 and read without running its pickle (daemon.heads), as one heads blob checked
        against the model's width: its digest hex."""
        staged: list[Path] = []
        paths: list[Path] = []
        try:
            for head in hub_file.heads:
                job.add({"status": f"pulling {head.filename} from hf.co/{head.repo_id}"})
                directory = self._store.download_dir(head.sha256)
                directory.mkdir(parents=True, exist_ok=True)
                staged.append(directory)
                path = await self._executor.run(
                    functools.partial(self._hub.download, head, directory, lambda _completed, _total: None)
                )
                actual = await self._executor.run(functools.partial(ModelStore.hash_file, path))
                if actual != head.sha256:
                    raise DownloadFailed(f"{head.filename}: want sha256:{head.sha256}, got sha256:{actual}")
                paths.append(path)
            model = self._store.blobs_dir / f"sha256-{hub_file.sha256}"
            sparse, colbert = paths  # in HEAD_FILES' order
            return await asyncio.to_thread(self._store.store_heads_files, sparse, colbert, model)
        finally:
            for directory in staged:
                shutil.rmtree(directory, ignore_errors=True)

    async def _download_once(self, hub_file: HubFile, job: PullJob) -> None:
        """Download a blob once, however many pulls (under different names) want it."""
        sha256 = hub_file.sha256
        shared = self._downloads.get(sha256)
        if shared is None:
            listeners = [job]
            download = asyncio.create_task(self._download(hub_file, listeners))
            self._downloads[sha256] = (download, listeners)

            def forget(done: asyncio.Task[None]) -> None:
                self._downloads.pop(sha256, None)
                if not done.cancelled():
                    done.exception()  # retrieved: every waiter may have left

            download.add_done_callback(forget)
        else:
            download, listeners = shared
            listeners.append(job)
        await asyncio.shield(download)

    async def _download(self, hub_file: HubFile, jobs: list[PullJob]) -> None:
        directory = self._store.download_dir(hub_file.sha256)
        # Only what is not staged yet needs room, beside what downloads under way still lack. A
        # refusal creates nothing.
        needed = bytes_needed(hub_file.size_bytes, _staged_bytes(directory))
        free = self._free_bytes(self._store.downloads_dir)
        promised = sum(max(0, size - _staged_bytes(staging)) for size, staging in self._under_way.values())
        if free - promised < needed:
            others = f", {promised / 2**20:.0f} MiB of them to downloads under way" if promised else ""
            raise InsufficientDisk(
                f"not enough disk space for {hub_file.filename}: it needs {needed / 2**20:.0f} MiB, "
                f"{free / 2**20:.0f} MiB are free{others}"
            )
        directory.mkdir(parents=True, exist_ok=True)
        self._under_way[hub_file.sha256] = (hub_file.size_bytes, directory)
        try:
            with self._removed_if_the_disk_fills(hub_file, directory):
                await self._fetch_verify_adopt(hub_file, directory, jobs)
        finally:
            del self._under_way[hub_file.sha256]

    @contextlib.contextmanager
    def _removed_if_the_disk_fills(self, hub_file: HubFile, directory: Path) -> Iterator[None]:
        """A disk that fills up during the download (another writer took the room the check saw) is a
        507 that says so. The partial file goes: it holds the space that ran out, and a pull can only
        resume once there is room for the rest anyway."""
        try:
            yield
        except (OSError, InsufficientDisk) as error:
            if isinstance(error, OSError) and error.errno != errno.ENOSPC:
                raise
            shutil.rmtree(directory, ignore_errors=True)
            free = self._free_bytes(self._store.downloads_dir)
            raise InsufficientDisk(
                f"no space left on device: the disk of {self._store.downloads_dir.parent} filled up while "
                f"downloading {hub_file.filename} ({hub_file.size_bytes / 2**20:.0f} MiB). The partial download "
                f"was removed; {free / 2**20:.0f} MiB are free now. Free some space and pull again"
            ) from None

    async def _fetch_verify_adopt(self, hub_file: HubFile, directory: Path, jobs: list[PullJob]) -> None:
        loop = asyncio.get_running_loop()
        status, digest = f"pulling {hub_file.sha256[:12]}", f"sha256:{hub_file.sha256}"
        received: int | None = None  # the first report is where the transfer starts (resumes)

        def report(completed: int, total: int) -> None:  # called from the download thread
            nonlocal received
            if received is not None and completed > received:
                loop.call_soon_threadsafe(self._on_bytes, completed - received)
            received = completed
            for job in list(jobs):
                loop.call_soon_threadsafe(job.progress, status, digest, total or hub_file.size_bytes, completed)

        def download(token: CancelToken) -> Path:
            return self._hub.download(hub_file, directory, report, token)

        path = await self._executor.run(download)
        for job in jobs:
            job.progress(status, digest, hub_file.size_bytes, hub_file.size_bytes)
            job.add({"status": "verifying sha256 digest"})
        actual = await self._executor.run(lambda token: ModelStore.hash_file(path, token))
        if actual != hub_file.sha256:
            shutil.rmtree(directory, ignore_errors=True)
            raise DownloadFailed(
                f"digest mismatch, file must be downloaded again: want sha256:{hub_file.sha256}, got sha256:{actual}"
            )
        try:
            facts = await asyncio.to_thread(read_gguf_facts, path)  # only a GGUF becomes a blob
            # A model must load in llama.cpp; a task adapter has no vocabulary of its own, and is
            # checked against its model as the manifest is written (daemon.adapters).
            if facts.metadata.get("general.type") != "adapter":
                await self._executor.run(lambda _token: self._store.check_loadable(path, hub_file.filename))
        except InvalidModelFile:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        await asyncio.to_thread(self._store.adopt_blob, path, actual)
        shutil.rmtree(directory, ignore_errors=True)
