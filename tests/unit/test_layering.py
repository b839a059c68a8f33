"""The layering of the code base, as its imports show it.

`dmp` is the shared library (contract, PKI, signed assertions, client, CLI): it imports
neither service. `node` and `directory` build on `dmp` and never on each other: what both
need belongs in `dmp`. Every import counts, at module level or inside a function.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def imported_packages(package: str) -> dict[str, set[str]]:
    """For each module of `package` (path relative to the repository): the top-level
    packages it imports."""
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        names: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(ROOT))] = names
    return found


def offenders(package: str, forbidden: set[str]) -> list[str]:
    return [
        f"{module} imports {', '.join(sorted(names & forbidden))}"
        for module, names in imported_packages(package).items()
        if names & forbidden
    ]


def test_the_walk_sees_imports() -> None:
    # The rule holds only if the walk finds imports at all: node imports dmp.
    assert any("dmp" in names for names in imported_packages("node").values())
    assert any("node" in names for names in imported_packages("node").values())


def test_the_shared_library_imports_no_service() -> None:
    assert offenders("dmp", {"node", "directory"}) == []


def test_the_node_never_imports_the_directory() -> None:
    assert offenders("node", {"directory"}) == []


def test_the_directory_never_imports_the_node() -> None:
    assert offenders("directory", {"node"}) == []


#: The repositories: they read and write rows within a scope or a session they are given,
#: and know nothing of who may do what or of audit (the use cases do).
REPOSITORIES = ("node/store.py", "directory/index.py", "directory/directives.py")
#: What a repository may not import: the audit, the access wiring, the use-case layer.
NOT_FOR_REPOSITORIES = (
    "dmp.audit",
    "dmp.unit_of_work",
    "dmp.server",
    "node.access",
    "node.service",
    "directory.access",
    "directory.service",
)


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_repositories_know_nothing_of_access_or_audit() -> None:
    found = {
        module: sorted(
            name
            for name in imported_modules(ROOT / module)
            if name.startswith(NOT_FOR_REPOSITORIES)
        )
        for module in REPOSITORIES
    }
    assert imported_modules(ROOT / "node/store.py")  # the walk sees the repository's imports
    assert {module: names for module, names in found.items() if names} == {}
