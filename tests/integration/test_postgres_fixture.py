"""The PostgreSQL fixtures really start a server and hand out usable databases."""

from __future__ import annotations

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url


def test_cluster_and_per_test_database(postgres_url: str, postgres_db_url: str) -> None:
    assert make_url(postgres_url).database == "postgres"
    assert make_url(postgres_db_url).database.startswith("test_")  # type: ignore[union-attr]

    engine = create_engine(postgres_url)
    try:
        with engine.connect() as connection:
            version = connection.execute(text("select version()")).scalar_one()
        assert "PostgreSQL" in version
    finally:
        engine.dispose()

    engine = create_engine(postgres_db_url)
    try:
        with engine.begin() as connection:
            connection.execute(text("create table item (id integer primary key, name text)"))
            connection.execute(
                text("insert into item (id, name) values (:id, :name)"),
                [{"id": 1, "name": "Dupont"}, {"id": 2, "name": "Élodie"}],
            )
        with engine.connect() as connection:
            rows = connection.execute(text("select id, name from item order by id")).all()
            current = connection.execute(text("select current_database()")).scalar_one()
        assert [tuple(row) for row in rows] == [(1, "Dupont"), (2, "Élodie")]
        assert current == make_url(postgres_db_url).database
    finally:
        engine.dispose()
