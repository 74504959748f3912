"""Bounds on what others send the daemon: a runner's stderr, a GGUF header, the Hub's bytes and its
failures; and what the scheduler counts for a runner's quick lane before it is used."""

from __future__ import annotations

import asyncio
import hashlib
import os
import struct
import sys
from pathlib import Path
from typing import Any

import pytest

from daemon import gguf_info
from daemon.errors import DownloadFailed, InvalidModelFile, ModelLoadFailed
from daemon.gguf_info import MAX_HEADER_BYTES, read_gguf_facts
from daemon.hub import RETRY_MAX_DELAY_S, HubClient, HubFile, retry_delay_s
from daemon.jobs import CancelToken
from daemon.runner.client import RunnerProcess, StderrLines
from tests.conftest import MakeClient, scheduler_of
from tests.hub_server import FakeHub
from tests.test_hostile_files import ARCH, gguf_string, header, kv_string

# -- a runner's stderr ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("chunks", "expected"),
    [
        ([b"one\ntwo\n"], ["one", "two"]),
        ([b"on", b"e\ntw", b"o"], ["one", "two"]),  # a line across chunks; the last without a line end
        ([b"x" * 10 + b"\nok\n"], ["x" * 4 + " [cut]", "ok"]),
        ([b"xxx", b"xxx", b"xxx\nend\n"], ["xxxx [cut]", "end"]),  # cut across chunks
        ([b"\xff\xfeok\n"], ["\ufffd\ufffdok"]),
    ],
)
def test_stderr_lines_are_split_and_cut(chunks: list[bytes], expected: list[str]) -> None:
    lines = StderrLines(max_bytes=4)
    got = [text for chunk in chunks for text in lines.feed(chunk)] + lines.finish()
    assert got == expected


# Writes a 2 MiB line (twice the stream's limit), then 4 MiB more in short lines (more than a pipe and the stream
# holds: a runner whose stderr nobody reads blocks there), then says why it exits.
_TALKATIVE_CHILD = """
import sys
sys.stderr.write("x" * (2 << 20) + "\\n")
for index in range(65536):
    sys.stderr.write(f"line {index:058d}\\n")
sys.stderr.write("last words\\n")
sys.stderr.flush()
sys.exit(3)
"""


async def test_a_runner_line_longer_than_the_stream_limit_does_not_stop_its_stderr_being_read() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _TALKATIVE_CHILD,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        limit=1 << 20,  # as RunnerProcess.start sets it
    )
    runner = RunnerProcess(process, "talkative")
    try:
        async with asyncio.timeout(60):  # a deadline, not a wait: the child exits as soon as it is read
            await runner.exited.wait()
    except TimeoutError:
        process.kill()  # (not runner.kill(): waiting for a process waits for its pipes to close)
        raise AssertionError("the child blocked writing to its stderr: nobody read it") from None
    with pytest.raises(ModelLoadFailed, match=r"runner exited with status 3: last words$"):
        await runner._ready


# -- the GGUF header's total ------------------------------------------------------------------------


def test_a_gguf_header_larger_than_its_bound_is_refused_though_each_item_is_within_its_own(
    tmp_path: Path,
) -> None:
    one_mib = "x" * (1 << 20)  # the longest string a header may hold
    keys = [kv_string(f"general.comment{index}", one_mib) for index in range(MAX_HEADER_BYTES >> 20)]
    path = tmp_path / "large.gguf"
    path.write_bytes(header([ARCH, *keys]))
    with pytest.raises(InvalidModelFile, match="GGUF header of more than 64 MiB"):
        read_gguf_facts(path)
    # One key less is a valid (if odd) header.
    path.write_bytes(header([ARCH, *keys[:-1]]))
    assert read_gguf_facts(path).architecture == "bert"


def test_array_items_count_towards_the_headers_bound(tmp_path: Path) -> None:
    # A string array's item of 65 MiB, skipped, not read: the bound refuses it without reading it.
    array = gguf_string("general.tags") + struct.pack("<IIQQ", 9, 8, 1, 65 << 20)
    path = tmp_path / "long-items.gguf"
    path.write_bytes(header([ARCH, array]))
    with pytest.raises(InvalidModelFile, match="GGUF header of more than 64 MiB"):
        read_gguf_facts(path)


# -- /api/show reads a header once ------------------------------------------------------------------


async def test_show_reads_a_models_header_again_only_when_its_file_changes(
    make_client: MakeClient, tiny_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = await make_client({"tiny": tiny_gguf})
    reads: list[Path] = []
    real_cursor = gguf_info._Cursor

    def counting_cursor(handle: Any, path: Path) -> Any:
        reads.append(path)
        return real_cursor(handle, path)

    monkeypatch.setattr(gguf_info, "_Cursor", counting_cursor)
    shown = []
    for _ in range(3):
        response = await client.post("/api/show", json={"model": "tiny"})
        assert response.status == 200
        shown.append(await response.json())
    assert len(reads) == 1
    assert shown[0] == shown[2]
    blob = reads[0]
    stat = blob.stat()
    os.utime(blob, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # the file changed
    response = await client.post("/api/show", json={"model": "tiny"})
    assert response.status == 200
    assert reads == [blob, blob]


# -- the Hub ----------------------------------------------------------------------------------------


def test_a_transfer_never_writes_more_than_the_file_the_hub_announced(tmp_path: Path, fake_hub: FakeHub) -> None:
    from daemon import hub_http

    data = b"y" * 300_000
    fake_hub.add_repo("owner/endless", {"endless.gguf": data})
    url = f"{fake_hub.cdn_url}/cdn/{hashlib.sha256(data).hexdigest()}"
    partial = tmp_path / "endless.gguf.partial"
    with pytest.raises(DownloadFailed, match="the Hub sent more than the 1000 bytes expected"):
        hub_http.transfer(url, partial, 1000, lambda _done, _total: None, CancelToken())
    assert partial.read_bytes() == data[:1000]


@pytest.mark.parametrize(
    ("failed_attempts", "draw", "expected_s"),
    [
        (1, 0.0, 0.0),
        (1, 0.5, 0.5),  # the first wait: up to 1 s
        (2, 0.5, 1.0),
        (3, 0.5, 2.0),
        (3, 0.999, 3.996),
        (5, 1.0, 16.0),
        (6, 1.0, 30.0),  # capped
        (200, 0.5, 15.0),  # however many failed
    ],
)
def test_retry_delay_doubles_with_full_jitter_up_to_a_cap(failed_attempts: int, draw: float, expected_s: float) -> None:
    assert retry_delay_s(failed_attempts, draw) == pytest.approx(expected_s)
    assert RETRY_MAX_DELAY_S == 30.0


class RecordingToken(CancelToken):
    """A token that records the backoff waits instead of waiting."""

    def __init__(self) -> None:
        super().__init__()
        self.waits_s: list[float] = []

    def wait(self, timeout_s: float) -> None:
        self.waits_s.append(timeout_s)
        self.check()


def test_a_download_that_breaks_off_waits_before_each_new_attempt(
    tmp_path: Path, fake_hub: FakeHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    from daemon import hub_http

    data = b"z" * 4096
    fake_hub.add_repo("owner/flaky", {"flaky.gguf": data})
    sha256 = hashlib.sha256(data).hexdigest()
    real_transfer = hub_http.transfer
    attempts = []

    def breaking_transfer(*args: Any) -> None:
        attempts.append(args)
        if len(attempts) < 3:
            raise hub_http.TransportError("connection reset")
        real_transfer(*args)

    monkeypatch.setattr(hub_http, "transfer", breaking_transfer)
    monkeypatch.setattr("random.random", lambda: 0.5)
    hub = HubClient(fake_hub.url, offline=False, aliases={})
    token = RecordingToken()
    hub_file = HubFile("owner/flaky", "flaky.gguf", fake_hub.repos["owner/flaky"].commit, sha256, len(data))
    path = hub.download(hub_file, tmp_path, lambda _done, _total: None, token)
    assert path.read_bytes() == data
    assert token.waits_s == [0.5, 1.0]  # half of 1 s, then of 2 s


# -- the quick lane is counted from the start -------------------------------------------------------


async def test_a_runners_unused_quick_lane_is_counted_before_its_first_decode(
    make_client: MakeClient, minilm_gguf: Path
) -> None:
    client = await make_client({"all-minilm": minilm_gguf})
    response = await client.post("/api/embed", json={"model": "all-minilm", "input": "why is the sky blue?"})
    assert response.status == 200  # decoded by the main context: the quick lane opens beside a long decode
    [entry] = scheduler_of(client).loaded()
    entry.refresh()
    assert entry.runner.unused_quick_lane_tokens == 64
    # With no growth set aside, it counts what it holds and the 64-token quick lane at its peak:
    # 64 rows of 4 x (30,522 + 384) bytes and a compute buffer of 2 x 64 x 64 + 4 x 64 x 16 + 4 x 64 x 2,688.
    assert entry.counted_bytes_for(entry.measured.largest_decode_tokens) - entry.measured.held_bytes == 8_612_352
