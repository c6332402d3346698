"""docs/architecture.md matches the tree: its module table names every module once, and every path it names exists."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "architecture.md"
PATH = re.compile(r"oddaemon/[\w/]*\w\.py")


def modules() -> set[str]:
    return {str(p.relative_to(REPO)) for p in (REPO / "oddaemon").rglob("*.py") if "__pycache__" not in p.parts}


def table_rows() -> list[str]:
    """The module column of each row of the module table (rows that start with a path)."""
    return [line.split("|")[1] for line in DOC.read_text(encoding="utf-8").splitlines()
            if line.startswith("| `oddaemon/")]


def test_every_module_has_one_row_in_the_module_table():
    named = Counter(path for column in table_rows() for path in PATH.findall(column))
    missing = sorted(modules() - set(named))
    twice = sorted(path for path, count in named.items() if count > 1)
    assert not missing, f"{DOC.relative_to(REPO)}: modules missing from the module table: {missing}"
    assert not twice, f"{DOC.relative_to(REPO)}: modules with more than one row: {twice}"


def test_every_path_the_doc_names_exists():
    named = set(PATH.findall(DOC.read_text(encoding="utf-8")))
    gone = sorted(named - modules())
    assert not gone, f"{DOC.relative_to(REPO)} names modules that do not exist: {gone}"
