"""Store and memory faults under load against a live daemon; print a report.

    .venv/bin/python -m tests.reliability.store_faults [--clients 32]

32 clients send mixed /api/embed inputs (short queries, passages, batches) to a stored model while
one fault strikes at a time, each against a daemon of its own:
  1. Hub transfers cut in the middle (a local server speaking the Hub's protocol, tests/hub_server.py,
     at HF_ENDPOINT): once (the daemon resumes with a Range request and the pull succeeds), then on
     every attempt (the pull fails with a 502; its partial file stays in downloads/, as the README
     documents, and the next pull resumes from it);
  2. the disk filling (EMBERD_HOME on a small tmpfs): a file bigger than the free space is refused
     before a byte is fetched, then another writer fills the disk in the middle of a transfer (the
     pull must answer 507 and leave no partial file); space is freed and the same pull succeeds,
     without a restart;
  3. memory pressure (the daemon in a cgroup v1 child): during the load the limit is lowered so one
     model fits and not two, and the clients alternate between two models until the daemon has
     evicted one for the other 6 times; the OOM killer must never strike.
Every request must get an answer: 200, or an error the README documents, with a message. The store
must never hold a partial file under a name: blobs/ holds exactly the blobs manifests name, tmp/ is
empty, and downloads/ (the staging area) holds a partial file only for a pull that broke off and is
meant to resume. Needs root (mount, cgroups) and cgroup v1, as CI has.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import logging
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from daemon.convert import convert_hf_directory
from daemon.errors import UnknownModel
from daemon.gguf_info import read_gguf_facts
from daemon.memory import ModelShape, held_after_bytes
from daemon.pulls import DISK_MARGIN_BYTES
from daemon.store import ModelStore
from tests.hub_server import FakeHub
from tests.live import Daemon, read_metrics, running_daemon, wait_for
from tests.test_memory import (
    V1_MEMORY,
    cgroup_working_set,
    child_memory_cgroup,
    drop_from_page_cache,
    in_cgroup,
    oom_kills,
)
from tests.tiny_models import make_tiny_bert_dir

MIB = 1 << 20
REPO = "owner/big-embed-GGUF"
PASSAGE = "the sky is blue because the air scatters blue light more than red light, why is grass green? " * 2
# The store's tmpfs: the tiny model and an 8 MB pull fit beside the daemon's 64 MiB margin, 48 MiB does not.
TMPFS_MIB = 96
HUGE_MIB = 48
# A link slow enough (8 MB in 2 s) that the disk fills while the transfer is under way.
SLOW_LINK_BYTES_PER_S = 4 * MIB
# The clients alternate between two models under the lowered limit until this many evictions (or the deadline).
MEMORY_FAULT_EVICTIONS = 6
MEMORY_FAULT_DEADLINE_S = 90.0
# Answers the README documents for /api/embed under these faults (anything else 5xx is unexplained).
BUSY = ("503 server busy",)
MEMORY_REFUSALS = ("503 ", "507 ")  # MemoryBusy (waited load_timeout) and InsufficientMemory, with numbers


# -- the load --------------------------------------------------------------------------------------


def request_body(rng: random.Random, model: str) -> dict[str, object]:
    roll = rng.random()
    if roll < 0.6:
        return {"model": model, "input": f"why is the sky blue? {rng.randint(0, 999)}"}
    if roll < 0.9:
        return {"model": model, "input": [PASSAGE] * rng.randint(2, 16)}
    return {"model": model, "input": [PASSAGE] * 64}


def post(url: str, body: dict[str, Any], timeout_s: float = 60.0) -> tuple[int, str]:
    """(status, the error message or ""); (0, the exception's name) when no answer came at all."""
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            response.read()
            return response.status, ""
    except urllib.error.HTTPError as error:
        try:
            message = json.loads(error.read() or b"{}").get("error", "")
        except ValueError:
            message = "(a body that is not JSON)"
        return error.code, str(message)
    except OSError as error:
        return 0, type(error).__name__


def label(status: int, message: str) -> str:
    if status == 0:
        return f"lost ({message})"
    return f"{status} {message.split(':')[0][:60]}".strip()


class Load:
    """Client threads sending /api/embed until the block ends; each request counted when sent and
    when answered. `model_of(turn)` is the model of a client's turn-th request."""

    def __init__(self, url: str, clients: int, model_of: Callable[[int], str]) -> None:
        self.url = url
        self.model_of = model_of
        self.sent = 0
        self.outcomes: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(seed,)) for seed in range(clients)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()

    def answered(self) -> int:
        with self._lock:
            return sum(count for outcome, count in self.outcomes.items() if not outcome.startswith("lost"))

    def _client(self, seed: int) -> None:
        rng = random.Random(seed)
        turn = seed  # half the clients start on each model when there are two
        while not self._stop.is_set():
            body = request_body(rng, self.model_of(turn))
            turn += 1
            with self._lock:
                self.sent += 1
            outcome = label(*post(self.url + "/api/embed", body))
            with self._lock:
                self.outcomes[outcome] += 1


# -- the report ------------------------------------------------------------------------------------


@dataclass
class FaultReport:
    title: str
    explained_5xx: tuple[str, ...]
    checks: list[tuple[bool, str]] = field(default_factory=list)
    sent: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    pulls: Counter[str] = field(default_factory=Counter)  # the answers to this fault's pulls
    stray: list[str] = field(default_factory=list)
    partials: list[str] = field(default_factory=list)
    recovered: bool = False
    before: Usage | None = None
    after: Usage | None = None
    tracebacks: int = 0
    notes: list[str] = field(default_factory=list)

    def check(self, ok: bool, text: str) -> bool:
        self.checks.append((ok, text))
        return ok

    @property
    def lost(self) -> int:
        answered = sum(count for outcome, count in self.outcomes.items() if not outcome.startswith("lost"))
        return self.sent - answered

    @property
    def unexplained(self) -> int:
        return sum(
            count
            for outcome, count in self.outcomes.items()
            if outcome[0] == "5" and not outcome.startswith(self.explained_5xx)
        )

    @property
    def ok(self) -> bool:
        return (
            all(ok for ok, _text in self.checks)
            and self.sent > 0
            and self.lost == 0
            and self.unexplained == 0
            and not self.stray
            and self.recovered
            and self.tracebacks == 0
        )

    def print(self) -> None:
        print(f"\n== {self.title} ==")
        for note in self.notes:
            print(f"  {note}")
        for ok, text in self.checks:
            print(f"  {'ok  ' if ok else 'FAIL'} {text}")
        print(f"  requests sent: {self.sent}")
        print("  answers: " + ", ".join(f"{outcome}: {count}" for outcome, count in sorted(self.outcomes.items())))
        print(f"  lost (no answer): {self.lost}; unexplained 5xx: {self.unexplained}")
        if self.pulls:
            print("  pulls: " + ", ".join(f"{outcome}: {count}" for outcome, count in sorted(self.pulls.items())))
        print(f"  files left in the store: {', '.join(self.stray) or 'none'}")
        print(f"  resumable partials in downloads/: {', '.join(self.partials) or 'none'}")
        print(f"  recovered by itself: {'yes' if self.recovered else 'no'}")
        print(f"  daemon before: {self.before}")
        print(f"  daemon after:  {self.after}")
        print(f"  tracebacks in the daemon's log: {self.tracebacks}")
        print(f"  fault: {'pass' if self.ok else 'FAIL'}")


@dataclass(frozen=True)
class Usage:
    rss_mib: float  # the daemon process alone
    runners: int
    runners_rss_mib: float
    open_files: int  # the daemon's

    def __str__(self) -> str:
        return (
            f"RSS {self.rss_mib:.0f} MiB, {self.open_files} open files; {self.runners} runner(s),"
            f" {self.runners_rss_mib:.0f} MiB RSS"
        )


def usage(pid: int) -> Usage:
    daemon = psutil.Process(pid)
    runners = daemon.children(recursive=True)
    return Usage(
        daemon.memory_info().rss / MIB, len(runners), sum(p.memory_info().rss for p in runners) / MIB, daemon.num_fds()
    )


def count_tracebacks(log: str) -> int:
    return sum("Traceback" in line or "unexpected error" in line for line in log.splitlines())


def store_state(home: Path) -> tuple[list[str], list[str]]:
    """(what is out of place in the store: blobs no manifest names, manifests naming a missing blob,
    anything in tmp/; the files in downloads/, the staging area for resumable partials). Read
    without ModelStore.open, which would clean up."""
    store = ModelStore(home)
    named = {model.blob_path.name for model in store.list()}
    blobs = {path.name for path in store.blobs_dir.iterdir()}
    stray = [f"models/blobs/{name}" for name in sorted(blobs - named)]
    stray += [f"missing models/blobs/{name}" for name in sorted(named - blobs)]
    stray += [str(path.relative_to(home)) for path in sorted(store.tmp_dir.rglob("*"))]
    partials = [
        f"{path.relative_to(home)} ({path.stat().st_size} bytes)" if path.is_file() else f"{path.relative_to(home)}/"
        for path in sorted(store.downloads_dir.rglob("*"))
    ]
    return stray, partials


def sha_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def pull(url: str, name: str, report: FaultReport) -> tuple[int, str]:
    status, message = post(url + "/api/pull", {"model": name, "stream": False}, timeout_s=120)
    report.pulls[label(status, message.removeprefix(f"hf.co/{REPO}: "))] += 1
    return status, message


def settle(daemon: Daemon, pulled: list[str]) -> None:
    """Unload the models the fault pulled (Ollama's idiom), so the usage after compares with the
    usage before: the stored model's runner alone."""
    for name in pulled:
        post(daemon.url + "/api/generate", {"model": name, "keep_alive": 0})
    wait_for(lambda: len(daemon.runner_pids()) == 1, 30)


def embeds(url: str, model: str) -> bool:
    return post(url + "/api/embed", {"model": model, "input": "why is the sky blue?"})[0] == 200


def blob_is(home: Path, name: str, data: bytes) -> bool:
    """The model `name` is in the store, and its blob holds exactly these bytes."""
    try:
        return ModelStore(home).get(name).blob_path.read_bytes() == data
    except (UnknownModel, OSError):
        return False


class CutTransfers(set[str]):
    """FakeHub.cut_next that breaks off each sha256's next `times` transfers, not only the next one."""

    def __init__(self, times: dict[str, int]) -> None:
        super().__init__(times)
        self._left = dict(times)

    def discard(self, sha256: object) -> None:
        assert isinstance(sha256, str)
        self._left[sha256] = self._left.get(sha256, 1) - 1
        if self._left[sha256] <= 0:
            super().discard(sha256)


# -- models and places -----------------------------------------------------------------------------


def tiny_gguf(workdir: Path, seed: int) -> Path:
    path = workdir / f"tiny-{seed}.gguf"
    convert_hf_directory(make_tiny_bert_dir(workdir / f"tiny-{seed}", seed=seed), path, "f32", "tiny")
    return path


def big_gguf(workdir: Path, seed: int) -> bytes:
    """A random-weight BERT of about 8 MB: a transfer long enough to break off in the middle."""
    directory = make_tiny_bert_dir(workdir / f"big-{seed}", hidden=256, layers=4, context=512, seed=seed)
    path = workdir / f"big-{seed}.gguf"
    convert_hf_directory(directory, path, "f32", f"big-{seed}")
    return path.read_bytes()


def new_home(home: Path, models: dict[str, Path]) -> Path:
    store = ModelStore(home)
    store.open()
    for name, path in models.items():
        drop_from_page_cache(store.create(name, path).blob_path)  # a runner, not this script, reads it
    return home


@contextmanager
def tmpfs(directory: Path, size_mib: int) -> Iterator[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "tmpfs", str(directory)], check=True)
    try:
        yield directory
    finally:
        if subprocess.run(["umount", str(directory)]).returncode != 0:
            subprocess.run(["umount", "--lazy", str(directory)], check=True)  # detached once nothing uses it


def fill_disk(path: Path) -> int:
    """Another writer takes every free byte of the filesystem: bytes written until ENOSPC."""
    written = 0
    chunk = b"\xa5" * MIB
    with path.open("wb", buffering=0) as file:
        try:
            while True:
                written += file.write(chunk) or 0
        except OSError as error:
            if error.errno != errno.ENOSPC:
                raise
    return written


def reached(condition: Callable[[], bool], timeout_s: float, every_s: float = 0.2) -> bool:
    """Poll a condition (a /metrics scrape, say: not 50 a second) until it holds or the deadline passes."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(every_s)
    return True


def evictions(url: str) -> int:
    return int(
        sum(
            value
            for (sample, labels), value in read_metrics(url).items()
            if sample == "emberd_model_unloads_total" and ("reason", "evicted") in labels
        )
    )


# -- the faults ------------------------------------------------------------------------------------


def hub_cut(workdir: Path, clients: int, hub: FakeHub, files: dict[str, bytes]) -> FaultReport:
    report = FaultReport("1. Hub transfer cut in the middle", BUSY)
    home = new_home(workdir / "cut" / "home", {"tiny": tiny_gguf(workdir, 0)})
    once, every = files["big-embed-F16.gguf"], files["big-embed-Q8_0.gguf"]
    with running_daemon(home, {}, {"HF_ENDPOINT": hub.url, "HF_HOME": str(workdir / "hf")}) as daemon:
        url = daemon.url
        assert embeds(url, "tiny")
        report.before = usage(daemon.process.pid)
        with Load(url, clients, lambda _turn: "tiny") as load:
            wait_for(lambda: load.answered() >= clients, 60)  # the load is on

            # A transfer cut once, halfway: the daemon resumes it (a Range request), the pull succeeds.
            hub.cut_next.add(sha_of(once))
            status, message = pull(url, f"hf.co/{REPO}:F16", report)
            starts = hub.range_starts.get(sha_of(once), [])
            report.check(
                status == 200 and len(starts) == 2 and starts[0] == 0 and 0 < starts[1] <= len(once) // 2,
                f"cut once at byte {len(once) // 2:,} of {len(once):,}: the pull answered {status} {message}"
                f"{'success' if status == 200 else ''}; transfers started at bytes {starts} (the daemon keeps"
                " whole 1 MiB chunks and resumes after the last it wrote)",
            )
            stray, partials = store_state(home)
            report.check(
                not stray and not partials and blob_is(home, f"hf.co/{REPO}:F16", once),
                "the blob holds exactly the Hub's bytes; nothing else in blobs/, tmp/ or downloads/",
            )
            report.check(embeds(url, f"hf.co/{REPO}:F16"), "the pulled model embeds (200)")

            # Every attempt cut: the pull fails with a clear answer; the partial stays in downloads/.
            hub.cut_next = CutTransfers({sha_of(every): 4})
            status, message = pull(url, f"hf.co/{REPO}:Q8_0", report)
            stray, partials = store_state(home)
            staged = sorted(workdir.glob("cut/home/downloads/*/*.partial"))
            kept = staged[0].stat().st_size if staged else 0
            report.check(
                status == 502 and "download failed" in message,
                f"cut on all 4 attempts: the pull answered {status} {message!r}",
            )
            report.check(
                not stray and len(staged) == 1 and len(every) // 2 < kept < len(every),
                f"no blob, no manifest; downloads/ keeps the partial ({kept:,} of {len(every):,} bytes) to resume"
                " from (README: partial files stay in EMBERD_HOME/downloads/)",
            )
            # A second pull then resumes from it and succeeds.
            status, message = pull(url, f"hf.co/{REPO}:Q8_0", report)
            resumed_from = hub.range_starts.get(sha_of(every), [-1])[-1]
            report.stray, report.partials = store_state(home)
            report.recovered = report.check(
                status == 200
                and resumed_from == kept
                and blob_is(home, f"hf.co/{REPO}:Q8_0", every)
                and embeds(url, f"hf.co/{REPO}:Q8_0")
                and not report.partials,
                f"the next pull answered {status} {message}{'success' if status == 200 else ''}, resuming"
                f" from byte {resumed_from:,}; the model embeds; downloads/ is empty again",
            )
        report.sent, report.outcomes = load.sent, load.outcomes
        report.check(embeds(url, "tiny"), "the stored model answers after the load")
        settle(daemon, [f"hf.co/{REPO}:F16", f"hf.co/{REPO}:Q8_0"])
        report.after = usage(daemon.process.pid)
        report.tracebacks = count_tracebacks(daemon.log_text())
    return report


def disk_full(workdir: Path, clients: int, hub: FakeHub, files: dict[str, bytes]) -> FaultReport:
    report = FaultReport(f"2. The disk filling during a pull (EMBERD_HOME on a {TMPFS_MIB} MiB tmpfs)", BUSY)
    pulled, huge = files["big-embed-F16.gguf"], files["big-embed-BF16.gguf"]
    tiny = tiny_gguf(workdir, 0)
    with tmpfs(workdir / "disk" / "home", TMPFS_MIB) as home:  # the daemon's log goes to its parent
        new_home(home, {"tiny": tiny})
        environ = {"HF_ENDPOINT": hub.url, "HF_HOME": str(workdir / "hf")}
        with running_daemon(home, {}, environ) as daemon:
            url = daemon.url
            assert embeds(url, "tiny")
            report.before = usage(daemon.process.pid)
            free_mib = os.statvfs(home).f_bavail * os.statvfs(home).f_frsize / MIB
            report.notes.append(
                f"{free_mib:.0f} MiB free with the tiny model stored; the daemon wants a file's size plus"
                f" {DISK_MARGIN_BYTES // MIB} MiB free before it downloads"
            )
            with Load(url, clients, lambda _turn: "tiny") as load:
                wait_for(lambda: load.answered() >= clients, 60)

                # A file that cannot fit: refused before a byte is fetched.
                status, message = pull(url, f"hf.co/{REPO}:BF16", report)
                stray, partials = store_state(home)
                report.check(
                    status == 507 and "not enough disk space" in message and hub.downloads[sha_of(huge)] == 0,
                    f"a {len(huge) // MIB} MiB file: {status} {message!r}, {hub.downloads[sha_of(huge)]} bytes fetched",
                )
                report.check(not stray and not partials, "nothing left in blobs/, tmp/ or downloads/")

                # Another writer fills the disk while an 8 MB transfer is under way.
                hub.throttle_bytes_per_s[sha_of(pulled)] = SLOW_LINK_BYTES_PER_S
                result: list[tuple[int, str]] = []
                puller = threading.Thread(target=lambda: result.append(pull(url, f"hf.co/{REPO}:F16", report)))
                puller.start()
                partial = home / "downloads" / sha_of(pulled) / "big-embed-F16.gguf.partial"
                wait_for(lambda: partial.exists() and partial.stat().st_size >= MIB, 60)
                filler = home / "another-writer.bin"
                filled = fill_disk(filler)
                puller.join()
                status, message = result[0]
                stray, partials = store_state(home)
                report.check(
                    status == 507 and message.startswith("no space left on device") and "removed" in message,
                    f"the disk filled ({filled / MIB:.0f} MiB by another writer) mid-transfer: {status} {message!r}",
                )
                report.check(
                    not stray and not partials,
                    f"no partial file left: blobs/, tmp/ and downloads/ clean ({', '.join(stray + partials) or 'ok'})",
                )

                # Space comes back: the same pull succeeds, without a restart.
                filler.unlink()
                del hub.throttle_bytes_per_s[sha_of(pulled)]
                status, message = pull(url, f"hf.co/{REPO}:F16", report)
                report.stray, report.partials = store_state(home)
                report.recovered = report.check(
                    status == 200
                    and blob_is(home, f"hf.co/{REPO}:F16", pulled)
                    and embeds(url, f"hf.co/{REPO}:F16")
                    and not report.partials,
                    f"space freed: the pull answered {status} {message}{'success' if status == 200 else ''};"
                    " the blob holds the Hub's bytes and the model embeds",
                )
            report.sent, report.outcomes = load.sent, load.outcomes
            report.check(embeds(url, "tiny"), "the stored model answers after the load")
            settle(daemon, [f"hf.co/{REPO}:F16"])
            report.after = usage(daemon.process.pid)
            report.tracebacks = count_tracebacks(daemon.log_text())
    return report


def memory_pressure(workdir: Path, clients: int) -> FaultReport:
    report = FaultReport("3. Memory pressure forcing evictions (a cgroup v1 child)", MEMORY_REFUSALS)
    home = new_home(workdir / "memory" / "home", {"tiny": tiny_gguf(workdir, 0), "tiny2": tiny_gguf(workdir, 1)})
    store = ModelStore(home)
    needs = [
        held_after_bytes(ModelShape.of(read_gguf_facts(model.blob_path), model.size_bytes), 512, 512)
        for model in (store.get("tiny"), store.get("tiny2"))
    ]
    alternate = threading.Event()

    def model_of(turn: int) -> str:
        return ("tiny", "tiny2")[turn % 2] if alternate.is_set() else "tiny"

    environ = {"EMBERD_LOAD_TIMEOUT": "20s"}
    with (
        child_memory_cgroup("emberd-store-faults-") as cgroup,
        running_daemon(home, {}, environ, prefix=in_cgroup(cgroup)) as daemon,
    ):
        url = daemon.url
        assert embeds(url, "tiny")
        report.before = usage(daemon.process.pid)
        with Load(url, clients, model_of) as load:
            wait_for(lambda: load.answered() >= clients, 60)
            # The fault: a limit that holds the daemon under this load and one model, not two.
            working = cgroup_working_set(cgroup)
            limit = working + min(needs) // 2
            (cgroup / "memory.limit_in_bytes").write_text(str(limit))
            report.notes.append(
                f"limit lowered to {limit / MIB:.0f} MiB under load ({working / MIB:.0f} MiB in use with one"
                f" model loaded; a model needs about {max(needs) / MIB:.0f} MiB); the clients then alternate"
            )
            alternate.set()
            reached(lambda: evictions(url) >= MEMORY_FAULT_EVICTIONS, MEMORY_FAULT_DEADLINE_S)
        report.sent, report.outcomes = load.sent, load.outcomes
        evicted = evictions(url)
        report.check(
            evicted >= MEMORY_FAULT_EVICTIONS,
            f"models evicted for each other: {evicted} evictions (/metrics), {MEMORY_FAULT_EVICTIONS} wanted",
        )
        report.check(oom_kills(cgroup) == 0, f"memory.oom_control oom_kill: {oom_kills(cgroup)}")
        report.check("killed" not in daemon.log_text(), "no runner killed (the daemon's log)")
        report.recovered = report.check(
            embeds(url, "tiny") and embeds(url, "tiny2") and embeds(url, "tiny"),
            "after the load both models answer in turn (200)",
        )
        with urllib.request.urlopen(url + "/api/ps", timeout=10) as response:
            loaded = [model["name"] for model in json.loads(response.read())["models"]]
        report.check(len(loaded) == 1, f"one model loaded at a time under the limit: /api/ps {loaded}")
        report.stray, report.partials = store_state(home)
        report.after = usage(daemon.process.pid)
        report.tracebacks = count_tracebacks(daemon.log_text())
    return report


def run(clients: int) -> int:
    if os.geteuid() != 0 or not V1_MEMORY.is_dir():
        print("store_faults needs root (mount, cgroups) and cgroup v1", file=sys.stderr)
        return 1
    started_s = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="emberd-store-faults-"))
    files = {
        "big-embed-F16.gguf": big_gguf(workdir, 0),
        "big-embed-Q8_0.gguf": big_gguf(workdir, 1),
        # Never fetched: its size alone must be refused (random bytes do no harm).
        "big-embed-BF16.gguf": random.Random(0).randbytes(HUGE_MIB * MIB),
    }
    hub = FakeHub()
    hub.add_repo(REPO, files)
    # The fake Hub's own log: a transfer the daemon drops (its disk is full) is a traceback there.
    logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)
    hub.start()
    try:
        reports = [hub_cut(workdir, clients, hub, files), disk_full(workdir, clients, hub, files)]
    finally:
        hub.stop()
    reports.append(memory_pressure(workdir, clients))
    for report in reports:
        report.print()
    ok = all(report.ok for report in reports)
    print(f"\n{clients} clients, 3 faults, {time.monotonic() - started_s:.0f} s")
    if ok:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"the stores and the daemons' logs are kept in {workdir}")
    print("RESULT: " + ("pass" if ok else "FAIL"))
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=32)
    args = parser.parse_args()
    return run(args.clients)


if __name__ == "__main__":
    sys.exit(main())
