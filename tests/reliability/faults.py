"""Faults under load against a live daemon; print a report.

    .venv/bin/python -m tests.reliability.faults [--clients 32] [--seconds 6]

32 clients send mixed inputs (short queries, passages, batches) while a fault strikes:
  - kill -9 of the model's runner, twice;
  - clients that disconnect in the middle of their requests;
  - SIGTERM to the daemon's whole process group (as systemd sends it), at the end.
Every accepted request must get an answer: a result, or a clear error (the runner's death is a 500
that names it; a stopping daemon answers 503). The daemon must recover by itself (the next request
after a runner's death gets a fresh runner) and exit 0 on SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter

from tests.live import running_daemon
from tests.reliability.fuzz_routes import home_with_tiny_model

PASSAGE = "the sky is blue because the air scatters blue light more than red light, why is grass green? " * 2


def request_body(rng: random.Random) -> dict[str, object]:
    roll = rng.random()
    if roll < 0.6:
        return {"model": "tiny", "input": f"why is the sky blue? {rng.randint(0, 999)}"}
    if roll < 0.9:
        return {"model": "tiny", "input": [PASSAGE] * rng.randint(2, 16)}
    return {"model": "tiny", "input": [PASSAGE] * 64}


def client(url: str, stop_at: float, seed: int, outcomes: Counter[str], lock: threading.Lock) -> None:
    rng = random.Random(seed)
    while time.monotonic() < stop_at:
        data = json.dumps(request_body(rng)).encode()
        request = urllib.request.Request(url + "/api/embed", data=data, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                response.read()
                outcome = f"{response.status}"
        except urllib.error.HTTPError as error:
            message = json.loads(error.read() or b"{}").get("error", "")
            outcome = f"{error.code} {message.split(':')[0][:60]}"
        except OSError as error:  # no answer at all: a lost request
            outcome = f"lost ({type(error).__name__})"
        with lock:
            outcomes[outcome] += 1


def leaver(port: int, stop_at: float, counts: Counter[str], lock: threading.Lock) -> None:
    """Sends 64-passage requests and disconnects before the answer."""
    payload = json.dumps({"model": "tiny", "input": [PASSAGE] * 64}).encode()
    while time.monotonic() < stop_at:
        with socket.create_connection(("127.0.0.1", port)) as connection:
            head = f"POST /api/embed HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(payload)}\r\n\r\n"
            connection.sendall(head.encode() + payload)
            connection.recv(1)  # nothing comes before the answer: this waits a little, then we leave
        with lock:
            counts["left"] += 1


def run(clients: int, seconds: float) -> int:
    home = home_with_tiny_model("emberd-faults-")
    outcomes: Counter[str] = Counter()
    leavers: Counter[str] = Counter()
    lock = threading.Lock()
    kills = 0
    with running_daemon(home, {}, {"EMBERD_MAX_QUEUE": "256"}) as daemon:
        url = daemon.url
        port = int(url.rsplit(":", 1)[1])
        urllib.request.urlopen(urllib.request.Request(url + "/api/embed", data=b'{"model": "tiny"}'), timeout=60)
        stop_at = time.monotonic() + seconds
        threads = [threading.Thread(target=client, args=(url, stop_at, i, outcomes, lock)) for i in range(clients)]
        threads += [threading.Thread(target=leaver, args=(port, stop_at, leavers, lock)) for _ in range(2)]
        for thread in threads:
            thread.start()
        for fraction in (0.3, 0.6):  # kill -9 the runner twice, while loaded: a schedule, not a wait
            time.sleep(max(0.0, stop_at - seconds * (1 - fraction) - time.monotonic()))
            runners = daemon.runner_pids()
            if runners:
                os.kill(runners[0], signal.SIGKILL)
                kills += 1
        for thread in threads:
            thread.join()
        # Recovered by itself: a request now gets a fresh runner.
        with urllib.request.urlopen(
            urllib.request.Request(url + "/api/embed", data=b'{"model": "tiny", "input": "after"}'), timeout=60
        ) as response:
            recovered = response.status == 200
        daemon.signal_group(signal.SIGTERM)
        daemon.process.wait(timeout=60)
        exit_status = daemon.process.returncode
        log = daemon.log_text()
    lost = sum(count for outcome, count in outcomes.items() if outcome.startswith("lost"))
    unexplained = sum(
        count
        for outcome, count in outcomes.items()
        if outcome[0] == "5" and not outcome.startswith(("500 model runner", "503"))
    )
    tracebacks = sum("Traceback" in line for line in log.splitlines())
    print(f"\n{clients} clients for {seconds:g} s, runner killed {kills} times, 2 clients leaving mid-request")
    print("answers: " + ", ".join(f"{outcome}: {count}" for outcome, count in sorted(outcomes.items())))
    print(f"requests left by their clients: {leavers['left']}")
    print(f"lost (no answer): {lost}; unexplained 5xx: {unexplained}; tracebacks in the log: {tracebacks}")
    print(f"recovered by itself: {recovered}; exit status on SIGTERM to the group: {exit_status}")
    ok = lost == 0 and unexplained == 0 and recovered and exit_status == 0 and tracebacks == 0 and kills == 2
    print("RESULT: " + ("pass" if ok else "FAIL"))
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=6.0)
    args = parser.parse_args()
    return run(args.clients, args.seconds)


if __name__ == "__main__":
    sys.exit(main())
