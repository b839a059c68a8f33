"""The signed act (dmp/prescriptions.py): ids, lines, building, signing, verifying."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from dmp.clock import to_us
from dmp.errors import InvalidArgument, PermissionDenied
from dmp.identity import Principal, Role
from dmp.ins import make_ins
from dmp.pki import CRL_FILE, Pki, load_credentials
from dmp.prescriptions import (
    ALREADY_DISPENSED,
    CANCELLED,
    CIP13_SYSTEM,
    CROCKFORD,
    HELD_BY_ANOTHER_PHARMACY,
    MAX_LINES,
    MAX_PRESCRIPTION_BYTES,
    MAX_QUANTITY,
    PRESCRIPTION_EXPIRED,
    QUANTITY_EXCEEDED,
    REASONS,
    RENEWAL_NOT_YET_DUE,
    STATUS_NAMES,
    TEXT_LIMITS,
    add_months,
    build_prescription,
    new_prescription_id,
    parse_line,
    prescription_bytes,
    prescription_region,
    sign_prescription,
    status_name,
    status_value,
    verify_prescription,
)
from dmp.revocation import RevocationList
from dmp.signing import SignatureVerifier, Signer
from dmp.v1 import prescription_pb2, record_pb2

INS = make_ins("1850275123456")
DOCTOR = "10000000001"
PHARMACIST = "10000000003"
NOW = datetime(2026, 11, 30, 10, 0, tzinfo=UTC)


@pytest.fixture
def signers(pki: Pki) -> dict[str, Signer]:
    pki.issue_practitioner(DOCTOR, "doctor", "Dr Claire MARTIN")
    pki.issue_practitioner(PHARMACIST, "pharmacist", "Julie PETIT")
    return {
        name: Signer(load_credentials(pki.directory, f"practitioner-{rpps}"))
        for name, rpps in (("doctor", DOCTOR), ("pharmacist", PHARMACIST))
    }


@pytest.fixture
def verifier(pki: Pki) -> SignatureVerifier:
    ca = pki.ca_certificate
    return SignatureVerifier(ca, RevocationList(pki.directory / CRL_FILE, ca, check_interval=0))


def prescription(prescriber: Principal, **kwargs: object) -> prescription_pb2.Prescription:
    values: dict[str, object] = {
        "prescription_id": new_prescription_id("11"),
        "patient_ins": INS,
        "prescriber": prescriber,
        "organization": "Cabinet du Dr Martin",
        "lines": [parse_line("3400930000001|2|1 comprimé|3 fois par jour|7 jours")],
        "renewals": 1,
        "min_interval_days": 20,
        "now": NOW,
    }
    values.update(kwargs)
    return build_prescription(**values)  # type: ignore[arg-type]


# -- ids --------------------------------------------------------------------------------------


def test_a_new_id_names_its_region_in_crockford_upper_case() -> None:
    ids = {new_prescription_id("84") for _ in range(50)}
    assert len(ids) == 50
    for rx in ids:
        prefix, region, tail = rx.split("-")
        assert (prefix, region) == ("RX", "84")
        assert len(tail) == 20 and set(tail) <= set(CROCKFORD)
        assert prescription_region(rx) == "84"


def test_a_new_id_for_an_unknown_region_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="unknown region code '99'"):
        new_prescription_id("99")


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "RX-11-0123456789ABCDEFGHJ",  # 19 characters
        "RX-11-0123456789ABCDEFGHJKL",  # 21
        "RX-11-0123456789abcdefghjk",  # lower case
        "RX-11-0123456789ABCDEFGHIK",  # I is not Crockford
        "RX-1-0123456789ABCDEFGHJKM",
        "rx-11-0123456789ABCDEFGHJK",
        "11-0123456789ABCDEFGHJK",
        "RX-11-0123456789ABCDEFGHJK\n",
    ],
)
def test_what_is_not_a_prescription_id_is_refused_with_its_shape(bad: str) -> None:
    with pytest.raises(InvalidArgument, match=r"not a prescription id: expected RX-<region code>"):
        prescription_region(bad)


def test_an_id_naming_no_region_of_the_federation_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="names region 99, which is not a region"):
        prescription_region("RX-99-0123456789ABCDEFGHJK")


# -- lines ------------------------------------------------------------------------------------


def test_a_line_of_the_command_line() -> None:
    line = parse_line("3400930000001|2|1 comprimé|3 fois par jour|7 jours")
    assert line.medication.code.system == CIP13_SYSTEM
    assert line.medication.code.code == "3400930000001"
    assert (line.quantity, line.dose, line.frequency, line.duration) == (
        2,
        "1 comprimé",
        "3 fois par jour",
        "7 jours",
    )
    assert line.unit == "boîte" and line.substitution_allowed


def test_a_line_may_leave_out_how_to_take_it() -> None:
    line = parse_line("3400930000001|1")
    assert line.quantity == 1 and line.dose == "" and line.duration == ""


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("3400930000001", "expected CIP13|quantity"),
        ("1|2|3|4|5|6", "expected CIP13|quantity"),
        ("340093000000|1", "must be exactly 13 digits"),
        ("34009300000A1|1", "must be exactly 13 digits"),
        ("3400930000001|two", "must be a whole number"),
        ("3400930000001|0", "quantity 0 must be 1 to"),
        ("3400930000001|-1", "quantity -1 must be 1 to"),
        ("3400930000001|1|\x00", "control character"),
    ],
)
def test_a_bad_line_is_refused_saying_why(text: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        parse_line(text)


# -- building ---------------------------------------------------------------------------------


def test_built_from_the_prescribers_identity_with_three_months_to_dispense(
    signers: dict[str, Signer],
) -> None:
    doctor = signers["doctor"].principal
    built = prescription(doctor)
    assert built.prescriber == prescription_pb2.Prescriber(
        rpps=DOCTOR,
        name="Dr Claire MARTIN",
        profession="doctor",
        organization="Cabinet du Dr Martin",
    )
    assert to_us(built.authored_time) == int(NOW.timestamp() * 1_000_000)
    assert to_us(built.dispense_before) == int(
        datetime(2027, 2, 28, 10, 0, tzinfo=UTC).timestamp() * 1_000_000
    )
    assert not built.HasField("treatment_end")
    assert (built.renewals, built.min_interval_days, len(built.lines)) == (1, 20, 1)


def test_months_are_calendar_months() -> None:
    assert add_months(datetime(2026, 1, 31, tzinfo=UTC), 1) == datetime(2026, 2, 28, tzinfo=UTC)
    assert add_months(datetime(2026, 11, 15, tzinfo=UTC), 3) == datetime(2027, 2, 15, tzinfo=UTC)
    assert add_months(datetime(2026, 12, 1, tzinfo=UTC), 12) == datetime(2027, 12, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lines": []}, "1 to 50 lines"),
        ({"renewals": -1}, "renewals -1 must be 0 to 12"),
        ({"renewals": 13}, "renewals 13 must be 0 to 12"),
        ({"min_interval_days": 400}, "min_interval_days 400"),
        ({"patient_ins": "123"}, "prescription.patient_ins"),
        ({"prescription_id": "RX-11-short"}, "not a prescription id"),
        ({"dispense_before": datetime(2026, 1, 1, tzinfo=UTC)}, "dispense_before must come after"),
        ({"treatment_end": datetime(2028, 1, 1, tzinfo=UTC)}, "at most 12 months"),
        ({"organization": "a\u202eb"}, "control character"),
    ],
)
def test_a_prescription_no_node_stores_is_refused_at_building(
    signers: dict[str, Signer], kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(InvalidArgument, match=message):
        prescription(signers["doctor"].principal, **kwargs)


def test_a_pharmacist_does_not_prescribe(signers: dict[str, Signer]) -> None:
    with pytest.raises(InvalidArgument, match="only dentist, doctor, midwife prescribe"):
        prescription(signers["pharmacist"].principal)


def test_only_a_professional_prescribes() -> None:
    with pytest.raises(InvalidArgument, match="not a professional"):
        prescription(Principal(Role.PATIENT, INS))


# -- signing and verifying --------------------------------------------------------------------


def test_signed_and_verified_against_the_ca(
    signers: dict[str, Signer], verifier: SignatureVerifier
) -> None:
    built = prescription(signers["doctor"].principal)
    signed = sign_prescription(built, signers["doctor"])
    back, signer = verify_prescription(signed, verifier)
    assert back == built
    assert signer.uri == f"urn:dmp:practitioner:{DOCTOR}"


def test_a_tampered_line_is_detected(
    signers: dict[str, Signer], verifier: SignatureVerifier
) -> None:
    signed = sign_prescription(prescription(signers["doctor"].principal), signers["doctor"])
    tampered = prescription_pb2.Prescription.FromString(signed.prescription)
    tampered.lines[0].quantity = 20
    signed.prescription = tampered.SerializeToString(deterministic=True)
    with pytest.raises(InvalidArgument, match="signature does not verify"):
        verify_prescription(signed, verifier)


def test_bytes_that_are_no_prescription_are_refused(
    signers: dict[str, Signer], verifier: SignatureVerifier
) -> None:
    signed = sign_prescription(prescription(signers["doctor"].principal), signers["doctor"])
    signed.prescription = b"\xff\xff\xff"
    with pytest.raises(InvalidArgument, match="not a serialized Prescription"):
        verify_prescription(signed, verifier)


def test_an_act_naming_its_patient_by_an_ins_spelled_otherwise_is_refused(
    signers: dict[str, Signer], verifier: SignatureVerifier
) -> None:
    """The signed INS is the one the node stores, finds and audits under: never spaced
    or lower case, else the patient neither finds the act nor sees its dispensings."""
    built = prescription(signers["doctor"].principal, patient_ins=" ".join(INS))
    assert built.patient_ins == INS
    built.patient_ins = INS[:5] + " " + INS[5:]
    with pytest.raises(InvalidArgument, match="must be written as " + INS):
        verify_prescription(sign_prescription(built, signers["doctor"]), verifier)


def test_the_largest_act_the_limits_allow_fits_the_byte_bound() -> None:
    wide = "\U0001f600"  # 4 bytes in UTF-8

    def text(name: str) -> str:
        return wide * TEXT_LIMITS[name]

    line = prescription_pb2.PrescriptionLine(
        medication=prescription_pb2.Medication(
            code=record_pb2.Coding(
                system=text("medication.code.system"),
                code=text("medication.code.code"),
                display=text("medication.code.display"),
            )
        ),
        **{name: text(name) for name in ("dose", "route", "frequency", "duration", "unit")},
        instructions=text("instructions"),
        quantity=MAX_QUANTITY,
        substitution_allowed=True,
    )
    doctor = Principal(Role.PRACTITIONER, DOCTOR, text("prescriber.name"), "doctor")
    built = prescription(
        doctor,
        organization=text("prescriber.organization"),
        lines=[line] * MAX_LINES,
        renewals=12,
        min_interval_days=366,
        treatment_end=datetime(2027, 11, 30, tzinfo=UTC),
    )
    assert len(prescription_bytes(built)) <= MAX_PRESCRIPTION_BYTES


def test_an_unsigned_prescription_is_refused(
    signers: dict[str, Signer], verifier: SignatureVerifier
) -> None:
    signed = sign_prescription(prescription(signers["doctor"].principal), signers["doctor"])
    signed.ClearField("signature")
    with pytest.raises(InvalidArgument, match="not signed"):
        verify_prescription(signed, verifier)


def test_signed_by_someone_else_than_its_prescriber_is_refused(
    signers: dict[str, Signer], verifier: SignatureVerifier
) -> None:
    built = prescription(signers["doctor"].principal)
    signed = sign_prescription(built, signers["pharmacist"])  # a valid signature, wrong person
    with pytest.raises(PermissionDenied, match="is signed by urn:dmp:practitioner:10000000003"):
        verify_prescription(signed, verifier)


def test_a_prescriber_named_otherwise_than_in_the_certificate_is_refused(
    signers: dict[str, Signer], verifier: SignatureVerifier
) -> None:
    built = prescription(signers["doctor"].principal)
    built.prescriber.name = "Dr Someone ELSE"
    signed = sign_prescription(built, signers["doctor"])
    with pytest.raises(PermissionDenied, match="differs from the signer's certificate"):
        verify_prescription(signed, verifier)


def test_a_revoked_prescriber_no_longer_creates_but_what_they_signed_stays(
    pki: Pki, signers: dict[str, Signer], verifier: SignatureVerifier
) -> None:
    built = prescription(signers["doctor"].principal, now=datetime.now(UTC))
    signed = sign_prescription(built, signers["doctor"])
    pki.revoke(f"practitioner-{DOCTOR}")
    with pytest.raises(InvalidArgument, match="has been revoked"):
        verify_prescription(signed, verifier)
    # Signed before the revocation: as of its authoring, the act stays valid.
    back, signer = verify_prescription(signed, verifier, lasting=True)
    assert back == built and signer.key == DOCTOR


# -- vocabulary -------------------------------------------------------------------------------


def test_status_names_both_ways() -> None:
    assert set(STATUS_NAMES.values()) == {
        "active",
        "partially-dispensed",
        "completed",
        "cancelled",
        "expired",
    }
    for value, name in STATUS_NAMES.items():
        assert status_value(name) == value and status_name(value) == name
    with pytest.raises(InvalidArgument, match="unknown prescription status 'done'"):
        status_value("done")


def test_the_six_refusal_reasons() -> None:
    assert REASONS == (
        PRESCRIPTION_EXPIRED,
        ALREADY_DISPENSED,
        HELD_BY_ANOTHER_PHARMACY,
        RENEWAL_NOT_YET_DUE,
        QUANTITY_EXCEEDED,
        CANCELLED,
    )
    assert all(reason == reason.upper() for reason in REASONS)
