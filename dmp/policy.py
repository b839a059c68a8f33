"""The access policy of the federation: every access decision, as plain functions.

Both services ask it: the node for each read and write, the directory before it looks a
patient up or fans out. It decides from plain values (the verified access assertion, the
patient's signed directives, the profession matrix, the writer's identity) and answers
with a ReadScope, a refusal, or yes/no. No transport and no SQL here: the record
repository turns a ReadScope into the WHERE clause of its queries (node/scoping.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from dmp.directives import PatientDirectives
from dmp.errors import FailedPrecondition, PermissionDenied
from dmp.identity import Principal, Role
from dmp.purposes import Purpose

#: A record hidden from the patient becomes visible on its own after this long.
HIDDEN_FROM_PATIENT_US = 30 * 24 * 3600 * 1_000_000
PATIENT_NOTE = "patient-note"
#: The purpose of a patient's own access, and of a professional's emergency access.
SELF = Purpose.SELF.value
EMERGENCY = Purpose.EMERGENCY.value


class Asserted(Protocol):
    """What the policy reads of a verified access assertion: who, for which patient, why."""

    @property
    def subject(self) -> Principal: ...

    @property
    def patient_ins(self) -> str: ...

    @property
    def purpose_name(self) -> str: ...


@dataclass(frozen=True)
class Grant:
    kinds: frozenset[str]
    type_codes: frozenset[str]


class AccessMatrix:
    """Which kinds and type codes each profession reads (loaded by node/access_matrix.py)."""

    def __init__(self, grants: dict[str, Grant]) -> None:
        self.grants = grants

    def grant(self, profession: str) -> Grant:
        return self.grants.get(profession, Grant(frozenset(), frozenset()))


@dataclass(frozen=True)
class ReadScope:
    """What one call may see of one patient's records."""

    subject: Principal
    patient_ins: str
    #: For professionals: kinds and type codes readable (a record matching either).
    grant: Grant | None
    #: Masked record ids hidden from this professional, unless they wrote them.
    hidden_masked: frozenset[str]
    #: The patient's own view: hidden-until-revealed records are left out.
    patient_view: bool
    masked: frozenset[str]


def refuse_reader(assertion: Asserted, directives: PatientDirectives) -> None:
    """May the assertion's subject read this patient's record at all? The refusals the
    directory applies before any lookup, and each node again before it reads."""
    subject = assertion.subject
    if subject.role is Role.PATIENT:
        if subject.key != assertion.patient_ins:
            raise PermissionDenied("a patient reads only their own record")
        return
    if subject.role is not Role.PRACTITIONER:
        raise PermissionDenied(f"{subject.uri} may not read records")
    refuse_professional(subject, directives, emergency=assertion.purpose_name == EMERGENCY)


def decide_read(
    assertion: Asserted, directives: PatientDirectives, matrix: AccessMatrix
) -> ReadScope:
    """May the assertion's subject read this patient's records, and which? Refusals say why."""
    refuse_reader(assertion, directives)
    subject = assertion.subject
    if subject.role is Role.PATIENT:
        return ReadScope(
            subject, assertion.patient_ins, None, frozenset(), True, directives.masked_record_ids
        )
    grant = matrix.grant(subject.profession)
    if not grant.kinds and not grant.type_codes:
        raise PermissionDenied(f"the profession {subject.profession!r} reads no record kind")
    treating = directives.treating_rpps == subject.key
    hidden = frozenset() if treating else directives.masked_record_ids
    return ReadScope(
        subject, assertion.patient_ins, grant, hidden, False, directives.masked_record_ids
    )


def refuse_professional(
    professional: Principal, directives: PatientDirectives, *, emergency: bool = False
) -> None:
    """The patient's refusals of a professional: a block, an opposition, and for an
    emergency access a refusal of emergency access."""
    if professional.key in directives.blocked_rpps:
        raise PermissionDenied("the patient has blocked this professional's access to their record")
    if directives.opposed:
        raise PermissionDenied("the patient opposes access to their record by professionals")
    if emergency and directives.emergency_refused:
        raise PermissionDenied("the patient refuses emergency access to their record")


def check_write(writer: Principal, kind: str, directives: PatientDirectives) -> None:
    """Professionals write clinical records; a patient writes their own notes only."""
    if writer.role is Role.PATIENT:
        if writer.key != directives.patient_ins or kind != PATIENT_NOTE:
            raise PermissionDenied(
                "a patient writes only notes (kind patient-note) in their own record"
            )
    elif writer.role is Role.PRACTITIONER:
        if kind == PATIENT_NOTE:
            raise PermissionDenied("patient notes are written by the patient")
        refuse_professional(writer, directives)
    else:
        raise PermissionDenied(f"{writer.uri} may not write records: only professionals write")
    if directives.closed:
        raise FailedPrecondition("the patient's record is closed: nothing new is written")


def may_supersede(
    writer: Principal, author_identity: str, kind: str, type_code: str, matrix: AccessMatrix
) -> bool:
    """May `writer` replace this record with a new version (CSP R1111-51)?

    Only the record's author writes its new version: a record written by someone else, a
    record masked from the writer or hidden from the patient by its author is never
    retired by another; a patient's authored records are their own notes. A professional
    supersedes only within what their profession reads (the author keeps reading their
    own masked records, so masking never stops the author correcting a record).
    """
    if author_identity != writer.uri:
        return False
    if writer.role is Role.PATIENT:
        return kind == PATIENT_NOTE
    if writer.role is not Role.PRACTITIONER:
        return False
    grant = matrix.grant(writer.profession)
    return kind in grant.kinds or type_code in grant.type_codes


def check_history(assertion: Asserted | None) -> None:
    """A patient's access history is read by the patient, for themselves, only."""
    if (
        assertion is None
        or assertion.subject.role is not Role.PATIENT
        or assertion.purpose_name != SELF
    ):
        raise PermissionDenied("a patient's access history is for the patient only")


# -- the directory's own calls ----------------------------------------------------------------


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


def check_sets_directives(caller: Principal) -> None:
    """Directives are set by the patient, with their own certificate."""
    if caller.role is not Role.PATIENT:
        raise PermissionDenied("only the patient sets their directives")


#: Who may read witnessed audit heads: the federation's services (no personal data is in a
#: head, but its sizes tell how busy a service is).
WITNESS_READERS = frozenset({Role.NODE, Role.DIRECTORY})


def check_witness_submitter(caller: Principal, submitters: Role) -> None:
    """A witness keeps the heads of the services of one role."""
    if caller.role is not submitters:
        raise PermissionDenied(
            f"this service witnesses the audit heads of the {submitters.value}"
            f" identities only, not of {caller.uri}"
        )


def check_own_head(caller: Principal, signer: str) -> None:
    """A service sends the heads of its own audit log only."""
    if signer != caller.uri:
        raise PermissionDenied(
            f"{caller.uri} sent a tree head of {signer or 'no signer'}: a service"
            " sends only the heads of its own audit log"
        )


def check_witness_reader(caller: Principal) -> None:
    if caller.role not in WITNESS_READERS:
        raise PermissionDenied("witnessed audit heads are for the federation's services")


# -- e-prescription ---------------------------------------------------------------------------

#: Who prescribes (CSP: doctors, midwives and dentists, each within their field) and who
#: dispenses.
PRESCRIBERS = frozenset({"doctor", "midwife", "dentist"})
DISPENSERS = frozenset({"pharmacist"})
PRESCRIPTION_KIND = "prescription"
PRESCRIPTION_TYPE_CODE = "57833-6"


def may_prescribe(principal: Principal) -> bool:
    """Doctors, midwives and dentists prescribe."""
    return principal.role is Role.PRACTITIONER and principal.profession in PRESCRIBERS


def may_dispense(principal: Principal) -> bool:
    """Pharmacists dispense."""
    return principal.role is Role.PRACTITIONER and principal.profession in DISPENSERS


def may_read_prescription(
    subject: Principal, patient_ins: str, prescriber_rpps: str, matrix: AccessMatrix
) -> bool:
    """The patient reads their own prescriptions; pharmacists, the prescriber, and the
    professionals whose profession reads prescriptions read them (the directives aside)."""
    if subject.role is Role.PATIENT:
        return subject.key == patient_ins
    if subject.role is not Role.PRACTITIONER:
        return False
    if may_dispense(subject) or subject.key == prescriber_rpps:
        return True
    grant = matrix.grant(subject.profession)
    return PRESCRIPTION_KIND in grant.kinds or PRESCRIPTION_TYPE_CODE in grant.type_codes


def prescription_masked_from(
    subject: Principal, directives: PatientDirectives, record_id: str, prescriber_rpps: str
) -> bool:
    """Did the patient mask this prescription (its record, `record_id`) from `subject`? As
    for any masked record, from every professional but its prescriber and the patient's
    treating doctor."""
    return (
        subject.role is Role.PRACTITIONER
        and bool(record_id)
        and record_id in directives.masked_record_ids
        and subject.key not in (prescriber_rpps, directives.treating_rpps)
    )


def may_cancel(subject: Principal, prescriber_rpps: str) -> bool:
    """A prescription is cancelled by its prescriber only."""
    return subject.role is Role.PRACTITIONER and subject.key == prescriber_rpps


def check_prescribe(writer: Principal, directives: PatientDirectives) -> None:
    """A prescription is written by a prescriber, with their own certificate, as the
    patient's directives allow any write."""
    if not may_prescribe(writer):
        who = writer.profession or writer.role.value
        raise PermissionDenied(
            f"{writer.uri} ({who}) may not prescribe: only doctors, midwives and dentists do"
        )
    check_write(writer, PRESCRIPTION_KIND, directives)


def check_prescription_reader(
    assertion: Asserted,
    directives: PatientDirectives,
    prescriber_rpps: str,
    matrix: AccessMatrix,
) -> None:
    """May the assertion's subject read this patient's prescription? The refusals of any
    read (a block, an opposition, a refused emergency), then who reads prescriptions."""
    refuse_reader(assertion, directives)
    if not may_read_prescription(assertion.subject, assertion.patient_ins, prescriber_rpps, matrix):
        raise PermissionDenied(
            f"the profession {assertion.subject.profession!r} does not read prescriptions"
        )


def check_masked_prescription(
    subject: Principal, directives: PatientDirectives, record_id: str, prescriber_rpps: str
) -> None:
    """A prescription the patient masked is read by no other professional than its
    prescriber and the treating doctor, but a pharmacist to whom the patient gave its id
    (to dispense it)."""
    if not may_dispense(subject) and prescription_masked_from(
        subject, directives, record_id, prescriber_rpps
    ):
        raise PermissionDenied("the patient has masked this prescription from professionals")


def check_find_prescriptions(
    assertion: Asserted, directives: PatientDirectives, matrix: AccessMatrix
) -> None:
    """May the assertion's subject search this patient's prescriptions? As any read, for
    the patient and whoever reads prescriptions (each found one is then asked of
    may_read_prescription)."""
    refuse_reader(assertion, directives)
    subject = assertion.subject
    if subject.role is Role.PRACTITIONER and not may_read_prescription(
        subject, assertion.patient_ins, "", matrix
    ):
        raise PermissionDenied(f"the profession {subject.profession!r} does not read prescriptions")


def check_dispenser(assertion: Asserted, directives: PatientDirectives) -> None:
    """A dispensing (claim, release, dispense) is a pharmacist's, as the patient's
    directives allow both a read and a write of theirs."""
    subject = assertion.subject
    check_dispensing_profession(subject)
    refuse_reader(assertion, directives)
    check_write(subject, "dispensation", directives)


def check_dispensing_profession(subject: Principal) -> None:
    """Only pharmacists dispense (asked before anything of the prescription is looked up)."""
    if not may_dispense(subject):
        who = subject.profession or subject.role.value
        raise PermissionDenied(f"{subject.uri} ({who}) may not dispense: only pharmacists do")


def check_canceller(
    assertion: Asserted, directives: PatientDirectives, prescriber_rpps: str
) -> None:
    """A prescription is cancelled by its prescriber, as the directives allow them."""
    subject = assertion.subject
    if not may_cancel(subject, prescriber_rpps):
        raise PermissionDenied("a prescription is cancelled by its prescriber only")
    refuse_reader(assertion, directives)
