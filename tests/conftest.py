"""Shared pytest fixtures. Keep each group under its own heading."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from tests.postgres import MISSING_BINARIES, PostgresCluster, find_binaries

# -- PostgreSQL -----------------------------------------------------------------------------


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresCluster]:
    """A throwaway PostgreSQL cluster for the whole session (skipped without binaries).

    Under CI=true missing binaries fail the tests instead: CI must not silently skip them.
    """
    binaries = find_binaries()
    if binaries is None:
        if _in_ci():
            pytest.fail(
                "PostgreSQL binaries (initdb/pg_ctl) not found and CI=true: install PostgreSQL 15,"
                " CI must not skip the PostgreSQL-backed tests",
                pytrace=False,
            )
        pytest.skip(MISSING_BINARIES)
    cluster = PostgresCluster(binaries)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def postgres_url(postgres_cluster: PostgresCluster) -> str:
    """SQLAlchemy URL of the session cluster's `postgres` database."""
    return postgres_cluster.url()


@pytest.fixture
def postgres_db_url(postgres_cluster: PostgresCluster) -> Iterator[str]:
    """SQLAlchemy URL of a fresh database (test_<uuid>), dropped after the test."""
    name = f"test_{uuid.uuid4().hex}"
    url = postgres_cluster.create_database(name)
    try:
        yield url
    finally:
        postgres_cluster.drop_database(name)
