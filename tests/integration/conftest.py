"""Fixtures for integration tests: one PKI per session, databases per test.

The access-policy modules (test_access_policy_*.py) share `fed`, a federation of their own
per module (tests/integration/access_federation.py), and `target`, a patient with two
records in it. Other modules that name a fixture `fed` define their own, which wins.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.federation import make_pki
from tests.integration.access_federation import Fed, K, Target, record, running_access_federation
from tests.postgres import PostgresCluster


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


@pytest.fixture
def databases(
    postgres_cluster: PostgresCluster, tmp_path: Path
) -> Iterator[Callable[[str, str], str]]:
    """Make databases by engine and name, for tests that cross engines (a SQLite node's
    data into PostgreSQL and back): SQLite files, PostgreSQL databases dropped after."""
    made: list[str] = []

    def make(kind: str, name: str) -> str:
        if kind == "sqlite":
            return f"sqlite:///{tmp_path / f'{name}.db'}"
        database = f"t_{uuid.uuid4().hex[:12]}_{name}"
        made.append(database)
        return str(postgres_cluster.create_database(database))

    yield make
    for database in made:
        postgres_cluster.drop_database(database)


# -- the access-policy federation -----------------------------------------------------------


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fed]:
    with running_access_federation(tmp_path_factory.mktemp("access-policy")) as federation:
        yield federation


@pytest.fixture(scope="module")
def target(fed: Fed) -> Target:
    ins = fed.new_patient()
    doc = fed.put("11", record(ins, f"target-doc-{ins}"))
    rx = fed.put("53", record(ins, f"target-rx-{ins}", K.RECORD_KIND_PRESCRIPTION, "57833-6"))
    fed.wait_fragments(ins, {"11": 1, "53": 1})
    return Target(ins, doc, rx)
