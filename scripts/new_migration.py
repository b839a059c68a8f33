"""Write a new Alembic revision for the node or the directory from its models.

Usage: python scripts/new_migration.py node|directory REV_ID "message"

Autogenerates against a scratch SQLite database brought to the current head, so the
revision holds exactly what the models add.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from alembic import command
from alembic.config import Config

from dmp.db import make_engine, upgrade

ROOT = Path(__file__).resolve().parent.parent


def main(service: str, rev_id: str, message: str) -> None:
    location = ROOT / service / "migrations"
    version_table = f"alembic_version_{service}"
    with tempfile.TemporaryDirectory() as scratch:
        engine = make_engine(f"sqlite:///{scratch}/scratch.db")
        upgrade(engine, location, version_table)
        config = Config()
        config.set_main_option("script_location", str(location))
        config.set_main_option(
            "file_template", "%%(year)d_%%(month).2d_%%(day).2d_%%(rev)s_%%(slug)s"
        )
        config.attributes["version_table"] = version_table
        with engine.begin() as connection:
            config.attributes["connection"] = connection
            command.revision(config, message=message, autogenerate=True, rev_id=rev_id)
        engine.dispose()


if __name__ == "__main__":
    main(*sys.argv[1:4])
