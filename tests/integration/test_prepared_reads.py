"""A statement compiled once and run on the driver's cursor (dmp/prepared.py) reads exactly
what SQLAlchemy's own execution reads: the same rows, in the same order, with the same
Python values and types (a SQLite boolean is a bool, not 0), on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, Select, bindparam, insert, select, tuple_

from dmp.db import make_engine, upgrade
from dmp.prepared import prepare
from node.app import MIGRATIONS
from node.integrity import hash_values
from node.models import RecordRow
from node.store import RECORDS

PATIENT = "180017512345608"


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    engine = make_engine(db_url)
    upgrade(engine, MIGRATIONS, "alembic_version_node")
    rows = [_row(n) for n in range(12)]
    with engine.begin() as connection:
        connection.execute(insert(RECORDS), rows)
    yield engine
    engine.dispose()


def _row(n: int) -> dict[str, Any]:
    values: dict[str, Any] = dict(
        id=f"rec-{n:02d}",
        patient_ins=PATIENT if n < 10 else "280017512345607",
        kind="document" if n % 2 else "observation",
        type_system="http://loinc.org",
        type_code=f"1148{n % 3}-4",
        type_display="Consultation note é",
        title=f"Compte rendu {n}",
        author_identity="urn:dmp:practitioner:10001",
        author_name="Dr Claire MARTIN",
        author_profession="doctor",
        organization="CHU de Rennes",
        created_us=1_700_000_000_000_000 + n,
        effective_us=1_700_000_000_000_000 + (n % 4) * 1000,
        status="current" if n % 5 else "superseded",
        version=1 + n % 2,
        supersedes=f"rec-{n - 1:02d}" if n % 2 else None,
        root_id=f"rec-{n:02d}",
        confidentiality="normal",
        hidden_from_patient=n % 3 == 0,
        revealed_us=1_700_000_000_500_000 if n == 3 else None,
        content_type="text/plain",
        size=n,
        sha256="0" * 64,
        fingerprint=f"f{n}",
        prescription_id=None,
        sealed=bytes([n, 0, 255]) if n % 4 == 0 else None,
    )
    values["row_hash"] = hash_values(values)
    return values


def _typed(rows: Any) -> list[list[tuple[type, Any]]]:
    return [[(type(value), value) for value in row] for row in rows]


STATEMENTS: dict[str, Select[Any]] = {
    "patient": select(RECORDS).where(RecordRow.patient_ins == bindparam("ins")),
    "in lists and limit": select(RECORDS)
    .where(
        RecordRow.patient_ins == bindparam("ins"),
        RecordRow.kind.in_(["document", "observation"]),
        RecordRow.type_code.in_(["11480-4", "11482-4"]),
        RecordRow.hidden_from_patient.is_(False),
    )
    .order_by(RecordRow.effective_us.desc(), RecordRow.id.desc())
    .limit(4),
    "after a cursor": select(RECORDS)
    .where(
        RecordRow.patient_ins == bindparam("ins"),
        tuple_(RecordRow.effective_us, RecordRow.id)
        < tuple_(bindparam("after_us"), bindparam("after_id")),
    )
    .order_by(RecordRow.effective_us.desc(), RecordRow.id.desc())
    .limit(20),
}


@pytest.mark.parametrize("shape", sorted(STATEMENTS))
def test_a_prepared_select_reads_what_sqlalchemy_reads(engine: Engine, shape: str) -> None:
    stmt = STATEMENTS[shape]
    params = {"ins": PATIENT, "after_us": 1_700_000_000_002_000, "after_id": "rec-06"}
    prepared = prepare(stmt, engine.dialect)
    with engine.connect() as connection:
        expected = list(connection.execute(stmt, params))
    with engine.connect() as connection:
        got = prepared.fetch(connection, params)
        again = prepared.fetch(connection, {**params, "ins": "280017512345607"})
    assert expected, "the statement must match rows for the comparison to mean anything"
    assert _typed(got) == _typed(expected)
    assert [row.id for row in got] == [row.id for row in expected]
    assert {row.patient_ins for row in again} <= {"280017512345607"}  # the new value is used
    if shape == "patient":
        assert len(again) == 2
    assert got[0]._fields == tuple(expected[0]._fields)


def test_a_prepared_select_reads_inside_the_connections_transaction(engine: Engine) -> None:
    """Begun by the caller, the prepared read sees that transaction's own writes."""
    stmt = select(RECORDS.c.id).where(RecordRow.patient_ins == bindparam("ins"))
    prepared = prepare(stmt, engine.dialect)
    with engine.connect() as connection:  # closed uncommitted: rolled back
        connection.begin()
        connection.execute(insert(RECORDS), [{**_row(20), "patient_ins": "380017512345606"}])
        assert [r.id for r in prepared.fetch(connection, {"ins": "380017512345606"})] == ["rec-20"]
    with engine.connect() as connection:
        assert prepared.fetch(connection, {"ins": "380017512345606"}) == []
