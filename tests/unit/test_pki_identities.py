"""The federation PKI: the identity (principal) a certificate carries, and what has none."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from dmp.errors import Unauthenticated
from dmp.identity import Principal, Role
from dmp.pki import (
    Pki,
    certificate_from_pem,
    generate_key,
    principal_from_certificate,
    principal_from_pem,
)
from tests.unit.pki_helpers import INS, RPPS, read_cert

# -- identities from certificates -----------------------------------------------------------


@pytest.mark.parametrize(
    "principal",
    [
        Principal(Role.NODE, "84"),
        Principal(Role.DIRECTORY),
        Principal(Role.PRACTITIONER, RPPS, "Dr Claire Martin", "doctor"),
        Principal(Role.PATIENT, INS, "Jean Dupont"),
        Principal(Role.NODE, "11", "Île-de-France node"),
    ],
)
def test_principal_round_trips_through_the_certificate(pki: Pki, principal: Principal) -> None:
    cert_path, _ = pki.issue(principal)
    assert principal_from_certificate(read_cert(cert_path)) == principal
    pem = cert_path.read_bytes()
    assert principal_from_pem(pem) == principal
    assert certificate_from_pem(pem) is certificate_from_pem(pem)


def _self_signed(san: list[x509.GeneralName] | None) -> x509.Certificate:
    key = generate_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "stranger")])
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=1))
    )
    if san is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(key, hashes.SHA256())


@pytest.mark.parametrize(
    "san",
    [
        None,
        [x509.DNSName("example.org")],
        [x509.UniformResourceIdentifier("urn:dmp:node:99")],
        [x509.UniformResourceIdentifier("urn:dmp:king")],
        [x509.UniformResourceIdentifier("urn:dmp:practitioner:10003456789")],  # no profession
        [
            x509.UniformResourceIdentifier("urn:dmp:node:11"),
            x509.UniformResourceIdentifier("urn:dmp:directory"),
        ],
    ],
)
def test_certificate_without_one_valid_identity_is_unauthenticated(
    san: list[x509.GeneralName] | None,
) -> None:
    cert = _self_signed(san)
    with pytest.raises(Unauthenticated):
        principal_from_certificate(cert)
    with pytest.raises(Unauthenticated):
        principal_from_pem(cert.public_bytes(serialization.Encoding.PEM))


def test_garbage_pem_is_unauthenticated() -> None:
    with pytest.raises(Unauthenticated):
        certificate_from_pem(b"-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n")
