"""The signer's certificate chain is checked once per certificate (dmp/signing.py), and
nothing else is remembered: a certificate already seen is still refused once revoked or
outside its validity, and every signature is still checked."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from dmp.errors import Unauthenticated
from dmp.pki import CRL_FILE, Pki, load_credentials
from dmp.revocation import RevocationList
from dmp.signing import SignatureVerifier, Signer

DOCTOR = "10000000001"
IDENTITY = f"practitioner-{DOCTOR}"


@pytest.fixture
def signer(pki: Pki) -> Signer:
    pki.issue_practitioner(DOCTOR, "doctor", "Dr Claire MARTIN")
    return Signer(load_credentials(pki.directory, IDENTITY))


def verifier(pki: Pki, clock: list[datetime] | None = None) -> SignatureVerifier:
    ca = pki.ca_certificate
    revocation = RevocationList(pki.directory / CRL_FILE, ca, check_interval=0)
    if clock is None:
        return SignatureVerifier(ca, revocation)
    return SignatureVerifier(ca, revocation, clock=lambda: clock[0])


def test_a_certificate_seen_before_is_refused_once_revoked(pki: Pki, signer: Signer) -> None:
    signatures = verifier(pki)
    for n in range(3):  # seen, its chain checked and kept
        payload = f"statement {n}".encode()
        who = signatures.verify(payload, signer.sign(payload), signer.certificate_der)
        assert who.uri == signer.principal.uri
    pki.revoke(IDENTITY)
    payload = b"after the revocation"
    with pytest.raises(Unauthenticated, match="revoked"):
        signatures.verify(payload, signer.sign(payload), signer.certificate_der)


def test_a_certificate_seen_before_is_refused_once_expired(pki: Pki, signer: Signer) -> None:
    clock = [datetime.now(UTC)]
    signatures = verifier(pki, clock)
    payload = b"while valid"
    signatures.verify(payload, signer.sign(payload), signer.certificate_der)
    clock[0] += timedelta(days=400)  # people's certificates last 365 days
    with pytest.raises(Unauthenticated, match="not valid now"):
        signatures.verify(payload, signer.sign(payload), signer.certificate_der)


def test_every_signature_is_checked_for_a_certificate_seen_before(pki: Pki, signer: Signer) -> None:
    signatures = verifier(pki)
    payload = b"signed"
    signature = signer.sign(payload)
    signatures.verify(payload, signature, signer.certificate_der)
    with pytest.raises(Unauthenticated, match="signature is not by the key"):
        signatures.verify(b"another payload", signature, signer.certificate_der)
