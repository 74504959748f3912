"""The documentation's links: README.md is the front door, docs/*.md hold the topics.

Every relative link in README.md and docs/*.md must reach a file or folder of the repository, and
every `#anchor` must name a heading of the page it points to, by GitHub's rule for heading anchors
(lower case, punctuation dropped, each space a hyphen, -1, -2... for repeats). Every page in docs/
must be linked from the README's map (its "Documentation" section), so no page is out of reach.
Links inside code (fenced blocks and `spans`) are text, not links, and are not checked.
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path
from urllib.parse import unquote

import pytest

REPO = Path(__file__).resolve().parent.parent
MAP_HEADING = "Documentation"

_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_ATX_HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$")
_CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.DOTALL)
# [text](target) or ![alt](target), with an optional "title"; the text may hold one level of brackets.
_INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
_REFERENCE_DEFINITION = re.compile(r"^ {0,3}\[[^\]]+\]:[ \t]*<?(\S+?)>?(?:[ \t]+.*)?$", re.MULTILINE)
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def prose(markdown: str) -> str:
    """The text outside fenced code blocks, with code spans blanked (kept as a space)."""
    kept: list[str] = []
    fence: str | None = None
    for line in markdown.splitlines():
        opening = _FENCE.match(line)
        if fence is None and opening:
            fence = opening.group(1)
        elif fence is not None and opening and opening.group(1)[0] == fence[0] and len(opening.group(1)) >= len(fence):
            fence = None
        elif fence is None:
            kept.append(line)
    return _CODE_SPAN.sub(" ", "\n".join(kept))


def heading_text(markdown_heading: str) -> str:
    """A heading's text as GitHub renders it: code keeps its content, links their text, emphasis goes."""
    text = re.sub(r"`+([^`]*)`+", r"\1", markdown_heading)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = re.sub(r"<[^>]+>", "", text)
    return text.replace("*", "")


def slug(text: str) -> str:
    """GitHub's anchor for a heading's rendered text (before the -1, -2 suffixes of repeats)."""
    kept = (c for c in text.strip().lower() if c in " -_" or unicodedata.category(c)[0] in "LNM")
    return "".join(kept).replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    """Every anchor GitHub gives the headings of a page."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    fence: str | None = None
    for line in markdown.splitlines():
        opening = _FENCE.match(line)
        if fence is None and opening:
            fence = opening.group(1)
            continue
        if fence is not None:
            if opening and opening.group(1)[0] == fence[0] and len(opening.group(1)) >= len(fence):
                fence = None
            continue
        heading = _ATX_HEADING.match(line)
        if heading is None:
            continue
        base = slug(heading_text(heading.group(2)))
        repeats = seen.get(base, 0)
        seen[base] = repeats + 1
        found.add(base if repeats == 0 else f"{base}-{repeats}")
    return found


def link_targets(markdown: str) -> list[str]:
    """The targets of the page's links (inline and reference definitions), in order, code left out."""
    text = prose(markdown)
    return [m.group(1) for m in _INLINE_LINK.finditer(text)] + [
        m.group(1) for m in _REFERENCE_DEFINITION.finditer(text)
    ]


def section(markdown: str, title: str) -> str:
    """The lines under the level-2 heading `title`, up to the next heading of level 1 or 2."""
    lines = markdown.splitlines()
    starts = [i for i, line in enumerate(lines) if line.strip() == f"## {title}"]
    if not starts:
        return ""
    body: list[str] = []
    for line in lines[starts[0] + 1 :]:
        if re.match(r"^#{1,2} ", line):
            break
        body.append(line)
    return "\n".join(body)


def pages(root: Path) -> list[Path]:
    """The documentation: README.md and every page in docs/."""
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def broken_links(root: Path) -> list[str]:
    """One line for each link of the documentation that does not reach its file, folder or heading."""
    problems: list[str] = []
    for page in pages(root):
        where = page.relative_to(root).as_posix()
        for target in link_targets(page.read_text(encoding="utf-8")):
            if _SCHEME.match(target) or target.startswith("//"):
                continue  # another site: not this repository's to check
            path_part, _, anchor = target.partition("#")
            destination = (page.parent / unquote(path_part)).resolve() if path_part else page
            if not destination.is_relative_to(root.resolve()):
                problems.append(f"{where}: {target}: leaves the repository")
            elif not destination.exists():
                problems.append(f"{where}: {target}: no such file")
            elif anchor:
                if destination.suffix != ".md" or destination.is_dir():
                    problems.append(f"{where}: {target}: an anchor into a file that is not a page")
                elif unquote(anchor) not in anchors(destination.read_text(encoding="utf-8")):
                    problems.append(f"{where}: {target}: no such heading")
    return problems


def pages_missing_from_map(root: Path) -> list[str]:
    """Pages in docs/ that the README's map does not link."""
    readme = root / "README.md"
    doc_map = section(readme.read_text(encoding="utf-8"), MAP_HEADING)
    linked = {(root / unquote(t.partition("#")[0])).resolve() for t in link_targets(doc_map) if not _SCHEME.match(t)}
    return [
        f"README.md: docs/{page.name} is not in the '{MAP_HEADING}' map"
        for page in sorted((root / "docs").glob("*.md"))
        if page.resolve() not in linked
    ]


def test_every_link_between_the_readme_and_docs_resolves() -> None:
    problems = broken_links(REPO)
    assert problems == [], "\n".join(problems)


def test_the_readme_map_links_every_docs_page() -> None:
    assert (REPO / "docs").is_dir()
    assert len(list((REPO / "docs").glob("*.md"))) >= 8
    problems = pages_missing_from_map(REPO)
    assert problems == [], "\n".join(problems)


@pytest.mark.parametrize(
    ("heading", "anchor"),
    [
        ("GPUs", "gpus"),
        ("Run as a service", "run-as-a-service"),
        ("On a LAN: who may call", "on-a-lan-who-may-call"),
        ("Health, metrics and logs", "health-metrics-and-logs"),
        (
            "Concurrent and mixed loads against raw llama-cpp-python (`make bench`)",
            "concurrent-and-mixed-loads-against-raw-llama-cpp-python-make-bench",
        ),
        ("Foo & Bar", "foo--bar"),
        ("`EMBERD_HOST` and snake_case", "emberd_host-and-snake_case"),
        ("A [linked](other.md) **bold** word", "a-linked-bold-word"),
        ("Überblick: Größe 3.5", "überblick-größe-35"),
    ],
)
def test_anchors_follow_githubs_rule(heading: str, anchor: str) -> None:
    assert anchors(f"# {heading}\n") == {anchor}


def test_repeated_headings_get_numbered_anchors_and_code_is_not_a_heading() -> None:
    markdown = "# Notes\n\n## Notes\n\n```sh\n# not a heading\n```\n\n### Notes ###\n"
    assert anchors(markdown) == {"notes", "notes-1", "notes-2"}


def test_links_in_code_are_not_links() -> None:
    markdown = (
        'See [a](a.md) and ![b](img/b.png "B").\n\n'
        "`[not](x.md)` and ``[nor](y.md)``\n\n"
        "```md\n[no](z.md)\n```\n\n"
        "[ref]: refs/r.md\n"
    )
    assert link_targets(markdown) == ["a.md", "img/b.png", "refs/r.md"]


def _tree(root: Path, readme: str, docs: dict[str, str]) -> Path:
    (root / "docs").mkdir()
    (root / "README.md").write_text(readme, encoding="utf-8")
    for name, text in docs.items():
        (root / "docs" / name).write_text(text, encoding="utf-8")
    return root


_GOOD_README = "# Tool\n\n## Use\n\nRun it.\n\n## Documentation\n\n- [A](docs/a.md)\n- [B](docs/b.md#part-two)\n"
_GOOD_A = "# A\n\nBack to [the map](../README.md#documentation), on to [B's part](b.md#part-two), [here](#a).\n"
_GOOD_B = "# B\n\n## Part two\n\nSee [A](a.md) and [the folder](../docs/).\n"


def test_a_sound_tree_has_no_problems(tmp_path: Path) -> None:
    root = _tree(tmp_path, _GOOD_README, {"a.md": _GOOD_A, "b.md": _GOOD_B})
    assert broken_links(root) == []
    assert pages_missing_from_map(root) == []


@pytest.mark.parametrize(
    ("readme", "a", "problem"),
    [
        (_GOOD_README.replace("docs/a.md", "docs/aa.md"), _GOOD_A, "README.md: docs/aa.md: no such file"),
        (_GOOD_README, _GOOD_A.replace("b.md#part-two", "b.md#part-2"), "docs/a.md: b.md#part-2: no such heading"),
        (_GOOD_README, _GOOD_A.replace("(#a)", "(#b)"), "docs/a.md: #b: no such heading"),
        (_GOOD_README, _GOOD_A.replace("#documentation", "#docs"), "docs/a.md: ../README.md#docs: no such heading"),
        (_GOOD_README, _GOOD_A + "[up](../../elsewhere.md)\n", "docs/a.md: ../../elsewhere.md: leaves the repository"),
    ],
)
def test_a_broken_link_is_reported(tmp_path: Path, readme: str, a: str, problem: str) -> None:
    root = _tree(tmp_path, readme, {"a.md": a, "b.md": _GOOD_B})
    assert broken_links(root) == [problem]


def test_a_page_missing_from_the_map_is_reported(tmp_path: Path) -> None:
    readme = _GOOD_README.replace("- [A](docs/a.md)\n", "") + "\n## Use again\n\n[A](docs/a.md) outside the map.\n"
    root = _tree(tmp_path, readme, {"a.md": _GOOD_A, "b.md": _GOOD_B})
    assert broken_links(root) == []
    assert pages_missing_from_map(root) == ["README.md: docs/a.md is not in the 'Documentation' map"]
