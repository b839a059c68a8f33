"""Fixtures for integration tests: one PKI per session, databases per test."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.federation import make_pki


@pytest.fixture(scope="session")
def pki_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("pki")
    make_pki(directory)
    return directory


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The same tests against a SQLite file and against a real PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'node.db'}"
    else:
        yield request.getfixturevalue("postgres_db_url")


@pytest.fixture(params=["sqlite", "postgresql"])
def db_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[str], str]]:
    """Make databases by name, as SQLite files or as PostgreSQL databases (dropped after)."""
    if request.param == "sqlite":
        yield lambda name: f"sqlite:///{tmp_path / f'{name}.db'}"
        return
    cluster = request.getfixturevalue("postgres_cluster")
    made: list[str] = []

    def make(name: str) -> str:
        database = f"t_{uuid.uuid4().hex[:12]}_{name}".replace("-", "_")
        made.append(database)
        return str(cluster.create_database(database))

    yield make
    for database in made:
        cluster.drop_database(database)
