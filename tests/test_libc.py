"""daemon.libc: the C library's calls the daemon and its runners make, through the one handle that
opens it (Linux and glibc here and in CI)."""

from __future__ import annotations

import ast
import ctypes
import mmap
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from daemon import libc

ROOT = Path(__file__).parent.parent
PAGES = 8


@pytest.fixture
def anonymous_pages() -> Iterator[tuple[mmap.mmap, int]]:
    """PAGES fresh private anonymous pages (none touched yet, so none in memory; as malloc's) and
    their address. A shared mapping would keep its pages through madvise."""
    buffer = mmap.mmap(-1, PAGES * mmap.PAGESIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    view = ctypes.c_char.from_buffer(buffer)
    address = ctypes.addressof(view)
    del view  # the mapping stays; only the export that would keep it from closing goes
    yield buffer, address
    buffer.close()


def test_pages_are_counted_in_memory_once_touched_and_out_once_given_back(
    anonymous_pages: tuple[mmap.mmap, int],
) -> None:
    buffer, address = anonymous_pages
    length = PAGES * mmap.PAGESIZE
    assert libc.resident_pages(address, length) == 0
    for page in (0, 2, 3):
        buffer[page * mmap.PAGESIZE] = 7
    assert libc.resident_pages(address, length) == 3
    assert libc.resident_pages(address + 2 * mmap.PAGESIZE, 2 * mmap.PAGESIZE) == 2
    assert libc.resident_pages(address, mmap.PAGESIZE - 1) == 0  # no whole page
    libc.give_back_pages(address, length)
    assert libc.resident_pages(address, length) == 0
    assert buffer[0] == 0 and buffer[2 * mmap.PAGESIZE] == 0  # read again: fresh zero pages


def test_the_heap_calls_are_made_where_glibc_has_them() -> None:
    # In a child: the threshold would otherwise stay set for the rest of this test process.
    code = "from daemon import libc; print(libc.set_mmap_threshold(131072), libc.trim_heap())"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert result.stdout.split() == ["True", "True"]


# A process that asks to die with its parent, says whether it asked, and then waits for a signal.
_ORPHAN = (
    "import signal; from daemon import libc; print(libc.die_with_parent(signal.SIGKILL), flush=True); signal.pause()"
)
# Its parent: starts it, prints its pid and answer, and exits.
_PARENT = (
    "import subprocess, sys;"
    f"child = subprocess.Popen([sys.executable, '-c', {_ORPHAN!r}], stdout=subprocess.PIPE, text=True);"
    "print(child.pid, child.stdout.readline().strip(), flush=True)"
)


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_a_process_that_asked_dies_with_its_parent() -> None:
    result = subprocess.run(
        [sys.executable, "-c", _PARENT], capture_output=True, text=True, check=True, cwd=ROOT, timeout=60
    )
    pid_text, asked = result.stdout.split()
    pid = int(pid_text)
    try:
        assert asked == "True"
        deadline_s = time.monotonic() + 10.0
        while not _gone(pid):
            assert time.monotonic() < deadline_s, "the orphan outlived its parent"
            time.sleep(0.01)
    finally:
        if not _gone(pid):
            psutil.Process(pid).kill()


def test_only_daemon_libc_opens_the_c_library() -> None:
    """One handle per process: ctypes.CDLL(None) appears in daemon/libc.py and nowhere else."""
    opened_in = []
    for path in sorted((ROOT / "daemon").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "CDLL"
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and node.args[0].value is None
            ):
                opened_in.append(path.relative_to(ROOT).as_posix())
    assert opened_in == ["daemon/libc.py"]
