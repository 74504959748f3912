"""systemd/emberd.service: systemd's own checks of the unit, and the real daemon run under its sandbox.

There is no running systemd here, so the sandbox is emulated from the unit's own lines (this module,
run as `python -m tests.test_systemd_unit CONFIG -- COMMAND`, is the launcher): a private mount
namespace (ProtectSystem=strict, ProtectHome, PrivateTmp, PrivateDevices, ProtectProc, the state
directory), an unprivileged user with no capabilities and no_new_privs, the kernel's
memory-deny-write-execute (PR_SET_MDWE, as systemd >= 254 applies it), and seccomp filters built like
systemd's: the SystemCallFilter= allow list (its groups expanded by `systemd-analyze syscall-filter`),
RestrictAddressFamilies=, MemoryDenyWriteExecute= as systemd < 254 applies it, RestrictNamespaces=,
RestrictRealtime= and LockPersonality=. What is not emulated is listed in NOT_EMULATED, with why.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from daemon.config import load_settings
from tests.live import free_port, post_json

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "systemd" / "emberd.service"
SHIPPED_EXEC_START = "/opt/emberd/.venv/bin/emberd"
STATE_DIRECTORY = "/var/lib/emberd"
# `systemd-analyze security --offline=yes` rates the unit 1.2 OK (systemd 252); loosening it fails.
# (It would be 1.1 without setpriority, which job threads use to yield the CPU; with no CAP_SYS_NICE
# a process can only lower its own priority with it.)
EXPOSURE_THRESHOLD = 1.3
NOBODY = 65534

# [Service] lines this module emulates or checks; every other line must say here why it is not.
EMULATED = {
    "User", "Group", "StateDirectory", "StateDirectoryMode", "Environment", "UMask", "Type", "NotifyAccess",
    "KillMode", "TimeoutStopSec", "WatchdogSec", "NoNewPrivileges", "CapabilityBoundingSet", "AmbientCapabilities",
    "ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices", "ProtectKernelTunables",
    "ProtectControlGroups", "ProtectProc", "PrivateMounts", "RestrictAddressFamilies", "RestrictNamespaces",
    "RestrictRealtime", "LockPersonality", "MemoryDenyWriteExecute", "SystemCallArchitectures",
    "SystemCallFilter", "SystemCallErrorNumber",
}  # fmt: skip
NOT_EMULATED = {
    "ExecStart": "checked by systemd-analyze verify",
    "ExecReload": "kill -HUP: the daemon test sends SIGHUP itself",
    "Restart": "systemd policy", "RestartSec": "systemd policy",
    "DevicePolicy": "a cgroup device filter; PrivateDevices= leaves no other device node to open anyway",
    "ProtectKernelModules": "blocks @module calls, outside the emulated allow list already",
    "ProtectKernelLogs": "blocks syslog() and /dev/kmsg, outside the allow list and the private /dev",
    "ProtectClock": "blocks @clock calls, outside the allow list already",
    "ProtectHostname": "a UTS namespace; sethostname() is outside the allow list already",
    "RestrictSUIDSGID": "emberd never sets the setuid or setgid bit",
    "RemoveIPC": "cleanup after stop; emberd makes no System V IPC objects",
    "PrivateUsers": "a user namespace; tried under a real systemd 252 instead (systemd/README-snippet.md)",
}  # fmt: skip


# -- the unit --------------------------------------------------------------------------------------


def unit_sections(text: str) -> dict[str, list[tuple[str, str]]]:
    """Each section's (key, value) lines in order, comments dropped (the unit uses no continuations)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), [])
            continue
        key, _, value = line.partition("=")
        current.append((key.strip(), value.strip()))
    return sections


def service_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for key, value in unit_sections(UNIT.read_text())["Service"]:
        settings.setdefault(key, []).append(value)
    return settings


def one(settings: dict[str, list[str]], key: str) -> str:
    values = settings.get(key, [])
    assert len(values) == 1, f"{key}= should appear once in {UNIT.name}, found {values}"
    return values[0]


def is_yes(value: str) -> bool:
    return value.lower() in {"yes", "true", "1", "on"}


def seconds(value: str) -> float:
    units = {"": 1.0, "s": 1.0, "sec": 1.0, "ms": 0.001, "min": 60.0, "m": 60.0}
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value)
    assert match and match.group(2) in units, f"unexpected time span {value!r}"
    return float(match.group(1)) * units[match.group(2)]


def unit_copy(directory: Path) -> Path:
    """The unit with ExecStart= on this checkout's emberd, so systemd-analyze finds the executable."""
    emberd = Path(sys.executable).parent / "emberd"
    assert emberd.is_file(), f"{emberd} is missing: run `make setup`"
    text = UNIT.read_text()
    assert text.count(SHIPPED_EXEC_START) == 1
    path = directory / "emberd.service"
    path.write_text(text.replace(SHIPPED_EXEC_START, str(emberd)))
    return path


def systemd_analyze(*args: str) -> subprocess.CompletedProcess[str]:
    assert shutil.which("systemd-analyze"), "systemd-analyze (Debian package systemd) is needed"
    return subprocess.run(["systemd-analyze", *args], capture_output=True, text=True, timeout=60)


def test_unit_keeps_the_service_contract() -> None:
    settings = service_settings()
    assert one(settings, "Type") == "notify"
    assert one(settings, "NotifyAccess") == "main"
    assert one(settings, "KillMode") == "mixed"
    assert one(settings, "ExecReload") == "/bin/kill -HUP $MAINPID"
    assert seconds(one(settings, "WatchdogSec")) > 0
    # systemd's SIGKILL must come well after the daemon's own shutdown budget has run out.
    environ = dict(line.partition("=")[::2] for line in settings["Environment"])
    budget_s = load_settings(environ).shutdown_timeout_s
    assert budget_s > 0 and seconds(one(settings, "TimeoutStopSec")) >= budget_s + 15
    assert one(settings, "ExecStart") == f"{SHIPPED_EXEC_START} serve"
    assert one(settings, "StateDirectory") == Path(STATE_DIRECTORY).name
    assert f"EMBERD_HOME={STATE_DIRECTORY}" in settings["Environment"]
    assert one(settings, "User") == "emberd"


def test_every_service_line_is_emulated_or_says_why_not() -> None:
    keys = set(service_settings())
    assert keys - EMULATED - set(NOT_EMULATED) == set()
    assert (EMULATED | set(NOT_EMULATED)) - keys == set(), "drop the entries for lines the unit no longer has"


def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    path = unit_copy(tmp_path)
    result = systemd_analyze("verify", str(path))
    about_unit = [line for line in (result.stdout + result.stderr).splitlines() if path.name in line]
    assert result.returncode == 0, result.stderr
    assert about_unit == []


def test_verify_would_report_a_broken_unit(tmp_path: Path) -> None:
    """The check above can fail: the same call flags a misspelt directive in a copy."""
    path = unit_copy(tmp_path)
    path.write_text(path.read_text().replace("KillMode=mixed", "KillMode=mixed\nKilMode=mixed"))
    result = systemd_analyze("verify", str(path))
    assert any("KilMode" in line for line in result.stderr.splitlines() if path.name in line), result.stderr


def test_security_exposure_stays_low(tmp_path: Path) -> None:
    result = systemd_analyze("security", "--offline=yes", str(unit_copy(tmp_path)))
    match = re.search(r"Overall exposure level for emberd\.service: (\d+\.\d+) (\w+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) < EXPOSURE_THRESHOLD, match.group(0)
    assert match.group(2) == "OK"


# -- the sandbox, built from the unit -----------------------------------------------------------------


def syscall_groups() -> dict[str, list[str]]:
    """`systemd-analyze syscall-filter`: every @group and its members (calls or other groups)."""
    groups: dict[str, list[str]] = {}
    members: list[str] = []
    for line in systemd_analyze("syscall-filter").stdout.splitlines():
        if line.startswith("@"):
            members = groups.setdefault(line.strip(), [])
        elif line.startswith("    ") and not line.strip().startswith("#"):
            members.append(line.strip())
    assert "@system-service" in groups, "systemd-analyze syscall-filter printed no groups"
    return groups


def expand(item: str, groups: dict[str, list[str]]) -> set[str]:
    if not item.startswith("@"):
        return {item}
    return set().union(*(expand(member, groups) for member in groups[item]))


def allowed_syscalls(filters: list[str]) -> list[str]:
    """SystemCallFilter= lines in order: an allow list, then `~` lines taking calls away."""
    assert filters and not filters[0].startswith("~"), "the emulation handles an allow list first"
    groups = syscall_groups()
    allowed: set[str] = set()
    for line in filters:
        items = line.removeprefix("~").split()
        calls = set().union(*(expand(item, groups) for item in items))
        allowed = allowed - calls if line.startswith("~") else allowed | calls
    # What systemd always permits, whatever the list says.
    return sorted(allowed | {"execve", "exit", "exit_group", "getrlimit", "rt_sigreturn", "sigreturn"})


def kernel_has_mdwe() -> bool:
    libc = ctypes.CDLL(None, use_errno=True)
    return bool(libc.prctl(66, 0, 0, 0, 0) >= 0)  # PR_GET_MDWE, Linux >= 6.3


def sandbox_config(
    settings: dict[str, list[str]], home: Path, sources: list[Path], proc_subset_pid: bool = False
) -> dict[str, Any]:
    """What the launcher applies, read off the unit's lines (checked to be the values it emulates)."""
    assert one(settings, "ProtectSystem") == "strict"
    for key in ("ProtectHome", "PrivateTmp", "PrivateDevices", "ProtectKernelTunables", "ProtectControlGroups",
                "NoNewPrivileges", "PrivateMounts"):  # fmt: skip
        assert is_yes(one(settings, key)), key
    assert one(settings, "ProtectProc") == "invisible"
    assert one(settings, "CapabilityBoundingSet") == "" and one(settings, "AmbientCapabilities") == ""
    assert one(settings, "SystemCallArchitectures") == "native"  # libseccomp's default: native only
    mdwe = is_yes(one(settings, "MemoryDenyWriteExecute"))
    return {
        "home": str(home),
        "sources": [str(source) for source in sources],
        # The interpreter and this checkout, shown read-only if a hidden home directory holds them.
        "reveal": sorted({sys.base_prefix, sys.prefix, str(REPO)}),
        "proc_options": "hidepid=invisible" + (",subset=pid" if proc_subset_pid else ""),
        "uid": NOBODY,
        "umask": int(one(settings, "UMask"), 8),
        "mdwe_prctl": mdwe and kernel_has_mdwe(),
        "mdwe_seccomp": mdwe,
        "errno": getattr(errno, one(settings, "SystemCallErrorNumber")),
        "syscalls": allowed_syscalls(settings["SystemCallFilter"]),
        "families": [getattr(socket, name) for name in one(settings, "RestrictAddressFamilies").split()],
        "restrict_namespaces": is_yes(one(settings, "RestrictNamespaces")),
        "restrict_realtime": is_yes(one(settings, "RestrictRealtime")),
        "lock_personality": is_yes(one(settings, "LockPersonality")),
    }


def unit_environment(home: Path, extra: dict[str, str]) -> dict[str, str]:
    """A service's environment: systemd's basics and the unit's Environment= lines, state paths moved."""
    environ = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin", "LANG": "C.UTF-8", "HOME": str(home)}
    environ["PYTHONPATH"] = str(REPO)  # the checkout under test, whatever the virtualenv's editable install says
    for line in service_settings()["Environment"]:
        key, _, value = line.partition("=")
        environ[key] = value.replace(STATE_DIRECTORY, str(home))
    return {**environ, **extra}


def sandboxed(config: dict[str, Any], command: list[str]) -> list[str]:
    launcher = [sys.executable, "-m", "tests.test_systemd_unit", json.dumps(config), "--", *command]
    return ["unshare", "--mount", "--propagation", "private", "--", *launcher]


@pytest.fixture
def service_home(tmp_path: Path) -> Path:
    home = tmp_path / "state"
    home.mkdir(mode=0o700)
    os.chown(home, NOBODY, NOBODY)
    return home


@pytest.fixture
def readable_tiny_dir(tmp_path: Path, tiny_dir: Path) -> Path:
    """The tiny model as an admin would hand it over: readable by the service's user."""
    copy = Path(shutil.copytree(tiny_dir, tmp_path / "tiny-bert"))
    for path in [copy, *copy.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return copy


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("the sandbox needs root, as systemd has, to set up mounts and drop to another user")


PROBE = r"""
import ctypes, errno, json, mmap, os, socket, sys
import psutil
home, repo, outside = sys.argv[1:4]
libc = ctypes.CDLL(None, use_errno=True)
def attempt(action):
    try:
        action()
        return "ok"
    except OSError as error:
        return errno.errorcode[error.errno]
    except Exception as error:
        return type(error).__name__
def libc_call(name, *args):
    if getattr(libc, name)(*args) != 0:
        raise OSError(ctypes.get_errno(), name)
status = dict(line.split(":\t", 1) for line in open("/proc/self/status").read().splitlines() if ":\t" in line)
print(json.dumps({
    "uid": status["Uid"].split()[0], "no_new_privs": status["NoNewPrivs"], "seccomp": status["Seccomp"],
    "cap_eff": status["CapEff"], "cap_bnd": status["CapBnd"],
    "write_home": attempt(lambda: open(os.path.join(home, "probe"), "w").close()),
    "write_repo": attempt(lambda: open(os.path.join(repo, "probe"), "w").close()),
    "write_etc": attempt(lambda: open("/etc/emberd-probe", "w").close()),
    "write_cgroup": attempt(lambda: os.mkdir("/sys/fs/cgroup/emberd-probe")),
    "write_tmp": attempt(lambda: open("/tmp/probe", "w").close()),
    "outside_tmp_visible": os.path.exists(outside),
    "pid1_visible": os.path.exists("/proc/1"),
    "dev": sorted(os.listdir("/dev")),
    "home_dirs": sorted(os.listdir("/home")),
    "mem_total": attempt(lambda: psutil.virtual_memory().total),
    "af_inet": attempt(lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM).close()),
    "af_unix": attempt(lambda: socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).close()),
    "af_netlink": attempt(lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW).close()),
    "af_packet": attempt(lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW).close()),
    "mmap_wx": attempt(lambda: mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)),
    "unshare_user": attempt(lambda: libc_call("unshare", 0x10000000)),
    "setpriority": attempt(lambda: os.setpriority(os.PRIO_PROCESS, 0, 1)),
    "umask": oct(os.umask(0)),
}))
"""


def run_probe(config: dict[str, Any], home: Path, outside: Path) -> dict[str, Any]:
    command = [sys.executable, "-c", PROBE, str(home), str(REPO), str(outside)]
    result = subprocess.run(
        sandboxed(config, command), cwd=REPO, env=unit_environment(home, {}), capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    probe: dict[str, Any] = json.loads(result.stdout)
    return probe


def test_the_sandbox_is_real(tmp_path: Path, service_home: Path) -> None:
    """What the emulation enforces, seen from inside: so the daemon test below means something."""
    require_root()
    outside = tmp_path / "outside-the-sandbox"
    outside.touch()
    config = sandbox_config(service_settings(), service_home, [])
    probe = run_probe(config, service_home, outside)
    assert (probe["uid"], probe["no_new_privs"], probe["seccomp"]) == (str(NOBODY), "1", "2")
    assert int(probe["cap_eff"], 16) == 0 and int(probe["cap_bnd"], 16) == 0
    assert probe["write_home"] == "ok" and probe["write_tmp"] == "ok"
    assert probe["write_repo"] == probe["write_etc"] == probe["write_cgroup"] == "EROFS"
    assert not probe["outside_tmp_visible"]  # PrivateTmp
    assert not probe["pid1_visible"]  # ProtectProc=invisible
    assert "vda" not in probe["dev"] and {"null", "urandom"} <= set(probe["dev"])  # PrivateDevices
    shown = {Path(path).relative_to("/home").parts[0] for path in config["reveal"] if path.startswith("/home/")}
    assert probe["home_dirs"] == sorted(shown)  # ProtectHome
    assert probe["mem_total"] == "ok"  # psutil.virtual_memory() under ProtectProc=invisible
    assert probe["af_inet"] == probe["af_unix"] == "ok"
    assert probe["af_netlink"] == probe["af_packet"] == "EAFNOSUPPORT"
    assert probe["mmap_wx"] in {"EPERM", "EACCES"}  # MemoryDenyWriteExecute
    assert probe["unshare_user"] == "EPERM"  # RestrictNamespaces (no privilege needed otherwise)
    assert probe["setpriority"] == "ok"  # denied with @resources, then allowed again: job threads use it
    assert probe["umask"] == "0o77"


def test_proc_subset_pid_would_break_the_memory_probe(tmp_path: Path, service_home: Path) -> None:
    """Why the unit has no ProcSubset=pid: psutil.virtual_memory() needs /proc/meminfo."""
    require_root()
    config = sandbox_config(service_settings(), service_home, [], proc_subset_pid=True)
    probe = run_probe(config, service_home, tmp_path / "absent")
    assert probe["mem_total"] == "ENOENT"


class Notifications:
    """A Type=notify listener, in the abstract namespace so the sandbox's private /tmp does not hide it."""

    def __init__(self) -> None:
        self.address = f"@emberd-test-{os.getpid()}-{secrets.token_hex(4)}"
        self.seen: list[str] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind("\0" + self.address[1:])

    def close(self) -> None:
        self._sock.close()

    def wait_for(self, wanted: str, process: subprocess.Popen[bytes], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while wanted not in self.seen:
            if process.poll() is not None:
                stderr = process.stderr.read().decode() if process.stderr else ""
                raise AssertionError(f"emberd exited with {process.returncode} before {wanted}:\n{stderr}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {wanted} from emberd within {timeout_s}s; it sent {self.seen}")
            self._sock.settimeout(0.2)
            with contextlib.suppress(TimeoutError):
                self.seen += self._sock.recv(4096).decode().split("\n")


def proc_status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


def embed(port: int) -> list[float]:
    status, body = post_json(f"http://127.0.0.1:{port}/api/embed", {"model": "tiny", "input": "why is the sky blue"})
    assert status == 200 and len(body["embeddings"]) == 1
    vector: list[float] = body["embeddings"][0]
    return vector


def test_daemon_serves_embeddings_in_the_sandbox(service_home: Path, readable_tiny_dir: Path) -> None:
    """The real daemon and its llama.cpp runner under all of the above, MemoryDenyWriteExecute included
    (ctypes' callback for llama.cpp's log hook is refused a writable+executable page, and libffi falls
    back to mapping a memfd twice, read+write and read+exec), run the way systemd runs it: READY=1,
    WATCHDOG=1 pings, SIGHUP for ExecReload=, SIGTERM to the main process alone (KillMode=mixed)."""
    require_root()
    settings = service_settings()
    config = sandbox_config(settings, service_home, [readable_tiny_dir])
    port = free_port()
    notifications = Notifications()
    watchdog_usec = str(int(seconds(one(settings, "WatchdogSec")) * 1_000_000))
    extra = {"EMBERD_HOST": f"127.0.0.1:{port}", "NOTIFY_SOCKET": notifications.address, "WATCHDOG_USEC": watchdog_usec}
    command = [sys.executable, "-m", "daemon", "serve", "--ensure-model", f"tiny={readable_tiny_dir}"]
    process = subprocess.Popen(
        sandboxed(config, command),
        cwd=REPO,
        env=unit_environment(service_home, extra),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        notifications.wait_for("READY=1", process, timeout_s=30)
        notifications.wait_for("WATCHDOG=1", process, timeout_s=seconds(one(settings, "WatchdogSec")) / 2)
        assert len(embed(port)) == 32
        runners = psutil.Process(process.pid).children()
        assert runners, "the embedding came from no runner process"
        for pid in [process.pid, *(runner.pid for runner in runners)]:
            status = proc_status(pid)
            assert status["Uid"].split()[0] == str(NOBODY)
            assert (status["NoNewPrivs"], status["Seccomp"]) == ("1", "2")
            assert int(status["CapBnd"], 16) == 0
        # ExecReload=: SIGHUP re-reads the API keys (none here) and the daemon carries on serving.
        process.send_signal(signal.SIGHUP)
        assert len(embed(port)) == 32 and process.poll() is None
        # KillMode=mixed: SIGTERM to the main process alone; it stops its runners itself, in time.
        process.send_signal(signal.SIGTERM)
        notifications.wait_for("STOPPING=1", process, timeout_s=10)
        assert process.wait(timeout=seconds(one(settings, "TimeoutStopSec"))) == 0
        assert not any(runner.is_running() for runner in runners)
    finally:
        notifications.close()
        if process.poll() is None:
            process.kill()
        process.wait()
        if process.stderr:
            process.stderr.close()


# -- the launcher: runs as root in a fresh mount namespace, then becomes the service -------------------

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC = 1, 2, 4, 8, 32, 4096, 16384
MS_KEPT = 1 | 2 | 4 | 8 | 1024 | 2048 | 4096  # statvfs flags a read-only remount keeps (ST_* == MS_*)
SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_CMP_EQ, SCMP_CMP_GT, SCMP_CMP_MASKED_EQ = 4, 6, 7
CLONE_NEW_FLAGS = (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000)
PROT_WRITE, PROT_EXEC, SHM_EXEC = 2, 4, 0o100000


def scmp_act_errno(number: int) -> int:
    return 0x00050000 | (number & 0xFFFF)


class _ArgCmp(ctypes.Structure):
    _fields_ = (
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    )


class _Seccomp:
    """One seccomp filter, made and loaded with libseccomp (as systemd does, one filter per setting)."""

    def __init__(self, default_action: int) -> None:
        self._lib = ctypes.CDLL("libseccomp.so.2")
        self._lib.seccomp_init.restype = ctypes.c_void_p
        self._lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
        self._lib.seccomp_rule_add_array.argtypes = [
            ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint, ctypes.POINTER(_ArgCmp)
        ]  # fmt: skip
        self._lib.seccomp_load.argtypes = [ctypes.c_void_p]
        self._lib.seccomp_release.argtypes = [ctypes.c_void_p]
        self._ctx = self._lib.seccomp_init(default_action)
        assert self._ctx, "seccomp_init failed"

    def rule(self, action: int, name: str, *comparisons: tuple[int, int, int, int]) -> None:
        number = self._lib.seccomp_syscall_resolve_name(name.encode())
        if number < 0:  # not a call of this architecture
            return
        array = (_ArgCmp * max(1, len(comparisons)))(*(_ArgCmp(*comparison) for comparison in comparisons))
        result = self._lib.seccomp_rule_add_array(self._ctx, action, number, len(comparisons), array)
        if result < 0:
            raise OSError(-result, f"seccomp rule for {name}")

    def load(self) -> None:
        result = self._lib.seccomp_load(self._ctx)
        self._lib.seccomp_release(self._ctx)
        if result < 0:
            raise OSError(-result, "seccomp_load")


def _seccomp_filters(config: dict[str, Any]) -> list[_Seccomp]:
    filters: list[_Seccomp] = []
    families = _Seccomp(SCMP_ACT_ALLOW)
    refuse = scmp_act_errno(errno.EAFNOSUPPORT)
    highest = max(config["families"])
    for family in sorted(set(range(highest)) - set(config["families"])):
        families.rule(refuse, "socket", (0, SCMP_CMP_EQ, family, 0))
    families.rule(refuse, "socket", (0, SCMP_CMP_GT, highest, 0))
    filters.append(families)

    if config["mdwe_seccomp"]:
        mdwe, refuse = _Seccomp(SCMP_ACT_ALLOW), scmp_act_errno(errno.EPERM)
        mdwe.rule(refuse, "mmap", (2, SCMP_CMP_MASKED_EQ, PROT_WRITE | PROT_EXEC, PROT_WRITE | PROT_EXEC))
        mdwe.rule(refuse, "mprotect", (2, SCMP_CMP_MASKED_EQ, PROT_EXEC, PROT_EXEC))
        mdwe.rule(refuse, "pkey_mprotect", (2, SCMP_CMP_MASKED_EQ, PROT_EXEC, PROT_EXEC))
        mdwe.rule(refuse, "shmat", (2, SCMP_CMP_MASKED_EQ, SHM_EXEC, SHM_EXEC))
        filters.append(mdwe)
    if config["restrict_namespaces"]:
        namespaces, refuse = _Seccomp(SCMP_ACT_ALLOW), scmp_act_errno(errno.EPERM)
        namespaces.rule(refuse, "setns")
        namespaces.rule(scmp_act_errno(errno.ENOSYS), "clone3")  # its flags are out of seccomp's reach
        for flag in CLONE_NEW_FLAGS:
            namespaces.rule(refuse, "unshare", (0, SCMP_CMP_MASKED_EQ, flag, flag))
            namespaces.rule(refuse, "clone", (0, SCMP_CMP_MASKED_EQ, flag, flag))
        filters.append(namespaces)
    if config["restrict_realtime"]:
        realtime = _Seccomp(SCMP_ACT_ALLOW)
        for policy in (1, 2, 6):  # SCHED_FIFO, SCHED_RR, SCHED_DEADLINE
            realtime.rule(scmp_act_errno(errno.EPERM), "sched_setscheduler", (1, SCMP_CMP_EQ, policy, 0))
        filters.append(realtime)
    if config["lock_personality"]:
        personality = _Seccomp(SCMP_ACT_ALLOW)
        personality.rule(scmp_act_errno(errno.EPERM), "personality", (0, 1, 0, 0))  # SCMP_CMP_NE PER_LINUX
        filters.append(personality)
    # Last, as systemd does: loading the filters after it needs seccomp(), which it does not allow.
    allow_list = _Seccomp(scmp_act_errno(config["errno"]))
    for name in config["syscalls"]:
        allow_list.rule(SCMP_ACT_ALLOW, name)
    filters.append(allow_list)
    return filters


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    return libc


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    def encode(text: str | None) -> bytes | None:
        return text.encode() if text is not None else None

    if _libc().mount(encode(source), target.encode(), encode(fstype), flags, encode(data)) != 0:
        number = ctypes.get_errno()
        raise OSError(number, f"mount {source} on {target}: {os.strerror(number)}")


def _read_only(target: str, extra: int = 0) -> None:
    _mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY | extra | (os.statvfs(target).f_flag & MS_KEPT))


def _bind(fd: int, target: str, writable: bool) -> None:
    Path(target).mkdir(parents=True, exist_ok=True)
    _mount(f"/proc/self/fd/{fd}", target, None, MS_BIND)
    flags = MS_BIND | MS_REMOUNT | MS_NOSUID | MS_NODEV | (0 if writable else MS_RDONLY)
    _mount(None, target, None, flags)


def _mount_points() -> list[str]:
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = re.sub(r"\\(\d{3})", lambda match: chr(int(match.group(1), 8)), line.split()[4])
        if not point.startswith(("/proc", "/dev")):
            points.append(point)
    return points


def _private_devices() -> None:
    _mount("tmpfs", "/dev", "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=0755")
    for name, major, minor in (("null", 1, 3), ("zero", 1, 5), ("full", 1, 7), ("random", 1, 8),
                               ("urandom", 1, 9), ("tty", 5, 0)):  # fmt: skip
        os.mknod(f"/dev/{name}", 0o666 | 0o020000, os.makedev(major, minor))
        os.chmod(f"/dev/{name}", 0o666)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                         ("stderr", "/proc/self/fd/2")):  # fmt: skip
        os.symlink(target, f"/dev/{name}")
    os.mkdir("/dev/shm")
    _mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
    _read_only("/dev")


def _enter(config: dict[str, Any], command: list[str]) -> None:
    last_capability = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    home_fd = os.open(config["home"], os.O_PATH | os.O_DIRECTORY)
    source_fds = {source: os.open(source, os.O_PATH | os.O_DIRECTORY) for source in config["sources"]}
    homes = [path for path in ("/home", "/root", "/run/user") if os.path.isdir(path)]
    reveal = {path: os.open(path, os.O_PATH | os.O_DIRECTORY) for path in config["reveal"]}
    _mount(None, "/", None, MS_REC | 1 << 18)  # MS_PRIVATE: nothing leaks back to the host
    # ProtectSystem=strict (and ProtectKernelTunables/ControlGroups for /sys): every mount read-only.
    for point in _mount_points():
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            _read_only(point)
    # PrivateTmp=yes: empty /tmp and /var/tmp. ProtectHome=yes: empty, read-only home directories.
    # The interpreter and the checkout may live in either (pyenv under /root, a clone under /tmp):
    # shown read-only at their paths, as BindReadOnlyPaths= would.
    for path in ["/tmp", "/var/tmp", *homes]:
        _mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777" if path.endswith("tmp") else "mode=0755")
        for shown, fd in reveal.items():
            if Path(shown).is_relative_to(path):
                _bind(fd, shown, writable=False)
        if path in homes:
            _read_only(path)
    # The state directory (read-write) and the model sources (read-only), at the paths the test gave.
    _bind(home_fd, config["home"], writable=True)
    for source, fd in source_fds.items():
        _bind(fd, source, writable=False)
    _private_devices()
    # ProtectProc=invisible: a /proc showing only this user's processes; /proc/sys read-only.
    _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, config["proc_options"])
    if os.path.isdir("/proc/sys"):
        _mount("/proc/sys", "/proc/sys", None, MS_BIND | MS_REC)
        _read_only("/proc/sys")
    for fd in [home_fd, *source_fds.values(), *reveal.values()]:
        os.close(fd)
    os.chdir("/")
    os.umask(config["umask"])

    # User=, CapabilityBoundingSet=, AmbientCapabilities=, NoNewPrivileges=.
    libc = _libc()
    for capability in range(last_capability + 1):
        libc.prctl(24, capability, 0, 0, 0)  # PR_CAPBSET_DROP
    os.setgroups([])
    os.setresgid(config["uid"], config["uid"], config["uid"])
    os.setresuid(config["uid"], config["uid"], config["uid"])
    if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
        raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS")
    # MemoryDenyWriteExecute=yes as systemd >= 254 applies it on Linux >= 6.3; kept across execve.
    if config["mdwe_prctl"] and libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
        raise OSError(ctypes.get_errno(), "PR_SET_MDWE")
    environ = dict(os.environ)
    for seccomp in _seccomp_filters(config):
        seccomp.load()
    os.execve(command[0], command, environ)


if __name__ == "__main__":
    separator = sys.argv.index("--")
    _enter(json.loads(sys.argv[1]), sys.argv[separator + 1 :])
