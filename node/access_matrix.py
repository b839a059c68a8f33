"""The node's profession matrix, read from its JSON file (node/access_matrix.json)."""

from __future__ import annotations

import json
from pathlib import Path

from dmp.errors import FailedPrecondition
from dmp.identity import PROFESSIONS
from dmp.policy import AccessMatrix, Grant
from dmp.records import KIND_VALUES

DEFAULT_MATRIX_PATH = Path(__file__).with_name("access_matrix.json")


def load_matrix(path: Path = DEFAULT_MATRIX_PATH) -> AccessMatrix:
    """The matrix of this file; FailedPrecondition when it cannot be read or names an
    unknown profession or kind."""
    try:
        document = json.loads(path.read_text())
        professions = document["professions"]
        grants = {
            profession: Grant(
                kinds=frozenset(entry.get("kinds", ())),
                type_codes=frozenset(entry.get("type_codes", ())),
            )
            for profession, entry in professions.items()
        }
    except (OSError, ValueError, KeyError, AttributeError, TypeError) as exc:
        raise FailedPrecondition(f"cannot read the access matrix {path}: {exc}") from None
    for profession, grant in grants.items():
        if profession not in PROFESSIONS:
            raise FailedPrecondition(f"access matrix {path}: unknown profession {profession!r}")
        unknown = grant.kinds - set(KIND_VALUES)
        if unknown:
            raise FailedPrecondition(f"access matrix {path}: unknown kinds {sorted(unknown)}")
    return AccessMatrix(grants)
