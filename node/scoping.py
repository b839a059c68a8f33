"""Record scoping: a ReadScope of the access policy as the WHERE clause of a record query.

The policy (dmp/policy.py) decides what a call may see; this module says it in SQL, so that
every query of the record repository is scoped and no code path can forget it.
"""

from __future__ import annotations

from typing import Any, TypeVar

from sqlalchemy import Select, bindparam, false, or_, select
from sqlalchemy.orm import aliased

from dmp.policy import HIDDEN_FROM_PATIENT_US, ReadScope
from node.models import RecordRow

S = TypeVar("S", bound=Select[Any])


def readable(stmt: S, scope: ReadScope, now: int) -> S:
    """Scope a query on records to what the scope allows: no code path can forget it."""
    return readable_shape(stmt, scope).params(readable_params(scope, now))


def readable_key(scope: ReadScope) -> tuple[Any, ...]:
    """What readable_shape depends on: scopes with equal keys share one statement."""
    hidden = scope.hidden_masked
    return (scope.patient_view, scope.grant, hidden, scope.subject.uri if hidden else "")


def readable_params(scope: ReadScope, now: int) -> dict[str, Any]:
    """The values of a readable_shape statement for this scope, at this time."""
    return {
        "scope_patient_ins": scope.patient_ins,
        "scope_hidden_before_us": now - HIDDEN_FROM_PATIENT_US,
    }


def readable_shape(stmt: S, scope: ReadScope) -> S:
    """readable() with the patient and the time left as bind parameters (readable_params):
    a statement built once serves every call with the same readable_key."""
    stmt = stmt.where(RecordRow.patient_ins == bindparam("scope_patient_ins"))
    if scope.patient_view:
        return stmt.where(
            or_(
                RecordRow.hidden_from_patient.is_(False),
                RecordRow.revealed_us.is_not(None),
                RecordRow.created_us <= bindparam("scope_hidden_before_us"),
            )
        )
    if scope.grant is None:
        return stmt.where(false())
    allowed = []
    if scope.grant.kinds:
        allowed.append(RecordRow.kind.in_(sorted(scope.grant.kinds)))
    if scope.grant.type_codes:
        allowed.append(RecordRow.type_code.in_(sorted(scope.grant.type_codes)))
    stmt = stmt.where(or_(*allowed))
    if scope.hidden_masked:
        masked = aliased(RecordRow)
        masked_roots = select(masked.root_id).where(
            masked.patient_ins == bindparam("scope_patient_ins"),
            masked.id.in_(sorted(scope.hidden_masked)),
        )
        stmt = stmt.where(
            or_(
                RecordRow.root_id.not_in(masked_roots),
                RecordRow.author_identity == scope.subject.uri,
            )
        )
    return stmt
