"""The node's access check: the one place that decides who may do what with a record.

A read must carry a valid access assertion signed by the person it is for (the
professional or the patient), checked here whatever the transport certificate: the
directory's certificate alone reads nothing. The transport is either that person or the
directory relaying for them. The patient's directives and the profession matrix then give
the ReadScope, which `readable` turns into the WHERE clause of every record query.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import Select, bindparam, false, or_, select
from sqlalchemy.orm import aliased

from dmp.assertion import AssertionVerifier, Operation, VerifiedAssertion
from dmp.clock import now_us
from dmp.errors import PermissionDenied
from dmp.identity import Principal, Role
from dmp.server import CallContext
from node.directives import DirectiveCache
from node.models import RecordRow
from node.policy import (
    HIDDEN_FROM_PATIENT_US,
    AccessMatrix,
    ReadScope,
    check_write,
    decide_read,
    may_supersede,
)

S = TypeVar("S", bound=Select[Any])


@dataclass(frozen=True, slots=True)
class Caller:
    """Who a call is for (`subject`), who carried it (`transport`), and why."""

    subject: Principal
    transport: Principal
    assertion: VerifiedAssertion | None = None

    @property
    def relayed(self) -> bool:
        return self.subject != self.transport


class NodeAccess:
    def __init__(
        self,
        verifier: AssertionVerifier,
        directives: DirectiveCache,
        matrix: AccessMatrix,
        clock: Callable[[], int] = now_us,
    ) -> None:
        self._verifier = verifier
        self._directives = directives
        self._matrix = matrix
        self._clock = clock

    def reader(
        self,
        context: CallContext,
        operation: Operation.ValueType,
        patient_ins: str | None = None,
        record_id: str | None = None,
    ) -> tuple[Caller, ReadScope]:
        """Check a read: the assertion (for this operation, on this record), who carries
        it, the patient, the directives. The directory relays an assertion for the same
        operation only: the view's assertion serves a node's list, never a record read."""
        transport = context.principal
        metadata = context.invocation_metadata()
        assertion = self._verifier.verify(metadata, operation, record_id)
        if assertion.subject.uri != transport.uri and transport.role is not Role.DIRECTORY:
            raise PermissionDenied(
                "an access assertion is used by its signer, or relayed by the directory only"
            )
        if patient_ins is not None and patient_ins != assertion.patient_ins:
            raise PermissionDenied("the access assertion is for another patient")
        relayed = metadata if transport.role is Role.DIRECTORY else ()
        directives = self._directives.get(assertion.patient_ins, relayed)
        scope = decide_read(assertion, directives, self._matrix)
        return Caller(assertion.subject, transport, assertion), scope

    def writer(self, context: CallContext, kind: str, patient_ins: str) -> Caller:
        """Check a write: with the writer's own certificate, as their role and the patient's
        directives allow."""
        writer = context.principal
        check_write(writer, kind, self._directives.get(patient_ins, fail_closed=False))
        return Caller(writer, writer)

    def superseder(self, context: CallContext) -> Callable[[RecordRow], bool]:
        """Whether the calling writer may replace a stored record with a new version."""
        writer = context.principal

        def check(previous: RecordRow) -> bool:
            return may_supersede(
                writer, previous.author_identity, previous.kind, previous.type_code, self._matrix
            )

        return check

    def now(self) -> int:
        return self._clock()


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
