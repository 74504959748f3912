"""A fleet: three `emberd serve` behind HAProxy running configs/haproxy.cfg exactly as shipped.
Sixteen clients embed through HAProxy without pause while the daemons are restarted one at a
time (SIGTERM to the process group, then started again on the same port and store): not one
request may fail."""

from __future__ import annotations

import contextlib
import csv
import http.client
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

from tests.live import free_port, wait_for

pytestmark = pytest.mark.fleet

HAPROXY_CFG = Path(__file__).resolve().parents[2] / "configs" / "haproxy.cfg"
BACKEND = "emberd"  # the backend section of configs/haproxy.cfg
SERVERS = ["emberd1", "emberd2", "emberd3"]  # its server lines, fed by EMBERD_BACKEND_1..3
CLIENTS = 16
# The lame-duck window configs/haproxy.cfg asks the daemons for: longer than HAProxy takes to see
# /readyz turn 503 (fall 2 checks, 1s + 250ms apart). With none, HAProxy's retries must cover.
LAME_DUCK = "2s"
EXIT_TIMEOUT_S = 45.0  # the daemon's whole shutdown fits in EMBERD_SHUTDOWN_TIMEOUT (30s)


def haproxy_binary() -> str:
    # Debian installs it in /usr/sbin, which is not on every user's PATH.
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])
    found = shutil.which("haproxy", path=path)
    if found is None:
        pytest.fail("haproxy is not installed; `make test-fleet` installs it (apt-get install -y haproxy)")
    return found


def tail(path: Path, lines: int = 40) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return f"--- last lines of {path} ---\n" + "\n".join(text.splitlines()[-lines:])


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()
    except OSError:
        return 0, b""


class FleetDaemon:
    """One `emberd serve` in its own session (process group) with its own store; restartable."""

    def __init__(self, home: Path, port: int, tiny_dir: Path, drain_delay: str, log: Path) -> None:
        self.home = home
        self.port = port
        self.tiny_dir = tiny_dir
        self.drain_delay = drain_delay
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        environ = {
            **os.environ,
            "EMBERD_HOST": f"127.0.0.1:{self.port}",
            "EMBERD_HOME": str(self.home),
            "EMBERD_DRAIN_DELAY": self.drain_delay,
            "EMBERD_HUB_OFFLINE": "1",
            # The vector cache off: the load's repeated texts must reach the runners.
            "EMBERD_CACHE": "false",
            # Three daemons share this machine's cores.
            "EMBERD_NUM_THREAD": "1",
        }
        environ.pop("EMBERD_CONFIG", None)
        command = [sys.executable, "-m", "daemon", "serve", "--ensure-model", f"tiny={self.tiny_dir}"]
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                command, env=environ, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
            )

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait_ready(self) -> None:
        url = f"http://127.0.0.1:{self.port}/readyz"
        wait_for(lambda: get(url)[0] == 200 or not self.running(), timeout_s=60)
        assert self.running(), f"the daemon on port {self.port} exited while starting\n{tail(self.log)}"

    def sigterm(self) -> None:
        """To the whole process group, as terminals (and systemd's KillMode=control-group) send it."""
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGTERM)

    def wait_exit(self) -> int:
        assert self.process is not None
        try:
            return self.process.wait(timeout=EXIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the daemon on port {self.port} did not exit after SIGTERM\n{tail(self.log)}")

    def kill(self) -> None:
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):  # the group: runners a failed shutdown left too
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


class HAProxy:
    def __init__(self, binary: str, environ: dict[str, str], stats_url: str, log: Path) -> None:
        self.binary = binary
        self.environ = environ
        self.stats_url = stats_url
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    def check_config(self) -> subprocess.CompletedProcess[str]:
        command = [self.binary, "-c", "-f", str(HAPROXY_CFG)]
        return subprocess.run(command, env=self.environ, capture_output=True, text=True, timeout=30)

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [self.binary, "-W", "-db", "-f", str(HAPROXY_CFG)],
                env=self.environ,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stats(self) -> dict[str, dict[str, str]]:
        """The emberd backend's rows of the stats CSV, by server name ("BACKEND" for the total)."""
        status, body = get(self.stats_url + ";csv")
        assert self.process is not None and self.process.poll() is None, f"haproxy exited\n{tail(self.log)}"
        if status != 200:
            return {}
        rows = csv.DictReader(io.StringIO(body.decode().removeprefix("# ")))
        return {row["svname"]: row for row in rows if row["pxname"] == BACKEND}

    def server(self, name: str) -> dict[str, str]:
        return self.stats().get(name, {})

    def is_up(self, name: str) -> bool:
        return self.server(name).get("status") == "UP"  # not "UP 1/2": one failed check, still in use

    def is_down(self, name: str) -> bool:
        return self.server(name).get("status", "").startswith("DOWN")


class Clients:
    """Threads that embed through HAProxy back to back over keep-alive connections, as an
    indexing job does, and count every request: a 200 with the right vectors, or a failure."""

    def __init__(self, port: int, dimension: int) -> None:
        self.port = port
        self.dimension = dimension
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.ok = 0
        self.failures: list[str] = []
        self.threads = [threading.Thread(target=self.run, args=(i,), name=f"client-{i}") for i in range(CLIENTS)]

    def run(self, client: int) -> None:
        connection: http.client.HTTPConnection | None = None
        sent = 0
        while not self.stop.is_set():
            texts = [f"client {client} request {sent} text {k}" for k in range(1 + sent % 3)]
            sent += 1
            failure = None
            try:
                if connection is None:
                    connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
                body = json.dumps({"model": "tiny", "input": texts})
                connection.request("POST", "/api/embed", body=body, headers={"Content-Type": "application/json"})
                response = connection.getresponse()
                payload = response.read()
                if response.will_close:
                    connection.close()
                    connection = None
                if response.status != 200:
                    failure = f"HTTP {response.status}: {payload[:200]!r}"
                else:
                    vectors = json.loads(payload)["embeddings"]
                    if [len(vector) for vector in vectors] != [self.dimension] * len(texts):
                        failure = f"{len(texts)} inputs, vector lengths {[len(v) for v in vectors]}"
            except (OSError, http.client.HTTPException, ValueError, KeyError, TypeError) as error:
                failure = repr(error)
                if connection is not None:
                    connection.close()
                    connection = None
            with self.lock:
                if failure is None:
                    self.ok += 1
                else:
                    self.failures.append(failure)
        if connection is not None:
            connection.close()

    def count(self) -> int:
        with self.lock:
            return self.ok + len(self.failures)

    @contextmanager
    def running(self) -> Iterator[Clients]:
        for thread in self.threads:
            thread.start()
        try:
            yield self
        finally:
            self.stop.set()
            for thread in self.threads:
                thread.join(timeout=90)
            assert not any(thread.is_alive() for thread in self.threads), "a client hung"


def lb_environ(lb_port: int, stats_port: int, daemons: list[FleetDaemon]) -> dict[str, str]:
    environ = {**os.environ, "EMBERD_LB_BIND": f"127.0.0.1:{lb_port}"}
    environ["EMBERD_LB_STATS_BIND"] = f"127.0.0.1:{stats_port}"
    for number, daemon in enumerate(daemons, start=1):
        environ[f"EMBERD_BACKEND_{number}"] = f"127.0.0.1:{daemon.port}"
    return environ


def test_the_shipped_config_is_valid_as_is_and_with_addresses_from_the_environment() -> None:
    binary = haproxy_binary()
    for environ in ({**os.environ}, {**os.environ, "EMBERD_BACKEND_2": "127.0.0.1:1", "EMBERD_LB_BIND": ":8080"}):
        checked = subprocess.run([binary, "-c", "-f", str(HAPROXY_CFG)], env=environ, capture_output=True, text=True)
        assert checked.returncode == 0, checked.stdout + checked.stderr


@pytest.mark.parametrize("drain_delay", [LAME_DUCK, "0s"], ids=["lame-duck", "no-drain-delay"])
def test_rolling_restart_behind_haproxy_fails_no_request(tmp_path: Path, tiny_dir: Path, drain_delay: str) -> None:
    binary = haproxy_binary()
    dimension = json.loads((tiny_dir / "config.json").read_text())["hidden_size"]
    daemons = [
        FleetDaemon(tmp_path / f"home{n}", free_port(), tiny_dir, drain_delay, tmp_path / f"emberd{n}.log")
        for n in (1, 2, 3)
    ]
    stats_port = free_port()
    lb_port = free_port()
    lb = HAProxy(
        binary, lb_environ(lb_port, stats_port, daemons), f"http://127.0.0.1:{stats_port}/stats", tmp_path / "lb.log"
    )
    checked = lb.check_config()
    assert checked.returncode == 0, checked.stdout + checked.stderr
    clients = Clients(lb_port, dimension)
    logs = [daemon.log for daemon in daemons] + [lb.log]

    with ExitStack() as stack:
        for daemon in daemons:
            stack.callback(daemon.kill)
        for daemon in daemons:
            daemon.start()
        stack.callback(lb.stop)
        lb.start()
        for daemon in daemons:
            daemon.wait_ready()
        wait_for(lambda: all(lb.is_up(name) for name in SERVERS), timeout_s=30)

        stack.enter_context(clients.running())
        # The fleet is serving: each daemon has its model loaded and answered.
        wait_for(lambda: all(int(lb.server(name)["hrsp_2xx"]) > 0 for name in SERVERS), timeout_s=30)

        for name, daemon in zip(SERVERS, daemons, strict=True):
            answered = clients.count()
            daemon.sigterm()
            if drain_delay == LAME_DUCK:
                # /readyz answers 503: HAProxy takes the daemon out of rotation while it still serves.
                wait_for(lambda name=name, daemon=daemon: lb.is_down(name) or not daemon.running(), timeout_s=10)
                assert daemon.running(), f"{name} stopped before HAProxy took it out of rotation"
            code = daemon.wait_exit()
            assert code == 0, f"{name} exited with {code}\n{tail(daemon.log)}"
            daemon.start()
            daemon.wait_ready()
            wait_for(lambda name=name: lb.is_up(name), timeout_s=30)
            # The other two kept serving meanwhile, and the restarted one serves again.
            assert clients.count() > answered + CLIENTS
            served = int(lb.server(name)["hrsp_2xx"])
            wait_for(lambda name=name, served=served: int(lb.server(name)["hrsp_2xx"]) > served, timeout_s=30)

        total = lb.server("BACKEND")
        stack.close()  # clients stopped and joined, daemons and HAProxy gone

    sent = clients.ok + len(clients.failures)
    print(
        f"drain delay {drain_delay}: {sent} requests through HAProxy, {len(clients.failures)} failed;"
        f" HAProxy retries {total['wretr']}, redispatches {total['wredis']}"
    )
    details = "\n".join(clients.failures[:20]) + "\n" + "\n".join(tail(log) for log in logs)
    assert clients.failures == [], f"{len(clients.failures)} of {sent} requests failed:\n{details}"
