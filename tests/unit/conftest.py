"""Fixtures for unit tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from dmp.pki import Pki


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    """A fresh federation PKI (CA and empty CRL) of the test's own."""
    return Pki.init(tmp_path / "pki")
