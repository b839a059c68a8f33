"""Failures that are not domain errors, as the caller, the log and the audit see them.

A domain error (dmp/errors.py) already says what was wrong. Anything else raised while
serving a call (the database refusing a write, a lost connection, a bug) becomes here one
:class:`DmpError` with its real status and a message the caller can show and an operator
can act on: never the SQL, its parameters or the driver's text, which stay in the
service's log, under a reference the message gives.

Storage exhaustion (SQLite's SQLITE_FULL, PostgreSQL's class 53 "insufficient resources")
is RESOURCE_EXHAUSTED; a database that cannot be reached or that dropped the connection,
or is busy, is UNAVAILABLE (retry later); a damaged SQLite file is DATA_LOSS; anything else
is INTERNAL.
"""

from __future__ import annotations

import logging
import sqlite3
import traceback
import uuid

import grpc
from sqlalchemy import exc as sa_exc

from dmp.errors import DataLoss, DmpError, ResourceExhausted, Unavailable

log = logging.getLogger("dmp.failures")

__all__ = ["audit_failure", "describe", "public_failure", "storage_error"]

# SQLite primary result codes (sqlite3 exposes the extended code of the error).
_SQLITE_FULL = 13
_SQLITE_UNAVAILABLE = {5, 6, 7, 8, 10, 14, 15}  # BUSY LOCKED NOMEM READONLY IOERR CANTOPEN PROTOCOL
_SQLITE_DAMAGED = {11, 26}  # CORRUPT NOTADB
# PostgreSQL SQLSTATEs.
_PG_FULL = {"53100"}  # disk_full
_PG_UNAVAILABLE = {
    "08": "connection failed",
    "57": "the database server ended the session",
    "53": "the database server is out of memory or connections",
    "40": "a conflicting transaction",
}

_FULL = (
    "storage full: the service's database has no room left (disk full or size limit"
    " reached) and nothing was written; its operator must free space on the database's"
    " volume, then the call can be retried"
)
_UNAVAILABLE = (
    "the service's database cannot be reached or dropped the connection ({what}); nothing"
    " was written: retry later; its operator finds the cause in the service's log under"
    " ref {ref}"
)
_DAMAGED = (
    "the service's database file is damaged; its operator must restore it from the last"
    " verified backup (the cause is in the service's log under ref {ref})"
)
_INTERNAL = (
    "internal error of the service (ref {ref}): its operator finds the cause in the"
    " service's log under this ref"
)


def _driver_error(exc: BaseException) -> BaseException:
    orig = getattr(exc, "orig", None)
    return orig if isinstance(orig, BaseException) else exc


def describe(exc: BaseException) -> str:
    """A failure for the service's log: the exception type, the driver's first line and
    code, never the SQL statement or its parameters (which hold patient data)."""
    orig = _driver_error(exc)
    first = str(orig).splitlines()[0] if str(orig) else ""
    what = f"{type(orig).__name__}: {first}" if first else type(orig).__name__
    name = getattr(orig, "sqlite_errorname", None)
    if name:
        what += f" [{name}]"
    sqlstate = getattr(orig, "sqlstate", None)
    if sqlstate:
        what += f" [SQLSTATE {sqlstate}]"
    return what


def _unavailable(what: str, ref: str) -> DmpError:
    return Unavailable(_UNAVAILABLE.format(what=what, ref=ref), reason="STORAGE_UNAVAILABLE")


def storage_error(exc: BaseException, ref: str) -> DmpError | None:
    """The public error of a database failure, or None if `exc` is not one."""
    orig = _driver_error(exc)
    if isinstance(orig, sqlite3.Error):
        code = getattr(orig, "sqlite_errorcode", None)
        primary = code & 0xFF if isinstance(code, int) else None
        if primary == _SQLITE_FULL:
            return ResourceExhausted(_FULL, reason="STORAGE_FULL")
        if primary in _SQLITE_DAMAGED:
            return DataLoss(_DAMAGED.format(ref=ref), reason="STORAGE_DAMAGED")
        if primary in _SQLITE_UNAVAILABLE:
            return _unavailable("busy or unreadable", ref)
        return None
    sqlstate = getattr(orig, "sqlstate", None)
    if isinstance(sqlstate, str) and sqlstate:
        if sqlstate in _PG_FULL:
            return ResourceExhausted(_FULL, reason="STORAGE_FULL")
        what = _PG_UNAVAILABLE.get(sqlstate[:2])
        if what is not None:
            return _unavailable(what, ref)
        return None
    lost = isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated
    if lost or isinstance(exc, sa_exc.OperationalError | sa_exc.TimeoutError):
        # A dropped connection has no SQLSTATE; a pool timeout means every connection is busy.
        what = "connection lost" if not isinstance(exc, sa_exc.TimeoutError) else "all busy"
        return _unavailable(what, ref)
    return None


def public_failure(exc: BaseException, where: str = "") -> DmpError:
    """The error to answer for `exc`, which is not a domain error; the cause is logged
    once here, under the ref the message gives."""
    ref = uuid.uuid4().hex[:12]
    error = storage_error(exc, ref)
    if error is None:
        error = DmpError(_INTERNAL.format(ref=ref))
        error.code = grpc.StatusCode.INTERNAL
    error.ref = ref
    # Where it happened (file and line of each frame), not the values it involved.
    frames = (
        "".join(traceback.format_tb(exc.__traceback__, limit=-8))
        if error.code is (grpc.StatusCode.INTERNAL)
        else ""
    )
    log.error(
        "%s failed with %s (ref %s): %s%s",
        where or "a call",
        error.code.name,
        ref,
        describe(exc),
        f"\n{frames}" if frames else "",
    )
    return error


def audit_failure(exc: BaseException, where: str) -> DmpError:
    """The error of an audit event that could not be written: UNAVAILABLE (the call must
    not go on untraced), RESOURCE_EXHAUSTED when the storage is full; logged once here."""
    ref = uuid.uuid4().hex[:12]
    error = storage_error(exc, ref)
    log.error("%s failed (ref %s): %s", where, ref, describe(exc))
    if isinstance(error, ResourceExhausted):
        out: DmpError = ResourceExhausted(
            f"audit trail unavailable: {error.message}", reason=error.reason
        )
    else:
        detail = (
            error.message
            if error is not None
            else f"its operator finds the cause in the service's log under ref {ref}"
        )
        out = Unavailable(f"audit trail unavailable: {detail}")
    out.ref = ref
    return out
