"""The access policy a node applies to the person a call is for.

Decides from the verified assertion (who, which patient, why), the patient's signed
directives and the profession matrix; answers with a ReadScope that node/access.py turns
into the WHERE clause of every record query, or refuses.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from dmp.assertion import VerifiedAssertion
from dmp.directives import PatientDirectives
from dmp.errors import FailedPrecondition, PermissionDenied
from dmp.identity import PROFESSIONS, Principal, Role
from dmp.records import KIND_VALUES

DEFAULT_MATRIX_PATH = Path(__file__).with_name("access_matrix.json")
#: A record hidden from the patient becomes visible on its own after this long.
HIDDEN_FROM_PATIENT_US = 30 * 24 * 3600 * 1_000_000
PATIENT_NOTE = "patient-note"


@dataclass(frozen=True)
class Grant:
    kinds: frozenset[str]
    type_codes: frozenset[str]


class AccessMatrix:
    """Which kinds and type codes each profession reads."""

    def __init__(self, grants: dict[str, Grant]) -> None:
        self.grants = grants

    @classmethod
    def load(cls, path: Path = DEFAULT_MATRIX_PATH) -> AccessMatrix:
        try:
            document = json.loads(path.read_text())
            professions = document["professions"]
            grants = {
                profession: Grant(
                    kinds=frozenset(entry.get("kinds", ())),
                    type_codes=frozenset(entry.get("type_codes", ())),
                )
                for profession, entry in professions.items()
            }
        except (OSError, ValueError, KeyError, AttributeError, TypeError) as exc:
            raise FailedPrecondition(f"cannot read the access matrix {path}: {exc}") from None
        for profession, grant in grants.items():
            if profession not in PROFESSIONS:
                raise FailedPrecondition(f"access matrix {path}: unknown profession {profession!r}")
            unknown = grant.kinds - set(KIND_VALUES)
            if unknown:
                raise FailedPrecondition(f"access matrix {path}: unknown kinds {sorted(unknown)}")
        return cls(grants)

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


def decide_read(
    assertion: VerifiedAssertion, directives: PatientDirectives, matrix: AccessMatrix
) -> ReadScope:
    """May the assertion's subject read this patient's records, and which? Refusals say why."""
    subject = assertion.subject
    if subject.role is Role.PATIENT:
        if subject.key != assertion.patient_ins:
            raise PermissionDenied("a patient reads only their own record")
        return ReadScope(
            subject, assertion.patient_ins, None, frozenset(), True, directives.masked_record_ids
        )
    if subject.role is not Role.PRACTITIONER:
        raise PermissionDenied(f"{subject.uri} may not read records")
    refuse_professional(subject, assertion, directives)
    grant = matrix.grant(subject.profession)
    if not grant.kinds and not grant.type_codes:
        raise PermissionDenied(f"the profession {subject.profession!r} reads no record kind")
    treating = directives.treating_rpps == subject.key
    hidden = frozenset() if treating else directives.masked_record_ids
    return ReadScope(
        subject, assertion.patient_ins, grant, hidden, False, directives.masked_record_ids
    )


def refuse_professional(
    subject: Principal, assertion: VerifiedAssertion, directives: PatientDirectives
) -> None:
    """The patient's refusals, checked by the directory before fanning out and by each node."""
    if subject.key in directives.blocked_rpps:
        raise PermissionDenied("the patient has blocked this professional's access to their record")
    if directives.opposed:
        raise PermissionDenied("the patient opposes access to their record by professionals")
    if assertion.emergency and directives.emergency_refused:
        raise PermissionDenied("the patient refuses emergency access to their record")


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
        if writer.key in directives.blocked_rpps:
            raise PermissionDenied(
                "the patient has blocked this professional's access to their record"
            )
        if directives.opposed:
            raise PermissionDenied("the patient opposes access to their record by professionals")
    else:
        raise PermissionDenied(f"{writer.uri} may not write records: only professionals write")
    if directives.closed:
        raise FailedPrecondition("the patient's record is closed: nothing new is written")
