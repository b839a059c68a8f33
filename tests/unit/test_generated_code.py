"""The committed stubs under dmp/v1/ are exactly what scripts/gen_protos.py generates."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "dmp" / "v1"
IGNORED = {"__init__.py"}


def _load_generator() -> ModuleType:
    path = ROOT / "scripts" / "gen_protos.py"
    spec = importlib.util.spec_from_file_location("_dmp_gen_protos", path)
    assert spec is not None and spec.loader is not None, f"cannot load {path}"
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _files(directory: Path) -> dict[str, bytes]:
    """Relative path -> content of every file, without __init__.py and __pycache__."""
    return {
        path.relative_to(directory).as_posix(): path.read_bytes()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
        and path.name not in IGNORED
        and "__pycache__" not in path.relative_to(directory).parts
    }


def test_committed_stubs_match_a_fresh_generation(tmp_path: Path) -> None:
    _load_generator().generate(tmp_path)
    fresh = _files(tmp_path / "dmp" / "v1")
    committed = _files(COMMITTED)
    assert fresh, "the generator produced no file"

    problems = [
        f"{name}: differs from a fresh generation"
        for name in sorted(fresh.keys() & committed.keys())
        if fresh[name] != committed[name]
    ]
    problems += [
        f"{name}: generated but not committed" for name in sorted(fresh.keys() - committed.keys())
    ]
    problems += [
        f"{name}: committed but no longer generated"
        for name in sorted(committed.keys() - fresh.keys())
    ]
    assert not problems, (
        "dmp/v1/ is out of date with proto/: run `make proto` and commit.\n  "
        + "\n  ".join(f"dmp/v1/{problem}" for problem in problems)
    )
