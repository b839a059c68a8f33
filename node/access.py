"""The node's access check: the one place that decides who may do what with a record.

A read must carry a valid access assertion signed by the person it is for (the
professional or the patient), checked here whatever the transport certificate: the
directory's certificate alone reads nothing. The transport is either that person or the
directory relaying for them. The access policy (dmp/policy.py) then gives the ReadScope,
which node/scoping.py turns into the WHERE clause of every record query.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from dmp.assertion import AssertionVerifier, Operation, VerifiedAssertion
from dmp.audit.calls import AuditedCall
from dmp.clock import now_us
from dmp.directives import PatientDirectives
from dmp.errors import PermissionDenied
from dmp.identity import Principal, Role
from dmp.policy import AccessMatrix, ReadScope, check_write, decide_read, may_supersede
from dmp.server import CallContext
from node.directives import DirectiveCache


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
        *,
        audited: AuditedCall | None = None,
    ) -> tuple[Caller, ReadScope]:
        """Check a read: the assertion (for this operation, on this record), who carries
        it, the patient, the directives. The directory relays an assertion for the same
        operation only: the view's assertion serves a node's list, never a record read.
        With `audited`, the assertion's nonce is only reserved, and commits with that
        call's audit event (one durable commit for the read)."""
        transport = context.principal
        metadata = context.invocation_metadata()
        assertion = self._verifier.verify(
            metadata, operation, record_id, defer_nonce=audited is not None
        )
        if audited is not None:
            audited.nonce = assertion.nonce_due  # stored even if refused below
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

    def asserted(
        self,
        context: CallContext,
        operation: Operation.ValueType,
        patient_ins: str | None = None,
        record_id: str | None = None,
    ) -> VerifiedAssertion:
        """The verified assertion of a call (for this operation, on this prescription or
        record), carried by its signer or the directory, for `patient_ins` when given.
        What it allows is then asked of the policy by the use case (e-prescription)."""
        transport = context.principal
        assertion = self._verifier.verify(context.invocation_metadata(), operation, record_id)
        if assertion.subject.uri != transport.uri and transport.role is not Role.DIRECTORY:
            raise PermissionDenied(
                "an access assertion is used by its signer, or relayed by the directory only"
            )
        if patient_ins is not None and patient_ins != assertion.patient_ins:
            raise PermissionDenied("the access assertion is for another patient")
        return assertion

    def directives(
        self,
        context: CallContext,
        patient_ins: str,
        *,
        fail_closed: bool = True,
        relayed: bool = True,
    ) -> PatientDirectives:
        """The patient's directives: those the directory relays with its call when
        `relayed` (the call's assertion named this patient, so the directory knew whose
        directives to send), else from the directory's own answer for this patient."""
        carried = (
            context.invocation_metadata()
            if relayed and context.principal.role is Role.DIRECTORY
            else ()
        )
        return self._directives.get(patient_ins, carried, fail_closed=fail_closed)

    @property
    def matrix(self) -> AccessMatrix:
        return self._matrix

    def writer(self, context: CallContext, kind: str, patient_ins: str) -> Caller:
        """Check a write: with the writer's own certificate, as their role and the patient's
        directives allow."""
        writer = context.principal
        check_write(writer, kind, self._directives.get(patient_ins, fail_closed=False))
        return Caller(writer, writer)

    def may_supersede(
        self, writer: Principal, author_identity: str, kind: str, type_code: str
    ) -> bool:
        """Whether the writer may replace a stored record with a new version."""
        return may_supersede(writer, author_identity, kind, type_code, self._matrix)

    def now(self) -> int:
        return self._clock()
