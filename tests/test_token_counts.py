"""The scheduler and memory code: one job a module, the pure parts free of I/O, and every token count
it names one of the glossary's (daemon.token_counts)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from daemon.token_counts import MERGED_TOKEN_COUNTS, TOKEN_COUNTS

DAEMON = Path(__file__).resolve().parent.parent / "daemon"
SCHEDULING_AND_MEMORY = sorted(
    [DAEMON / "scheduler.py", *(DAEMON / "scheduling").glob("*.py"), *(DAEMON / "memory").glob("*.py")]
)
# The token counts issue 18 asked to name, each a glossary entry or merged into one.
NAMED_IN_THE_ISSUE = [
    "limit_tokens",
    "batch_tokens",
    "budget_tokens",
    "capacity_tokens",
    "allowance_tokens",
    "largest_decode_tokens",
    "measured_at_tokens",
]


def token_names(source: str) -> set[str]:
    """Every identifier ending in `_tokens` a module binds, reads, passes or declares: variables,
    parameters, attributes, keyword arguments, fields. A name that is called is a verb, not a count
    (runner.set_batch_tokens(...)), and left out."""
    tree = ast.parse(source)
    called = {id(node.func) for node in ast.walk(tree) if isinstance(node, ast.Call)}
    names: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in called:
            continue
        if isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif isinstance(node, ast.arg | ast.keyword) and node.arg is not None:
            names.add(node.arg)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            names.add(node.name)
    return {name for name in names if name.endswith("_tokens")}


def test_the_glossary_names_every_count_the_issue_listed() -> None:
    for name in NAMED_IN_THE_ISSUE:
        assert name in TOKEN_COUNTS or MERGED_TOKEN_COUNTS.get(name) in TOKEN_COUNTS, name
    assert not set(MERGED_TOKEN_COUNTS) & set(TOKEN_COUNTS)  # a merged name is gone, not kept beside


def test_token_names_finds_every_kind_of_name() -> None:
    source = (
        "def f(a_tokens: int, *, b_tokens: int = 0) -> int:\n"
        "    c_tokens = a_tokens\n"
        "    g(d_tokens=c_tokens)\n"
        "    return self.e_tokens\n"
        "class C:\n"
        "    f_tokens: int = 0\n"
        "    def g_tokens(self) -> int: ...\n"
        "n_tokens_bound = 1\n"
        "runner.set_h_tokens(c_tokens)\n"
    )
    assert token_names(source) == {f"{letter}_tokens" for letter in "abcdefg"}


@pytest.mark.parametrize("path", SCHEDULING_AND_MEMORY, ids=lambda path: str(path.relative_to(DAEMON)))
def test_every_token_count_in_the_scheduler_and_memory_is_in_the_glossary(path: Path) -> None:
    unknown = token_names(path.read_text()) - set(TOKEN_COUNTS)
    assert not unknown, f"{sorted(unknown)}: add them to daemon/token_counts.py, or use a name it has"


def test_no_module_of_the_daemon_uses_a_merged_name() -> None:
    for path in sorted(DAEMON.rglob("*.py")):
        merged = token_names(path.read_text()) & set(MERGED_TOKEN_COUNTS)
        assert not merged, f"{path.relative_to(DAEMON)} uses {sorted(merged)}: see daemon/token_counts.py"


def test_the_scheduler_and_memory_modules_were_found() -> None:
    names = {str(path.relative_to(DAEMON)) for path in SCHEDULING_AND_MEMORY}
    assert {"scheduler.py", "scheduling/leases.py", "memory/estimate.py", "memory/probe.py"} <= names


def imported_modules(path: Path) -> set[str]:
    modules: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            modules.add(node.module if node.module.startswith("daemon") else node.module.split(".")[0])
    return modules


@pytest.mark.parametrize("module", ["estimate", "budget"])
def test_the_pure_memory_modules_do_no_io(module: str) -> None:
    imported = imported_modules(DAEMON / "memory" / f"{module}.py")
    assert not imported & {"psutil", "pathlib", "os", "io", "asyncio", "daemon.memory.probe"}


def test_the_probe_is_where_memory_reads_the_machine() -> None:
    assert {"psutil", "pathlib"} <= imported_modules(DAEMON / "memory" / "probe.py")


@pytest.mark.parametrize("path", SCHEDULING_AND_MEMORY, ids=lambda path: str(path.relative_to(DAEMON)))
def test_each_module_says_what_it_owns_and_touches_no_http_or_llama(path: Path) -> None:
    tree = ast.parse(path.read_text())
    assert ast.get_docstring(tree), "its docstring says what it owns"
    assert not imported_modules(path) & {"aiohttp", "llama_cpp"}
