"""A fleet sharing its batches through PostgreSQL: a real PostgreSQL (Debian's) on a loopback port,
three `emberd serve` with their own homes and the same EMBERD_BATCH_DATABASE_URL. A batch uploaded to
one daemon is read from another and run by all three; one is killed with kill -9 while it holds
chunks, and the others take them over once its lease passes: the output answers every custom_id
exactly once. Then one upload and batch through HAProxy (configs/haproxy.cfg as shipped)."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, LiteralString

import httpx
import openai
import psycopg
import pytest

from daemon.store import ModelStore
from tests.fleet.test_rolling_restart import HAPROXY_CFG, HAProxy, get, haproxy_binary, tail
from tests.live import Daemon, free_port, running_daemon, wait_for

pytestmark = pytest.mark.fleet

LINES = 3000
DEADLINE_S = 120.0  # under pytest-timeout's 300s
LEASE = "4s"  # how long a killed daemon's chunks wait for the others (the default is 120s)
# The tables' rows as the test reads them: a chunk's `claimed_by` names the daemon holding it, and
# once it is done, the daemon that recorded it. A trigger copies each recorded chunk into a table
# of the test's own, since a finished batch's chunks are dropped.
RECORDED = """
CREATE TABLE recorded (batch_id TEXT, chunk_no INTEGER, recorded_by TEXT);
CREATE FUNCTION note_recorded() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO recorded VALUES (NEW.batch_id, NEW.chunk_no, NEW.claimed_by);
    RETURN NEW;
END $$;
CREATE TRIGGER note_recorded AFTER UPDATE OF done ON emberd_chunks
    FOR EACH ROW WHEN (NEW.done AND NOT OLD.done) EXECUTE FUNCTION note_recorded();
"""


def postgres_tool(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))), None)
    if found is None:
        pytest.fail(f"{name} is not installed; `make test-fleet` installs PostgreSQL (apt-get install -y postgresql)")
    return str(found)


@contextmanager
def postgres() -> Iterator[str]:
    """A PostgreSQL of its own in a temporary directory on a loopback port; its URL. Run as the
    postgres user when the tests run as root (PostgreSQL refuses root)."""
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    directory = Path(tempfile.mkdtemp(prefix="emberd-postgres-"))
    data, log = directory / "data", directory / "postgres.log"
    if as_user:
        shutil.chown(directory, "postgres")
    port = free_port()
    try:
        subprocess.run(
            [*as_user, postgres_tool("initdb"), "-D", str(data), "-U", "emberd", "-A", "trust", "--no-sync"],
            check=True,
            capture_output=True,
        )
        options = f"-p {port} -k {directory} -c listen_addresses=127.0.0.1 -c fsync=off"
        started = subprocess.run(
            [*as_user, postgres_tool("pg_ctl"), "-D", str(data), "-o", options, "-l", str(log), "-w", "start"],
            capture_output=True,
            text=True,
        )
        assert started.returncode == 0, started.stdout + started.stderr + tail(log)
        try:
            yield f"postgresql://emberd@127.0.0.1:{port}/postgres"
        finally:
            subprocess.run(
                [*as_user, postgres_tool("pg_ctl"), "-D", str(data), "-m", "immediate", "stop"], capture_output=True
            )
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def request_line(custom_id: str, text: str) -> str:
    body = {"model": "tiny", "input": text}
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/embeddings", "body": body}) + "\n"


def client_of(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


def finished(client: openai.OpenAI, batch_id: str) -> Any:
    state: dict[str, Any] = {}

    def done() -> bool:
        state["batch"] = client.batches.retrieve(batch_id)
        return state["batch"].status in {"completed", "failed", "expired", "cancelled"}

    wait_for(done, DEADLINE_S)
    return state["batch"]


def custom_ids(client: openai.OpenAI, file_id: str | None) -> list[str]:
    assert file_id is not None
    return [json.loads(line)["custom_id"] for line in client.files.content(file_id).text.splitlines()]


def query(url: str, sql: LiteralString, params: tuple[Any, ...] | None = None) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as connection:
        cursor = connection.execute(sql, params)
        return cursor.fetchall() if cursor.description is not None else []


def held_by(url: str, batch_id: str, port: int) -> list[int]:
    """The chunks of the batch the daemon on `port` holds now (claimed, lease running, not done)."""
    rows = query(
        url,
        "SELECT chunk_no, claimed_by FROM emberd_chunks WHERE batch_id = %s AND NOT done"
        " AND lease_until > extract(epoch FROM clock_timestamp())",
        (batch_id,),
    )
    return sorted(chunk for chunk, owner in rows if owner is not None and owner.endswith(f":{port}"))


def port_of(daemon: Daemon) -> int:
    return int(daemon.url.rsplit(":", 1)[1])


@pytest.fixture
def homes(tmp_path: Path, tiny_gguf: Path) -> list[Path]:
    homes = []
    for number in (1, 2, 3):
        home = tmp_path / f"home{number}"
        store = ModelStore(home)
        store.open()
        store.create("tiny", tiny_gguf)
        homes.append(home)
    return homes


def test_three_daemons_share_a_batch_and_one_killed_mid_batch_loses_nothing(tmp_path: Path, homes: list[Path]) -> None:
    source = tmp_path / "input.jsonl"
    source.write_text("".join(request_line(f"f-{index}", f"fleet line {index} " * 8) for index in range(LINES)))
    with ExitStack() as stack:
        url = stack.enter_context(postgres())
        environ = {
            "EMBERD_BATCH_DATABASE_URL": url,
            "EMBERD_BATCH_LEASE": LEASE,
            "EMBERD_NUM_THREAD": "1",  # three daemons share this machine's cores
        }
        daemons = [stack.enter_context(running_daemon(home, {}, environ)) for home in homes]
        first, second, victim = daemons

        def logs() -> str:
            return "\n".join(tail(daemon.log_path) for daemon in daemons)

        query(url, RECORDED)

        uploaded = client_of(first.url).files.create(file=source, purpose="batch")
        assert client_of(second.url).files.content(uploaded.id).content == source.read_bytes()
        batch = client_of(first.url).batches.create(
            input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h"
        )
        assert client_of(second.url).batches.retrieve(batch.id).id == batch.id  # another daemon answers it

        # Mid-batch: some lines done, and the victim holding chunks. It is stopped (SIGSTOP) before
        # its chunks are read, so it cannot finish them between the look and the kill.
        held: list[int] = []

        def victim_stopped_holding_chunks() -> bool:
            counts = client_of(second.url).batches.retrieve(batch.id).request_counts
            if counts is None or not 0 < counts.completed < LINES or not held_by(url, batch.id, port_of(victim)):
                return False
            victim.signal_group(signal.SIGSTOP)
            held[:] = held_by(url, batch.id, port_of(victim))  # its leases still run: nobody took them
            if not held:
                victim.signal_group(signal.SIGCONT)
            return bool(held)

        wait_for(victim_stopped_holding_chunks, DEADLINE_S)
        victim.signal_group(signal.SIGKILL)
        victim.process.wait()
        held_at_kill = list(held)

        done = finished(client_of(second.url), batch.id)
        assert done.status == "completed", f"{done}\n{logs()}"
        assert done.request_counts is not None
        assert (done.request_counts.total, done.request_counts.completed) == (LINES, LINES)
        assert done.error_file_id is None
        ids = custom_ids(client_of(first.url), done.output_file_id)
        assert len(ids) == LINES and set(ids) == {f"f-{index}" for index in range(LINES)}

        recorded = query(url, "SELECT chunk_no, recorded_by FROM recorded WHERE batch_id = %s", (batch.id,))
        chunk_count = -(-LINES // 64)
        assert sorted(chunk for chunk, _owner in recorded) == list(range(chunk_count))  # each once
        by_port = {
            port_of(daemon): {c for c, owner in recorded if owner.endswith(f":{port_of(daemon)}")} for daemon in daemons
        }
        survivors = [port_of(first), port_of(second)]
        assert all(by_port[port] for port in survivors), by_port  # both survivors recorded chunks
        taken_over = set(held_at_kill) - by_port[port_of(victim)]
        assert taken_over == set(held_at_kill) and taken_over <= by_port[survivors[0]] | by_port[survivors[1]]
        print(
            f"{chunk_count} chunks recorded: {[len(chunks) for chunks in by_port.values()]} by daemon;"
            f" the killed daemon's {held_at_kill} taken over"
        )


def test_an_upload_and_a_batch_through_haproxy(tmp_path: Path, homes: list[Path]) -> None:
    binary = haproxy_binary()
    source = tmp_path / "small.jsonl"
    source.write_text("".join(request_line(f"h-{index}", f"through haproxy {index}") for index in range(100)))
    with ExitStack() as stack:
        url = stack.enter_context(postgres())
        environ = {"EMBERD_BATCH_DATABASE_URL": url, "EMBERD_NUM_THREAD": "1"}
        daemons = [stack.enter_context(running_daemon(home, {}, environ)) for home in homes]
        lb_port, stats_port = free_port(), free_port()
        lb_environ = {**os.environ, "EMBERD_LB_BIND": f"127.0.0.1:{lb_port}"}
        lb_environ["EMBERD_LB_STATS_BIND"] = f"127.0.0.1:{stats_port}"
        for number, daemon in enumerate(daemons, start=1):
            lb_environ[f"EMBERD_BACKEND_{number}"] = daemon.url.removeprefix("http://")
        lb = HAProxy(binary, lb_environ, f"http://127.0.0.1:{stats_port}/stats", tmp_path / "lb.log")
        checked = lb.check_config()
        assert checked.returncode == 0, checked.stdout + checked.stderr + str(HAPROXY_CFG)
        stack.callback(lb.stop)
        lb.start()
        wait_for(lambda: all(lb.is_up(name) for name in ("emberd1", "emberd2", "emberd3")), timeout_s=30)

        client = client_of(f"http://127.0.0.1:{lb_port}")
        uploaded = client.files.create(file=source, purpose="batch")
        batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h")
        done = finished(client, batch.id)
        assert done.status == "completed", f"{done}\n{tail(lb.log)}"
        ids = custom_ids(client, done.output_file_id)
        assert sorted(ids) == sorted(f"h-{index}" for index in range(100))
        # Exactly one file and one batch: nothing was replayed on the way.
        assert [item.id for item in client.files.list().data if item.purpose == "batch"] == [uploaded.id]
        assert [item.id for item in client.batches.list().data] == [batch.id]
        # They went through the batch routes' backend, which retried nothing.
        status, body = get(lb.stats_url + ";csv")
        rows = csv.DictReader(io.StringIO(body.decode().removeprefix("# ")))
        batches_backend = next(row for row in rows if (row["pxname"], row["svname"]) == ("emberd_batches", "BACKEND"))
        assert status == 200 and int(batches_backend["hrsp_2xx"]) >= 4 and batches_backend["wretr"] == "0"


def test_a_batch_database_that_cannot_be_reached_is_a_503_and_embeddings_go_on(tmp_path: Path, tiny_gguf: Path) -> None:
    """Nothing listens on the URL's port: the daemon starts, serves embeddings, and the batch
    routes answer 503 in OpenAI's body (not a 500)."""
    home = tmp_path / "home"
    store = ModelStore(home)
    store.open()
    store.create("tiny", tiny_gguf)
    url = f"postgresql://emberd@127.0.0.1:{free_port()}/emberd"
    with running_daemon(home, {}, {"EMBERD_BATCH_DATABASE_URL": url}) as daemon:
        answer = httpx.get(f"{daemon.url}/v1/batches", timeout=60)
        assert answer.status_code == 503, answer.text
        assert "the batch database cannot be reached" in answer.json()["error"]["message"]
        embedded = httpx.post(f"{daemon.url}/api/embed", json={"model": "tiny", "input": "hello"}, timeout=60)
        assert embedded.status_code == 200
