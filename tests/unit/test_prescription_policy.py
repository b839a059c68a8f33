"""Who prescribes, dispenses, reads and cancels prescriptions (dmp/policy.py), every row."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from dmp.directives import PatientDirectives
from dmp.errors import FailedPrecondition, PermissionDenied
from dmp.identity import PROFESSIONS, Principal, Role
from dmp.ins import make_ins
from dmp.policy import (
    check_canceller,
    check_dispenser,
    check_find_prescriptions,
    check_masked_prescription,
    check_prescribe,
    check_prescription_reader,
    may_cancel,
    may_dispense,
    may_prescribe,
    may_read_prescription,
    prescription_masked_from,
)
from dmp.v1 import access_pb2
from node.access_matrix import load_matrix

MATRIX = load_matrix()
INS = make_ins("1800175000001")
OTHER_INS = make_ins("2920133012345")
PRESCRIBER = "10000000001"
RPPS = {
    "doctor": "10000000011",
    "pharmacist": "10000000013",
    "nurse": "10000000014",
    "midwife": "10000000015",
    "dentist": "10000000016",
    "physiotherapist": "10000000017",
}


def pro(profession: str, rpps: str | None = None) -> Principal:
    return Principal(Role.PRACTITIONER, rpps or RPPS[profession], f"{profession} X", profession)


PATIENT = Principal(Role.PATIENT, INS, "Jean DUPONT")
OTHER_PATIENT = Principal(Role.PATIENT, OTHER_INS, "Marie LEROY")
NODE = Principal(Role.NODE, "11")
DIRECTORY = Principal(Role.DIRECTORY)


@dataclass(frozen=True)
class Asserted:
    subject: Principal
    patient_ins: str = INS
    purpose_name: str = "CARE"


NONE = PatientDirectives(INS)


# -- who prescribes, who dispenses --------------------------------------------------------


@pytest.mark.parametrize("profession", PROFESSIONS)
def test_who_prescribes(profession: str) -> None:
    assert may_prescribe(pro(profession)) is (profession in {"doctor", "midwife", "dentist"})


@pytest.mark.parametrize("profession", PROFESSIONS)
def test_who_dispenses(profession: str) -> None:
    assert may_dispense(pro(profession)) is (profession == "pharmacist")


@pytest.mark.parametrize("who", [PATIENT, NODE, DIRECTORY])
def test_no_one_else_prescribes_or_dispenses(who: Principal) -> None:
    assert not may_prescribe(who) and not may_dispense(who)


# -- who reads ----------------------------------------------------------------------------

READS = [
    (PATIENT, True),
    (OTHER_PATIENT, False),
    (pro("doctor", PRESCRIBER), True),  # the prescriber
    (pro("pharmacist"), True),
    (pro("doctor"), True),  # the matrix: doctors read prescriptions
    (pro("nurse"), True),
    (pro("midwife"), True),
    (pro("dentist"), True),
    (pro("physiotherapist"), True),
    (NODE, False),
    (DIRECTORY, False),
]


@pytest.mark.parametrize(("who", "reads"), READS, ids=lambda v: getattr(v, "uri", str(v)))
def test_who_reads_a_prescription(who: Principal, reads: bool) -> None:
    assert may_read_prescription(who, INS, PRESCRIBER, MATRIX) is reads


def test_a_profession_whose_matrix_has_no_prescriptions_reads_them_not() -> None:
    from dmp.policy import AccessMatrix, Grant

    matrix = AccessMatrix({"nurse": Grant(frozenset({"allergy"}), frozenset())})
    assert not may_read_prescription(pro("nurse"), INS, PRESCRIBER, matrix)
    # ... unless it is the prescriber's own, or the reader a pharmacist.
    assert may_read_prescription(pro("pharmacist"), INS, PRESCRIBER, matrix)
    with pytest.raises(PermissionDenied, match="does not read prescriptions"):
        check_prescription_reader(Asserted(pro("nurse")), NONE, PRESCRIBER, matrix)
    with pytest.raises(PermissionDenied, match="does not read prescriptions"):
        check_find_prescriptions(Asserted(pro("nurse")), NONE, matrix)


def test_a_patient_reads_their_own_prescriptions_only() -> None:
    check_prescription_reader(Asserted(PATIENT, purpose_name="SELF"), NONE, PRESCRIBER, MATRIX)
    with pytest.raises(PermissionDenied, match="only their own"):
        check_prescription_reader(
            Asserted(OTHER_PATIENT, purpose_name="SELF"), NONE, PRESCRIBER, MATRIX
        )


# -- who cancels --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("who", "cancels"),
    [
        (pro("doctor", PRESCRIBER), True),
        (pro("doctor"), False),
        (pro("pharmacist"), False),
        (PATIENT, False),
        (NODE, False),
    ],
    ids=lambda v: getattr(v, "uri", str(v)),
)
def test_who_cancels(who: Principal, cancels: bool) -> None:
    assert may_cancel(who, PRESCRIBER) is cancels
    if cancels:
        check_canceller(Asserted(who), NONE, PRESCRIBER)
    else:
        with pytest.raises(PermissionDenied, match="by its prescriber only"):
            check_canceller(Asserted(who), NONE, PRESCRIBER)


# -- the checks, with the patient's directives ------------------------------------------

BLOCKED = PatientDirectives(INS, blocked_rpps=frozenset({RPPS["pharmacist"], PRESCRIBER}))
OPPOSED = PatientDirectives(INS, state=access_pb2.RECORD_STATE_OPPOSED)
NO_EMERGENCY = PatientDirectives(INS, emergency_refused=True)
CLOSED = PatientDirectives(INS, state=access_pb2.RECORD_STATE_CLOSED)


def test_a_prescriber_prescribes_as_directives_allow() -> None:
    check_prescribe(pro("doctor", PRESCRIBER), NONE)
    check_prescribe(pro("midwife"), NONE)
    check_prescribe(pro("dentist"), NONE)
    with pytest.raises(PermissionDenied, match="has blocked"):
        check_prescribe(pro("doctor", PRESCRIBER), BLOCKED)
    with pytest.raises(PermissionDenied, match="opposes"):
        check_prescribe(pro("doctor", PRESCRIBER), OPPOSED)
    with pytest.raises(FailedPrecondition, match="closed"):
        check_prescribe(pro("doctor", PRESCRIBER), CLOSED)


@pytest.mark.parametrize("who", [pro("pharmacist"), pro("nurse"), PATIENT, NODE])
def test_others_do_not_prescribe(who: Principal) -> None:
    with pytest.raises(PermissionDenied, match="may not prescribe"):
        check_prescribe(who, NONE)


def test_a_pharmacist_dispenses_as_directives_allow() -> None:
    pharmacist = pro("pharmacist")
    check_dispenser(Asserted(pharmacist), NONE)
    with pytest.raises(PermissionDenied, match="has blocked"):
        check_dispenser(Asserted(pharmacist), BLOCKED)
    with pytest.raises(PermissionDenied, match="opposes"):
        check_dispenser(Asserted(pharmacist), OPPOSED)
    with pytest.raises(PermissionDenied, match="refuses emergency"):
        check_dispenser(Asserted(pharmacist, purpose_name="EMERGENCY"), NO_EMERGENCY)
    with pytest.raises(FailedPrecondition, match="closed"):
        check_dispenser(Asserted(pharmacist), CLOSED)


@pytest.mark.parametrize("who", [pro("doctor", PRESCRIBER), pro("nurse"), PATIENT])
def test_others_do_not_dispense(who: Principal) -> None:
    with pytest.raises(PermissionDenied, match="may not dispense"):
        check_dispenser(Asserted(who), NONE)


def test_a_blocked_reader_reads_no_prescription() -> None:
    with pytest.raises(PermissionDenied, match="has blocked"):
        check_prescription_reader(Asserted(pro("pharmacist")), BLOCKED, PRESCRIBER, MATRIX)
    with pytest.raises(PermissionDenied, match="has blocked"):
        check_find_prescriptions(Asserted(pro("pharmacist")), BLOCKED, MATRIX)
    with pytest.raises(PermissionDenied, match="opposes"):
        check_prescription_reader(Asserted(pro("doctor")), OPPOSED, PRESCRIBER, MATRIX)
    # The patient's own reads are theirs whatever they decided about professionals.
    check_prescription_reader(Asserted(PATIENT, purpose_name="SELF"), OPPOSED, PRESCRIBER, MATRIX)
    check_find_prescriptions(Asserted(PATIENT, purpose_name="SELF"), OPPOSED, MATRIX)


def test_a_blocked_prescriber_cancels_nothing() -> None:
    with pytest.raises(PermissionDenied, match="has blocked"):
        check_canceller(Asserted(pro("doctor", PRESCRIBER)), BLOCKED, PRESCRIBER)


MASKED = PatientDirectives(
    INS, masked_record_ids=frozenset({"rec-1"}), treating_rpps=RPPS["doctor"]
)


@pytest.mark.parametrize(
    ("who", "masked"),
    [
        (pro("doctor", "10000000021"), True),
        (pro("pharmacist"), True),
        (pro("nurse"), True),
        (pro("doctor", PRESCRIBER), False),
        (pro("doctor"), False),  # the treating doctor
        (PATIENT, False),
    ],
    ids=lambda v: getattr(v, "uri", str(v)),
)
def test_a_masked_prescription_is_hidden_as_any_masked_record(who: Principal, masked: bool) -> None:
    assert prescription_masked_from(who, MASKED, "rec-1", PRESCRIBER) is masked
    assert not prescription_masked_from(who, MASKED, "rec-2", PRESCRIBER)
    assert not prescription_masked_from(who, MASKED, "", PRESCRIBER)


def test_a_masked_prescription_is_read_by_the_pharmacist_given_its_id_only() -> None:
    check_masked_prescription(pro("pharmacist"), MASKED, "rec-1", PRESCRIBER)
    check_masked_prescription(pro("doctor", PRESCRIBER), MASKED, "rec-1", PRESCRIBER)
    with pytest.raises(PermissionDenied, match="masked"):
        check_masked_prescription(pro("nurse"), MASKED, "rec-1", PRESCRIBER)
