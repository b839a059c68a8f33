"""The directory's access check: who may ask what, decided before any lookup.

Reads of patient data carry an access assertion signed by the person asking, who must also
be the one connected (the directory is not relayed). The directory enforces what it can of
the patient's directives (dmp/policy.py) before fanning out; each node checks everything
again.
"""

from __future__ import annotations

from directory.directives import DirectiveStore
from directory.relay import Metadata, forward_assertion, forward_metadata
from dmp.assertion import AssertionVerifier, Operation, VerifiedAssertion
from dmp.audit.calls import AuditedCall
from dmp.directives import PatientDirectives
from dmp.errors import PermissionDenied
from dmp.policy import refuse_reader
from dmp.server import CallContext


class DirectoryAccess:
    def __init__(self, verifier: AssertionVerifier, directives: DirectiveStore) -> None:
        self._verifier = verifier
        self._directives = directives

    def reader(
        self,
        context: CallContext,
        operation: Operation.ValueType,
        patient_ins: str | None = None,
        record_id: str | None = None,
        *,
        audited: AuditedCall | None = None,
    ) -> tuple[VerifiedAssertion, PatientDirectives, bytes | None]:
        """The caller's verified assertion (for this operation, on this record) and the
        patient's directives, or a refusal. With `audited`, the assertion's nonce is only
        reserved, and commits with that call's audit event."""
        assertion = self._signed_by_caller(context, operation, record_id, audited)
        if patient_ins is not None and patient_ins != assertion.patient_ins:
            raise PermissionDenied("the access assertion is for another patient")
        directives, signed = self._directives.current(assertion.patient_ins)
        refuse_reader(assertion, directives)
        return assertion, directives, signed

    def _signed_by_caller(
        self,
        context: CallContext,
        operation: Operation.ValueType,
        record_id: str | None,
        audited: AuditedCall | None = None,
    ) -> VerifiedAssertion:
        assertion = self._verifier.verify(
            context.invocation_metadata(), operation, record_id, defer_nonce=audited is not None
        )
        if audited is not None:
            audited.nonce = assertion.nonce_due  # stored even if refused below
        if assertion.subject.uri != context.principal.uri:
            raise PermissionDenied("an access assertion is used by its signer only")
        return assertion

    def relay(
        self,
        context: CallContext,
        audited: AuditedCall,
        operation: Operation.ValueType,
        patient_ins: str | None = None,
        record_id: str | None = None,
    ) -> Metadata:
        """Check a read, name its caller in the call's audit, and give what travels with
        it to the nodes (directory/relay.py)."""
        assertion, _, signed = self.reader(
            context, operation, patient_ins, record_id, audited=audited
        )
        audited.caller(assertion)
        return forward_metadata(assertion, signed, audited.request_id)

    def relay_act(
        self,
        context: CallContext,
        audited: AuditedCall,
        operation: Operation.ValueType,
        record_id: str,
    ) -> Metadata:
        """relay() for an act on one prescription, whose assertion may name no patient (a
        pharmacist who scanned the id does not know the INS): then the directives are left
        to the owning node, which takes the patient from the prescription it holds."""
        assertion = self._signed_by_caller(context, operation, record_id)
        if assertion.patient_ins:
            directives, signed = self._directives.current(assertion.patient_ins)
            refuse_reader(assertion, directives)
            audited.caller(assertion)
            return forward_metadata(assertion, signed, audited.request_id)
        audited.caller(assertion)
        return forward_assertion(assertion, audited.request_id)
