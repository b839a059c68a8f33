"""The directory's access check: who may ask what, decided before any lookup.

Reads of patient data carry an access assertion signed by the person asking, who must also
be the one connected (the directory is not relayed). The directory enforces what it can of
the patient's directives before fanning out; each node checks everything again.
"""

from __future__ import annotations

from directory.directives import DirectiveStore
from dmp.assertion import AssertionVerifier, Operation, VerifiedAssertion
from dmp.directives import PatientDirectives
from dmp.errors import PermissionDenied
from dmp.identity import Principal, Role
from dmp.server import CallContext
from node.policy import refuse_professional


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
    ) -> tuple[VerifiedAssertion, PatientDirectives, bytes | None]:
        """The caller's verified assertion (for this operation, on this record) and the
        patient's directives, or a refusal."""
        assertion = self._verifier.verify(context.invocation_metadata(), operation, record_id)
        if assertion.subject.uri != context.principal.uri:
            raise PermissionDenied("an access assertion is used by its signer only")
        if patient_ins is not None and patient_ins != assertion.patient_ins:
            raise PermissionDenied("the access assertion is for another patient")
        subject = assertion.subject
        directives, signed = self._directives.current(assertion.patient_ins)
        if subject.role is Role.PATIENT:
            if subject.key != assertion.patient_ins:
                raise PermissionDenied("a patient reads only their own record")
        else:
            refuse_professional(subject, assertion, directives)
        return assertion, directives, signed


def check_register(caller: Principal) -> None:
    if caller.role is not Role.PRACTITIONER:
        raise PermissionDenied("only professionals register patient identities")


def check_node(caller: Principal) -> str:
    """Node-only calls; returns the region of the calling node's certificate."""
    if caller.role is not Role.NODE:
        raise PermissionDenied("only a regional node may make this call")
    return caller.key


def check_operator(caller: Principal) -> None:
    if caller.role is not Role.DIRECTORY:
        raise PermissionDenied(
            "identity conflicts are for the national operator (directory identity)"
        )


def check_own_directives(caller: Principal, patient_ins: str) -> None:
    """A patient reads and changes their own directives; nodes read them."""
    if caller.role is Role.NODE:
        return
    if caller.role is Role.PATIENT and caller.key == patient_ins:
        return
    raise PermissionDenied("only the patient (and the nodes) read a patient's directives")
