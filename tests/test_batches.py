"""OpenAI's Batch API for embeddings, driven by the real `openai` client against a live daemon: a
file uploaded, a batch run in the background, its output and error files read back; a batch
survives kill -9 of the whole daemon and answers every custom_id exactly once."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest

from daemon.store import ModelStore
from tests.live import Daemon, running_daemon, wait_for

BATCH_DEADLINE_S = 120.0


def request_line(custom_id: str, body: dict[str, Any], url: str = "/v1/embeddings") -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


def write_jsonl(path: Path, lines: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


@pytest.fixture
def home(tmp_path: Path, tiny_gguf: Path) -> Path:
    home = tmp_path / "home"
    store = ModelStore(home)
    store.open()
    store.create("tiny", tiny_gguf)
    return home


@pytest.fixture
def daemon(home: Path) -> Iterator[Daemon]:
    with running_daemon(home, {}, {}) as daemon:
        yield daemon


def client_of(daemon: Daemon) -> openai.OpenAI:
    return openai.OpenAI(base_url=daemon.url + "/v1", api_key="unused", max_retries=0)


def finished(client: openai.OpenAI, batch_id: str) -> Any:
    """The batch once it is in a final status (polled, within the deadline)."""
    final = {"completed", "failed", "expired", "cancelled"}
    state: dict[str, Any] = {}

    def done() -> bool:
        state["batch"] = client.batches.retrieve(batch_id)
        return state["batch"].status in final

    wait_for(done, BATCH_DEADLINE_S)
    return state["batch"]


def lines_of(client: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines()]


def direct_vector(daemon: Daemon, text: str) -> list[float]:
    answer = httpx.post(f"{daemon.url}/v1/embeddings", json={"model": "tiny", "input": text}, timeout=60).json()
    return list(answer["data"][0]["embedding"])


def test_the_openai_client_runs_a_batch_end_to_end(daemon: Daemon, tmp_path: Path) -> None:
    texts = [f"passage number {index} about {'cats' if index % 2 else 'rivers'}" for index in range(150)]
    lines = [request_line(f"ok-{index}", {"model": "tiny", "input": text}) for index, text in enumerate(texts)]
    lines += [
        request_line("no-input", {"model": "tiny"}),  # a bad body: the error file
        request_line("bad-type", {"model": "tiny", "input": 5}),
        request_line("other-endpoint", {"model": "tiny", "input": "x"}, url="/v1/chat/completions"),
        request_line("no-model", {"model": "nothing-here", "input": "x"}),
        request_line("two", {"model": "tiny", "input": ["first", "second"], "encoding_format": "base64"}),
    ]
    client = client_of(daemon)
    uploaded = client.files.create(file=write_jsonl(tmp_path / "input.jsonl", lines), purpose="batch")
    assert uploaded.purpose == "batch" and uploaded.bytes == (tmp_path / "input.jsonl").stat().st_size
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h", metadata={"job": "test"}
    )
    assert batch.status == "validating" and batch.metadata == {"job": "test"}
    done = finished(client, batch.id)
    assert done.status == "completed", done
    assert done.request_counts is not None
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (155, 151, 4)
    output = lines_of(client, done.output_file_id)
    errors = lines_of(client, done.error_file_id)
    assert sorted(line["custom_id"] for line in output) == sorted([f"ok-{i}" for i in range(150)] + ["two"])
    by_id = {line["custom_id"]: line for line in output}
    for index in (0, 77, 149):  # each vector is /v1/embeddings' own for that input
        response = by_id[f"ok-{index}"]["response"]
        assert response["status_code"] == 200
        batched = np.array(response["body"]["data"][0]["embedding"])
        # Decoded in another batch shape than the direct request: equal to float rounding.
        assert float(np.dot(batched, direct_vector(daemon, texts[index]))) >= 0.99999
    two = by_id["two"]["response"]["body"]["data"]
    assert len(two) == 2 and all(isinstance(item["embedding"], str) for item in two)  # base64, as asked
    statuses = {line["custom_id"]: line["response"]["status_code"] for line in errors}
    assert statuses == {"no-input": 400, "bad-type": 400, "other-endpoint": 400, "no-model": 404}
    no_model = next(line for line in errors if line["custom_id"] == "no-model")
    assert no_model["response"]["body"]["error"]["type"] == "not_found_error"  # OpenAI's error body
    listed = client.batches.list()
    assert [item.id for item in listed.data] == [batch.id]


def test_duplicate_custom_ids_fail_validation(daemon: Daemon, tmp_path: Path) -> None:
    lines = [
        request_line("same", {"model": "tiny", "input": "a"}),
        request_line("same", {"model": "tiny", "input": "b"}),
    ]
    client = client_of(daemon)
    uploaded = client.files.create(file=write_jsonl(tmp_path / "dup.jsonl", lines), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h")
    done = finished(client, batch.id)
    assert done.status == "failed" and done.errors is not None and done.errors.data is not None
    assert [(error.code, error.line) for error in done.errors.data] == [("duplicate_custom_id", 2)]
    assert done.output_file_id is None


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"completion_window": "1h"}, "completion_window must be 24h"),
        ({"endpoint": "/v1/chat/completions"}, "endpoint must be /v1/embeddings"),
        ({"input_file_id": "file-nothing"}, "no file 'file-nothing'"),
    ],
)
def test_a_batch_openai_would_refuse_is_a_400_or_404(
    daemon: Daemon, tmp_path: Path, fields: dict[str, str], message: str
) -> None:
    client = client_of(daemon)
    lines = [request_line("a", {"model": "tiny", "input": "a"})]
    uploaded = client.files.create(file=write_jsonl(tmp_path / "in.jsonl", lines), purpose="batch")
    body = {"input_file_id": uploaded.id, "endpoint": "/v1/embeddings", "completion_window": "24h", **fields}
    with pytest.raises(openai.APIStatusError) as raised:
        client.batches.create(**body)  # type: ignore[arg-type]
    assert raised.value.status_code in (400, 404)
    assert message in raised.value.message


def test_files_are_listed_read_and_deleted(daemon: Daemon, tmp_path: Path) -> None:
    client = client_of(daemon)
    path = write_jsonl(tmp_path / "in.jsonl", [request_line("a", {"model": "tiny", "input": "a"})])
    uploaded = client.files.create(file=path, purpose="batch")
    assert client.files.retrieve(uploaded.id).filename == "in.jsonl"
    assert client.files.content(uploaded.id).content == path.read_bytes()
    assert [item.id for item in client.files.list().data] == [uploaded.id]
    assert client.files.delete(uploaded.id).deleted is True
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(uploaded.id)
    refused = httpx.post(f"{daemon.url}/v1/files", files={"file": ("x.jsonl", b"{}")}, data={"purpose": "fine-tune"})
    assert refused.status_code == 400 and "purpose must be batch" in refused.json()["error"]["message"]


def test_an_upload_over_max_upload_bytes_is_a_413_and_leaves_nothing(home: Path, tmp_path: Path) -> None:
    with running_daemon(home, {}, {"EMBERD_MAX_UPLOAD_BYTES": "1000"}) as daemon:
        refused = httpx.post(
            f"{daemon.url}/v1/files", files={"file": ("big.jsonl", b"x" * 5000)}, data={"purpose": "batch"}
        )
        assert refused.status_code == 413, refused.text
        assert "max_upload_bytes" in refused.json()["error"]["message"]
        assert client_of(daemon).files.list().data == []
    assert list((home / "batches" / "files").iterdir()) == []


def test_a_cancelled_batch_keeps_what_was_done(daemon: Daemon, tmp_path: Path) -> None:
    lines = [request_line(f"c-{index}", {"model": "tiny", "input": f"text {index} " * 20}) for index in range(3000)]
    client = client_of(daemon)
    uploaded = client.files.create(file=write_jsonl(tmp_path / "many.jsonl", lines), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h")
    wait_for(lambda: client.batches.retrieve(batch.id).request_counts.completed > 0, BATCH_DEADLINE_S)  # type: ignore[union-attr]
    assert client.batches.cancel(batch.id).status == "cancelling"
    done = finished(client, batch.id)
    assert done.status == "cancelled" and done.request_counts is not None
    output = lines_of(client, done.output_file_id)
    assert 0 < len(output) == done.request_counts.completed < 3000
    assert len({line["custom_id"] for line in output}) == len(output)


def test_kill_9_mid_batch_then_a_restart_answers_every_custom_id_exactly_once(home: Path, tmp_path: Path) -> None:
    count = 2000
    lines = [request_line(f"k-{index}", {"model": "tiny", "input": f"line {index} " * 12}) for index in range(count)]
    path = write_jsonl(tmp_path / "kill.jsonl", lines)
    with running_daemon(home, {}, {}) as daemon:
        client = client_of(daemon)
        uploaded = client.files.create(file=path, purpose="batch")
        batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h")

        def halfway() -> bool:
            counts = client.batches.retrieve(batch.id).request_counts
            return counts is not None and 0 < counts.completed < count

        wait_for(halfway, BATCH_DEADLINE_S)
        daemon.signal_group(signal.SIGKILL)  # the daemon and its runners, mid-chunk
        daemon.process.wait()
    with running_daemon(home, {}, {}) as daemon:
        client = client_of(daemon)
        resumed = client.batches.retrieve(batch.id)
        assert resumed.status == "in_progress" and resumed.request_counts is not None
        assert 0 < resumed.request_counts.completed < count  # it goes on from where it was
        done = finished(client, batch.id)
        assert done.status == "completed" and done.request_counts is not None
        assert (done.request_counts.completed, done.request_counts.failed) == (count, 0)
        output = lines_of(client, done.output_file_id)
    ids = [line["custom_id"] for line in output]
    assert len(ids) == count and set(ids) == {f"k-{index}" for index in range(count)}


# -- the command line -------------------------------------------------------------------------------


def test_emberd_batch_embeds_a_text_file_with_a_progress_bar_and_writes_the_output_beside_it(
    daemon: Daemon, tmp_path: Path
) -> None:
    texts = [f"sentence {index} of the corpus" for index in range(300)]
    source = tmp_path / "corpus.txt"
    source.write_text("\n".join(texts[:150]) + "\n\n" + "\n".join(texts[150:]) + "\n")  # a blank line: skipped
    done = daemon.cli("batch", str(source), "--model", "tiny")
    assert done.returncode == 0, done.stderr
    assert "line/s" in done.stderr  # tqdm's rate
    output = [json.loads(line) for line in (tmp_path / "corpus.output.jsonl").read_text().splitlines()]
    # custom_id is the text's line number in the file (line 151 is the blank one).
    expected = {f"line-{n}" for n in range(1, 151)} | {f"line-{n}" for n in range(152, 302)}
    assert {line["custom_id"] for line in output} == expected and len(output) == 300
    line_152 = next(line for line in output if line["custom_id"] == "line-152")["response"]["body"]
    assert float(np.dot(line_152["data"][0]["embedding"], direct_vector(daemon, texts[150]))) >= 0.99999
    assert not (tmp_path / "corpus.errors.jsonl").exists()
    batch_id = done.stdout.splitlines()[-1].split(":")[0]  # the summary line: "batch_...: completed, ..."
    status = daemon.cli("batch", "--status", batch_id)
    assert json.loads(status.stdout)["status"] == "completed"


def test_emberd_batch_sends_a_jsonl_file_as_it_is_and_writes_its_errors(daemon: Daemon, tmp_path: Path) -> None:
    source = write_jsonl(
        tmp_path / "requests.jsonl",
        [request_line("good", {"model": "tiny", "input": "x"}), request_line("bad", {"model": "tiny"})],
    )
    done = daemon.cli("batch", str(source))
    assert done.returncode == 0, done.stderr
    output = (tmp_path / "requests.output.jsonl").read_text().splitlines()
    errors = (tmp_path / "requests.errors.jsonl").read_text().splitlines()
    assert [json.loads(line)["custom_id"] for line in output] == ["good"]
    assert [json.loads(line)["custom_id"] for line in errors] == ["bad"]


def test_emberd_batch_refuses_texts_without_a_model(daemon: Daemon, tmp_path: Path) -> None:
    source = tmp_path / "texts.txt"
    source.write_text("one\ntwo\n")
    done = daemon.cli("batch", str(source))
    assert done.returncode != 0 and "needs --model" in done.stderr


@contextmanager
def tmpfs(directory: Path, size_mib: int) -> Iterator[Path]:
    """A small filesystem of its own (root only, as the tests run): a disk that fills for real."""
    directory.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "tmpfs", str(directory)], check=True)
    try:
        yield directory
    finally:
        if subprocess.run(["umount", str(directory)]).returncode != 0:
            subprocess.run(["umount", "--lazy", str(directory)], check=True)


def test_a_disk_that_fills_fails_the_batch_with_the_reason_and_the_daemon_goes_on(
    tmp_path: Path, tiny_gguf: Path
) -> None:
    lines = [request_line(f"d-{index}", {"model": "tiny", "input": f"text {index} " * 10}) for index in range(2000)]
    source = write_jsonl(tmp_path / "disk.jsonl", lines)
    with tmpfs(tmp_path / "disk", 8) as disk:
        home = disk / "home"
        store = ModelStore(home)
        store.open()
        store.create("tiny", tiny_gguf)
        with running_daemon(home, {}, {}) as daemon:
            client = client_of(daemon)
            uploaded = client.files.create(file=source, purpose="batch")
            free_bytes = shutil.disk_usage(disk).free
            filler = disk / "filler"
            filler.write_bytes(b"\0" * (free_bytes - 400 * 1024))  # room for the chunks, not for the answers
            batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h")
            done = finished(client, batch.id)
            assert done.status == "failed" and done.errors is not None and done.errors.data is not None
            assert [error.code for error in done.errors.data] == ["disk_full"]
            assert "the disk is full" in (done.errors.data[0].message or "")
            assert client.files.content(uploaded.id).content == source.read_bytes()  # what was written is kept
            alive = httpx.post(f"{daemon.url}/api/embed", json={"model": "tiny", "input": "still here"}, timeout=60)
            assert alive.status_code == 200
            filler.unlink()  # space again: the next batch runs
            small = write_jsonl(tmp_path / "small.jsonl", lines[:100])
            again = client.batches.create(
                input_file_id=client.files.create(file=small, purpose="batch").id,
                endpoint="/v1/embeddings",
                completion_window="24h",
            )
            assert finished(client, again.id).status == "completed"
