"""node/patient_traits.py on a real node database (SQLite and PostgreSQL): what writers give
is merged into the traits kept, a trait kept is never changed, a contradiction is refused,
and a row the merge leaves as it is is not written."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, event, select
from sqlalchemy.orm import Session

from dmp.db import make_engine, upgrade, writer
from dmp.errors import FailedPrecondition
from dmp.ins import make_ins
from dmp.patients import IDENTITY_CONFLICT, Traits
from node.app import MIGRATIONS
from node.patient_traits import PATIENTS, merge_all

ANNE = make_ins("1850275000001")
BRUNO = make_ins("1850275000002")


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    made = make_engine(db_url)
    upgrade(made, MIGRATIONS, "alembic_version_node")
    yield made
    made.dispose()


def _merge(engine: Engine, *given: Traits) -> list[str]:
    """Merge `given` in one write transaction; the statements it ran, by their verb."""
    statements: list[str] = []

    def seen(_conn: object, _cursor: object, statement: str, *_args: object) -> None:
        statements.append(statement.split(None, 1)[0].upper())

    event.listen(engine, "before_cursor_execute", seen)
    try:
        with Session(writer(engine)) as session, session.begin():
            merge_all(session, given, None, {}, 0)
    finally:
        event.remove(engine, "before_cursor_execute", seen)
    return statements


def _kept(engine: Engine) -> dict[str, tuple[object, ...]]:
    with engine.connect() as connection:
        rows = connection.execute(
            select(
                PATIENTS.c.ins,
                PATIENTS.c.birth_family_name,
                PATIENTS.c.given_names,
                PATIENTS.c.birth_date,
                PATIENTS.c.sex,
                PATIENTS.c.birthplace_code,
                PATIENTS.c.sealed,
            )
        )
        return {row[0]: tuple(row[1:]) for row in rows}


def test_traits_are_merged_never_changed_and_a_contradiction_is_refused(engine: Engine) -> None:
    _merge(
        engine,
        Traits(ANNE, "MARTIN", "", "1985-02-14", "", ""),
        Traits(BRUNO, "DURAND", "BRUNO", "1970-01-01", "M", "75056"),
    )
    assert _kept(engine) == {
        ANNE: ("MARTIN", "", "1985-02-14", "", "", None),
        BRUNO: ("DURAND", "BRUNO", "1970-01-01", "M", "75056", None),
    }

    # Anne's missing traits are added, twice in one batch; Bruno's row stays as it is.
    _merge(
        engine,
        Traits(ANNE, "MARTIN", "ANNE", "", "", ""),
        Traits(ANNE, "", "", "1985-02-14", "F", "2A004"),
        Traits(BRUNO, "DURAND", "", "1970-01-01", "", ""),
    )
    assert _kept(engine) == {
        ANNE: ("MARTIN", "ANNE", "1985-02-14", "F", "2A004", None),
        BRUNO: ("DURAND", "BRUNO", "1970-01-01", "M", "75056", None),
    }

    # Nothing new: the rows are read (and locked), not written.
    statements = _merge(
        engine, Traits(ANNE, "MARTIN", "ANNE", "", "F", ""), Traits(BRUNO, "", "", "", "M", "")
    )
    assert "UPDATE" not in statements and "INSERT" not in statements
    assert "SELECT" in statements

    # A contradiction is refused, and the transaction writes nothing.
    with pytest.raises(FailedPrecondition) as refused:
        _merge(engine, Traits(BRUNO, "DURAND", "BRUNO", "1971-01-01", "M", ""))
    assert refused.value.reason == IDENTITY_CONFLICT
    assert _kept(engine)[BRUNO] == ("DURAND", "BRUNO", "1970-01-01", "M", "75056", None)
