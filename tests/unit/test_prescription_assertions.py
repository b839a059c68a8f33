"""Assertions for one prescription may leave the patient empty (a scanned id); every other
operation still names its patient, and each names the prescription it acts on."""

from __future__ import annotations

import pytest

from dmp.assertion import PRESCRIPTION_OPERATIONS, AssertionVerifier, sign_assertion
from dmp.errors import PermissionDenied, Unauthenticated
from dmp.ins import make_ins
from dmp.pki import CRL_FILE, Pki, load_credentials
from dmp.revocation import RevocationList
from dmp.signing import SignatureVerifier, Signer
from dmp.v1 import access_pb2

PHARMACIST = "10000000003"
INS = make_ins("1850275123456")
RX = "RX-11-7Q2M0J9XG4ZB8C1DKT5E"


@pytest.fixture
def signer(pki: Pki) -> Signer:
    pki.issue_practitioner(PHARMACIST, "pharmacist", "Julie PETIT")
    return Signer(load_credentials(pki.directory, f"practitioner-{PHARMACIST}"))


@pytest.fixture
def verifier(pki: Pki) -> AssertionVerifier:
    ca = pki.ca_certificate
    return AssertionVerifier(
        SignatureVerifier(ca, RevocationList(pki.directory / CRL_FILE, ca, check_interval=0))
    )


@pytest.mark.parametrize("operation", sorted(PRESCRIPTION_OPERATIONS))
def test_a_scanned_id_needs_no_patient(
    signer: Signer, verifier: AssertionVerifier, operation: int
) -> None:
    metadata = sign_assertion(signer, "", operation=operation, record_id=RX)  # type: ignore[arg-type]
    verified = verifier.verify(metadata, operation, RX)  # type: ignore[arg-type]
    assert verified.patient_ins == "" and verified.record_id == RX
    named = sign_assertion(signer, INS, operation=operation, record_id=RX)  # type: ignore[arg-type]
    assert verifier.verify(named, operation, RX).patient_ins == INS  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "operation", [access_pb2.OPERATION_VIEW, access_pb2.OPERATION_FIND_PRESCRIPTIONS]
)
def test_other_operations_name_their_patient(
    signer: Signer, verifier: AssertionVerifier, operation: int
) -> None:
    metadata = sign_assertion(signer, "", operation=operation)  # type: ignore[arg-type]
    with pytest.raises(Unauthenticated, match=r"assertion\.patient_ins is required"):
        verifier.verify(metadata, operation)  # type: ignore[arg-type]


def test_an_assertion_acts_on_the_prescription_it_names(
    signer: Signer, verifier: AssertionVerifier
) -> None:
    dispense = access_pb2.OPERATION_DISPENSE
    metadata = sign_assertion(signer, "", operation=dispense, record_id=RX)
    with pytest.raises(PermissionDenied, match=f"on prescription '{RX}' only"):
        verifier.verify(metadata, dispense, RX[:-1] + "F")
