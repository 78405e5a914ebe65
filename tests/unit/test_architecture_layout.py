"""docs/architecture.md's layout is the tree: every module of the app is listed, and everything listed
exists. The app's modules are found, not named here: each top-level `.py` file and each module of
every top-level package (a directory holding an `__init__.py`), so a new package is covered the day
it lands."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ARCHITECTURE = ROOT / "docs" / "architecture.md"
HEADING = "## Layout and the import rule"


def layout_block() -> str:
    """The first fenced block under the layout heading."""
    text = ARCHITECTURE.read_text(encoding="utf-8")
    section = text[text.index(f"\n{HEADING}\n") :]
    start = section.index("\n```") + len("\n```")
    start = section.index("\n", start) + 1
    return section[start : section.index("\n```", start)]


def listed_entries() -> list[str]:
    """The paths the layout names: the first word of each entry line (`a, b` names two)."""
    entries = []
    for line in layout_block().splitlines():
        if not line or line[0].isspace():
            continue  # a continuation of the entry above
        head = re.match(r"[\w./-]+(?:, [\w./-]+)*", line)
        assert head is not None, f"an entry line that does not start with a path: {line!r}"
        entries.extend(head.group(0).split(", "))
    return entries


def app_modules() -> set[str]:
    """Each top-level module and each module of each top-level package; an empty `__init__.py` is not one."""
    found = {path.name for path in ROOT.glob("*.py")}
    for init in ROOT.glob("*/__init__.py"):
        for path in init.parent.rglob("*.py"):
            if "__pycache__" in path.parts or (path.name == "__init__.py" and not path.read_text().strip()):
                continue
            found.add(path.relative_to(ROOT).as_posix())
    return found


def test_the_layout_lists_every_module_of_the_app() -> None:
    assert app_modules() - set(listed_entries()) == set(), f"modules missing from {HEADING!r} in docs/architecture.md"


def test_everything_the_layout_lists_is_in_the_tree() -> None:
    missing = sorted(entry for entry in listed_entries() if not (ROOT / entry).exists())
    assert missing == [], f"listed in docs/architecture.md's layout but not in the tree: {missing}"


def test_the_layout_is_read_as_entries_at_all() -> None:
    # GIVEN the parser above, WHEN it reads today's layout, THEN it finds the named modules and
    # directories (a parser that found nothing would make the two tests above pass vacuously)
    entries = listed_entries()
    assert {"main.py", "aws/sqs.py", "pii/masking.py", "database/sqs_postgres.py", "scripts/"} <= set(entries)
    assert len(app_modules()) >= 30
