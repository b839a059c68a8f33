"""The SQLite file of a node or of the directory, before SQLite opens it.

- Private to the service's user: a new file is created mode 0600 (in a directory created
  0700) before SQLite opens it, and SQLite gives its `-wal` and `-shm` files the mode of
  the database file. Files an earlier version left readable by others are made 0600.
- Never a damaged database taken for a new one: SQLite opens an existing 0-byte file as a
  new empty database, so a node started on a truncated file would create a fresh schema
  and serve nothing, without a word. Only a file that does not exist is new; an existing
  empty one is refused unless the operator says to initialise it.

PostgreSQL databases and in-memory SQLite are left alone (an empty PostgreSQL database is
how an operator provisions one).
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from dmp.errors import FailedPrecondition

log = logging.getLogger("dmp.db")

FILE_MODE = 0o600
DIRECTORY_MODE = 0o700
#: The files SQLite keeps beside a database.
_COMPANIONS = ("-wal", "-shm", "-journal")


def sqlite_file(url: str) -> Path | None:
    """The database file of a sqlite:/// URL; None for other databases and :memory:."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        return None
    if not parsed.drivername.startswith("sqlite"):
        return None
    database = parsed.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database)


def private_directory(path: Path) -> None:
    """Create `path` (and missing parents) with mode 0700; an existing one is left as is."""
    if not path.is_dir():
        try:
            path.mkdir(parents=True, exist_ok=True, mode=DIRECTORY_MODE)
            os.chmod(path, DIRECTORY_MODE)  # mkdir's mode is masked by the umask
        except OSError as exc:
            raise FailedPrecondition(f"cannot create directory {path}: {exc.strerror}") from None


def prepare_sqlite(url: str, *, initialise: bool = False) -> None:
    """Make the SQLite file of `url` ready to open: created 0600 if it does not exist,
    refused (FailedPrecondition) if it exists and is empty, unless `initialise`."""
    path = sqlite_file(url)
    if path is None:
        return
    private_directory(path.parent)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        _create(path)
        return
    except OSError as exc:
        raise FailedPrecondition(f"cannot read database file {path}: {exc.strerror}") from None
    if size == 0 and not initialise:
        raise FailedPrecondition(
            f"the database file {path} exists but is empty (0 bytes): it may be a damaged or"
            " truncated database, which would be served as an empty one; restore it from a"
            " backup, or start with --initialise to make a new empty database in it"
        )
    for name in (path, *(Path(f"{path}{suffix}") for suffix in _COMPANIONS)):
        _make_private(name)


def _create(path: Path) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    except FileExistsError:
        return  # created meanwhile: another process is opening it, SQLite decides
    except OSError as exc:
        raise FailedPrecondition(f"cannot create database file {path}: {exc.strerror}") from None
    try:
        os.fchmod(fd, FILE_MODE)
    finally:
        os.close(fd)


def _make_private(path: Path) -> None:
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return
    if not mode & 0o077:
        return
    try:
        os.chmod(path, mode & ~0o077)
    except OSError as exc:
        log.warning(
            "%s is readable by other users (mode %o) and cannot be made private (%s): chmod 600 it",
            path,
            mode,
            exc.strerror,
        )
        return
    log.warning("%s was readable by other users (mode %o): made it private", path, mode)
