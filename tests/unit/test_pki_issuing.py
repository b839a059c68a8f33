"""The federation PKI: the CA, and the certificates it issues for each kind of identity."""

from __future__ import annotations

import ipaddress
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from dmp.errors import FailedPrecondition, InvalidArgument
from dmp.identity import Principal, Role
from dmp.pki import Pki, certificate_dns_names, load_private_key, node_tls_name
from tests.unit.pki_helpers import (
    INS,
    RPPS,
    WRONG_KEY_INS,
    ca_public_key,
    dns_and_ips,
    file_mode,
    read_cert,
    read_crl,
)


def _uris(cert: x509.Certificate) -> list[str]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return san.get_values_for_type(x509.UniformResourceIdentifier)


def _eku(cert: x509.Certificate) -> set[x509.ObjectIdentifier]:
    return set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def _attribute(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> list[str]:
    return [str(a.value) for a in cert.subject.get_attributes_for_oid(oid)]


# -- the CA ---------------------------------------------------------------------------------


def test_init_creates_ca_key_and_empty_signed_crl(tmp_path: Path) -> None:
    pki = Pki.init(tmp_path / "new" / "pki", days=100)

    assert pki.ca_pem_path == tmp_path / "new" / "pki" / "ca.pem"
    assert pki.ca_key_path.is_file() and file_mode(pki.ca_key_path) == 0o600
    ca = read_cert(pki.ca_pem_path)
    assert _attribute(ca, NameOID.COMMON_NAME) == ["DMP federation root CA"]
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign and not usage.digital_signature
    ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    ca.verify_directly_issued_by(ca)
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)
    assert isinstance(ca.signature_hash_algorithm, hashes.SHA256)
    assert ca.not_valid_after_utc - ca.not_valid_before_utc < timedelta(days=101)
    key = load_private_key(pki.ca_key_path.read_bytes())
    assert key.public_key().public_numbers() == ca_public_key(pki).public_numbers()

    crl = read_crl(pki)
    assert len(crl) == 0
    assert crl.is_signature_valid(ca_public_key(pki))
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number >= 1
    assert crl.next_update_utc is not None and crl.next_update_utc > datetime.now(UTC)


def test_second_init_is_refused_and_keeps_the_ca(pki: Pki) -> None:
    before = pki.ca_pem_path.read_bytes()
    with pytest.raises(FailedPrecondition, match="already holds a federation CA"):
        Pki.init(pki.directory)
    assert pki.ca_pem_path.read_bytes() == before


def test_a_directory_without_ca_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FailedPrecondition, match=r"no federation CA in .*dmp pki init --pki"):
        Pki(tmp_path)
    with pytest.raises(FailedPrecondition):
        Pki.load(tmp_path / "absent")


# -- issuing --------------------------------------------------------------------------------


def test_node_certificate(pki: Pki) -> None:
    principal = pki.issue_node("11")

    assert principal == Principal(Role.NODE, "11")
    cert_path, key_path = pki.cert_path("node-11"), pki.key_path("node-11")
    assert cert_path.name == "node-11.pem" and key_path.name == "node-11.key"
    cert = read_cert(cert_path)
    cert.verify_directly_issued_by(read_cert(pki.ca_pem_path))
    assert _uris(cert) == ["urn:dmp:node:11"]
    # The region's own name comes with every node certificate (the directory checks it).
    assert dns_and_ips(cert) == (["localhost", "node-11.dmp.internal"], ["127.0.0.1"])
    assert _eku(cert) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert _attribute(cert, NameOID.ORGANIZATION_NAME) == ["DMP federation"]
    assert _attribute(cert, NameOID.TITLE) == []
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert timedelta(days=824) < lifetime < timedelta(days=826)
    assert file_mode(key_path) == 0o600
    key = load_private_key(key_path.read_bytes())
    cert_key = cert.public_key()
    assert isinstance(cert_key, ec.EllipticCurvePublicKey)
    assert isinstance(cert_key.curve, ec.SECP256R1)
    assert key.public_key().public_numbers() == cert_key.public_numbers()


def test_service_hosts_become_dns_and_ip_names(pki: Pki) -> None:
    pki.issue_node("53", hosts=["node-53.example.org", "10.0.0.7", "::1", "node-53"], days=10)
    cert = read_cert(pki.cert_path("node-53"))
    assert dns_and_ips(cert) == (
        ["node-53.example.org", "node-53", "node-53.dmp.internal"],
        ["10.0.0.7", "::1"],
    )
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("::1") in san.get_values_for_type(x509.IPAddress)
    assert cert.not_valid_after_utc - cert.not_valid_before_utc < timedelta(days=11)

    with pytest.raises(InvalidArgument, match="host"):
        pki.issue_node("53", hosts=["not a host"])


def test_region_names_are_reserved_to_their_node(pki: Pki) -> None:
    assert node_tls_name("84") == "node-84.dmp.internal"
    # Naming itself again is harmless; naming another region, or the domain, is refused.
    pki.issue_node("84", hosts=["node-84.dmp.internal"])
    for hosts in (["node-11.dmp.internal"], ["NODE-11.DMP.INTERNAL."], ["dmp.internal"]):
        with pytest.raises(InvalidArgument, match="reserved"):
            pki.issue_node("84", hosts=hosts)
        with pytest.raises(InvalidArgument, match="reserved"):
            pki.issue_directory(hosts=hosts)
    assert "node-84.dmp.internal" in certificate_dns_names(read_cert(pki.cert_path("node-84")))


def test_directory_certificate(pki: Pki) -> None:
    assert pki.issue_directory(hosts=["directory.example.org"]) == Principal(Role.DIRECTORY)
    cert = read_cert(pki.cert_path("directory"))
    cert.verify_directly_issued_by(read_cert(pki.ca_pem_path))
    assert _uris(cert) == ["urn:dmp:directory"]
    assert dns_and_ips(cert) == (["directory.example.org"], [])
    assert _eku(cert) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}


def test_practitioner_certificate(pki: Pki) -> None:
    principal = pki.issue_practitioner(RPPS, "pharmacist", "Julie Petit")

    assert principal == Principal(Role.PRACTITIONER, RPPS, "Julie Petit", "pharmacist")
    cert = read_cert(pki.cert_path(f"practitioner-{RPPS}"))
    cert.verify_directly_issued_by(read_cert(pki.ca_pem_path))
    assert _uris(cert) == [f"urn:dmp:practitioner:{RPPS}"]
    assert _attribute(cert, NameOID.TITLE) == ["pharmacist"]
    assert _attribute(cert, NameOID.COMMON_NAME) == ["Julie Petit"]
    assert dns_and_ips(cert) == ([], [])
    assert _eku(cert) == {ExtendedKeyUsageOID.CLIENT_AUTH}
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert timedelta(days=364) < lifetime < timedelta(days=366)
    assert file_mode(pki.key_path(f"practitioner-{RPPS}")) == 0o600


def test_patient_certificate(pki: Pki) -> None:
    principal = pki.issue_patient(INS, "Jean Dupont")

    assert principal == Principal(Role.PATIENT, INS, "Jean Dupont")
    cert = read_cert(pki.cert_path(f"patient-{INS}"))
    cert.verify_directly_issued_by(read_cert(pki.ca_pem_path))
    assert _uris(cert) == [f"urn:dmp:patient:{INS}"]
    assert _attribute(cert, NameOID.TITLE) == []
    assert dns_and_ips(cert) == ([], [])
    assert _eku(cert) == {ExtendedKeyUsageOID.CLIENT_AUTH}


def test_people_never_get_host_names(pki: Pki) -> None:
    pki.issue(Principal(Role.PATIENT, INS, "Jean Dupont"), hosts=["evil.example.org"])
    assert dns_and_ips(read_cert(pki.cert_path(f"patient-{INS}"))) == ([], [])


@pytest.mark.parametrize(
    ("issue", "message"),
    [
        (lambda p: p.issue_node("99"), "unknown region code"),
        (lambda p: p.issue_practitioner("1000345678", "doctor", "X"), "11 digits"),
        (lambda p: p.issue_practitioner(RPPS, "surgeon", "X"), "unknown profession"),
        (lambda p: p.issue_patient(WRONG_KEY_INS, "X"), "wrong key"),
        (lambda p: p.issue(Principal(Role.PRACTITIONER, RPPS, "X")), "unknown profession"),
        (lambda p: p.issue(Principal(Role.PATIENT, INS, "X", "doctor")), "only practitioners"),
        (lambda p: p.issue_patient(INS, "x" * 65), "64 characters"),
        (lambda p: p.issue_node("11", days=0), "positive"),
    ],
)
def test_bad_input_is_refused_and_writes_nothing(pki: Pki, issue: object, message: str) -> None:
    before = sorted(path.name for path in pki.directory.iterdir())
    with pytest.raises(InvalidArgument, match=message):
        issue(pki)  # type: ignore[operator]
    assert sorted(path.name for path in pki.directory.iterdir()) == before


def test_reissuing_renews_certificate_and_key(pki: Pki) -> None:
    pki.issue_node("11")
    first_cert = read_cert(pki.cert_path("node-11"))
    first_key = pki.key_path("node-11").read_bytes()
    pki.issue_node("11")
    assert read_cert(pki.cert_path("node-11")).serial_number != first_cert.serial_number
    assert pki.key_path("node-11").read_bytes() != first_key
    assert file_mode(pki.key_path("node-11")) == 0o600
