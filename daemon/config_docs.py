"""configs/emberd.toml and docs/configuration.md's settings table, generated from the declaration.

Each setting is declared once, in daemon/config.py; `python -m daemon.config_docs --write` writes the
two documents from it and `--check` says which differ (tests/test_config.py fails when one does).
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path

from daemon.config import DECLARED, Declared, Settings, format_go_duration, format_size

REPO = Path(__file__).resolve().parent.parent
TOML_PATH = REPO / "configs" / "emberd.toml"
PAGE_PATH = REPO / "docs" / "configuration.md"

COMMAND = "python -m daemon.config_docs --write"
TABLE_START = f"<!-- settings table: generated from daemon/config.py by `{COMMAND}` -->"
TABLE_END = "<!-- end of the generated settings table -->"
_WIDTH = 100

_TOML_HEADER = f"""\
# emberd settings, each with its default. Point EMBERD_CONFIG (or `emberd serve --config`) at a
# copy of this file to change them, or set one at a time with EMBERD_<KEY> in upper case, e.g.
# EMBERD_KEEP_ALIVE=10m or EMBERD_HOST=0.0.0.0:11434. Precedence: defaults < file < env < flags.
# Generated from the declarations in daemon/config.py by `{COMMAND}`.
"""

_TYPE_WORDS = {
    "host": "host:port",
    "path": "path",
    "duration": "duration",
    "size": "size",
    "integer": "integer",
    "boolean": "boolean",
    "text": "text",
    "list": "list",
}

_TABLE_NOTE = (
    "A duration is a Go duration (`5m`, `1h30m`, `300ms`) or a number of seconds; a size is a number of "
    "bytes or takes a unit (`512MiB`, `4GiB`; `4G` is binary, `4GB` decimal); a list is a TOML array, "
    "comma-separated in a variable."
)


def default_text(name: str, declared: Declared, defaults: Settings) -> str:
    """A setting's default as the file and the environment write it ("5m", "128MiB", "true")."""
    value = getattr(defaults, name)
    if declared.kind == "host":
        return f"{defaults.host}:{defaults.port}"
    if declared.kind == "path":
        return ""  # the file's "" stands for the default place, which depends on the environment
    if declared.kind == "duration":
        return format_go_duration(value)
    if declared.kind == "size":
        return format_size(value)
    if declared.kind == "boolean":
        return "true" if value else "false"
    if declared.kind == "list":
        return ",".join(value)
    return str(value)


def _toml_literal(name: str, declared: Declared, defaults: Settings) -> str:
    if declared.kind in ("integer", "boolean"):
        return default_text(name, declared, defaults)
    if declared.kind == "list":
        return "[" + ", ".join(json.dumps(item) for item in getattr(defaults, name)) + "]"
    # A JSON string of printable text is a TOML basic string.
    return json.dumps(default_text(name, declared, defaults), ensure_ascii=False)


def _comment(text: str) -> list[str]:
    lines: list[str] = []
    for paragraph in text.split("\n"):
        wrapped = textwrap.wrap(paragraph, _WIDTH - 2, break_long_words=False, break_on_hyphens=False)
        lines.extend(f"# {line}" for line in wrapped)
    return lines


def render_toml(defaults: Settings | None = None) -> str:
    """configs/emberd.toml: every setting with its help as a comment and its default."""
    defaults = defaults or Settings()
    blocks = [_TOML_HEADER.rstrip("\n")]
    for name, declared in DECLARED.items():
        help_text = declared.help
        if declared.kind == "list":
            help_text += f"\n({declared.variable} takes them comma-separated.)"
        lines = [*_comment(help_text), f"{declared.key} = {_toml_literal(name, declared, defaults)}"]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


def _type_text(declared: Declared) -> str:
    word = _TYPE_WORDS[declared.kind]
    return f"{word} ({declared.unit})" if declared.kind == "integer" and declared.unit else word


def _cell(text: str) -> str:
    if "|" in text or "\n" in text:
        raise ValueError(f"a table cell cannot hold | or a line break: {text!r}")
    return text


def render_table(defaults: Settings | None = None) -> str:
    """The settings table of docs/configuration.md, between its markers (included)."""
    defaults = defaults or Settings()
    rows = [TABLE_START, "| variable | type | default | meaning |", "|---|---|---|---|"]
    for name, declared in DECLARED.items():
        variable = f"`{declared.variable}`" + (f" (or `{declared.also_env}`)" if declared.also_env else "")
        text = default_text(name, declared, defaults)
        default = declared.shown_default or (f"`{text}`" if text else "none")
        cells = [variable, _type_text(declared), default, declared.summary]
        rows.append("| " + " | ".join(_cell(cell) for cell in cells) + " |")
    note = textwrap.fill(_TABLE_NOTE, _WIDTH, break_long_words=False, break_on_hyphens=False)
    return "\n".join([*rows, "", note, TABLE_END])


def with_table(page: str, table: str) -> str:
    """The page with the text between its markers (both included) replaced by `table`."""
    start, end = page.find(TABLE_START), page.find(TABLE_END)
    if start < 0 or end < start:
        raise ValueError(f"the page lacks the markers {TABLE_START!r} ... {TABLE_END!r}")
    return page[:start] + table + page[end + len(TABLE_END) :]


def documents() -> dict[Path, str]:
    """What each generated file should hold, by its path."""
    return {
        TOML_PATH: render_toml(),
        PAGE_PATH: with_table(PAGE_PATH.read_text(encoding="utf-8"), render_table()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m daemon.config_docs", description=__doc__)
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--write", action="store_true", help="write both documents from the declaration")
    action.add_argument("--check", action="store_true", help="exit 1 naming each document that differs")
    args = parser.parse_args(argv)
    stale = [path for path, text in documents().items() if path.read_text(encoding="utf-8") != text]
    if args.check:
        for path in stale:
            print(f"{path.relative_to(REPO)} differs from daemon/config.py's declarations: run {COMMAND}")
        return 1 if stale else 0
    for path, text in documents().items():
        if path in stale:
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
