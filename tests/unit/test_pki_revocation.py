"""The federation PKI: revoking certificates, the signed CRL, and `RevocationList` reading it."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from dmp.errors import FailedPrecondition, InvalidArgument, NotFound
from dmp.pki import Pki, RevocationList, generate_key
from tests.unit.pki_helpers import INS, RPPS, ca_public_key, read_cert, read_crl


def _foreign_crl(tmp_path: Path, serials: list[int]) -> bytes:
    """A well-formed CRL with the right issuer name, signed by some other key."""
    ca = Pki.init(tmp_path / "other-ca")
    now = datetime.now(UTC)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.ca_certificate.subject)
        .last_update(now)
        .next_update(now + timedelta(days=1))
    )
    for serial in serials:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now).build()
        )
    crl = builder.sign(generate_key(), hashes.SHA256())
    return crl.public_bytes(serialization.Encoding.PEM)


# -- revocation -----------------------------------------------------------------------------


def test_the_revocation_list_tells_when_a_certificate_was_revoked(pki: Pki) -> None:
    pki.issue_node("11")
    pki.issue_node("53")
    node11, node53 = read_cert(pki.cert_path("node-11")), read_cert(pki.cert_path("node-53"))
    before = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=1)
    pki.revoke("node-11")
    revocation = RevocationList(pki.crl_path, pki.ca_certificate, check_interval=0)
    revoked_at = revocation.revoked_at(node11)
    assert revoked_at is not None and before <= revoked_at <= datetime.now(UTC)
    assert revocation.revoked_at(node53) is None


def test_revoke_updates_the_crl_and_the_list(pki: Pki) -> None:
    pki.issue_node("11")
    pki.issue_practitioner(RPPS, "doctor", "Dr Claire Martin")
    pki.issue_patient(INS, "Jean Dupont")
    doctor = read_cert(pki.cert_path(f"practitioner-{RPPS}"))
    patient = read_cert(pki.cert_path(f"patient-{INS}"))

    pki.revoke(f"practitioner-{RPPS}")
    crl = read_crl(pki)
    assert crl.is_signature_valid(ca_public_key(pki))
    assert [entry.serial_number for entry in crl] == [doctor.serial_number]

    pki.revoke(f"patient-{INS}")
    pki.revoke(f"patient-{INS}")  # twice: harmless
    crl = read_crl(pki)
    assert crl.is_signature_valid(ca_public_key(pki))
    assert sorted(entry.serial_number for entry in crl) == sorted(
        [doctor.serial_number, patient.serial_number]
    )

    listed = {issued.identity: issued for issued in pki.list()}
    assert [issued.identity for issued in pki.list()] == sorted(listed)
    assert set(listed) == {"node-11", f"practitioner-{RPPS}", f"patient-{INS}"}
    assert listed[f"practitioner-{RPPS}"].revoked
    assert listed[f"practitioner-{RPPS}"].state() == "revoked"
    assert listed[f"practitioner-{RPPS}"].profession == "doctor"
    assert listed[f"practitioner-{RPPS}"].uri == f"urn:dmp:practitioner:{RPPS}"
    assert listed[f"patient-{INS}"].revoked
    assert not listed["node-11"].revoked and listed["node-11"].state() == "valid"
    assert listed["node-11"].not_after == read_cert(pki.cert_path("node-11")).not_valid_after_utc


def test_renewal_after_revocation_is_valid(pki: Pki) -> None:
    pki.issue_node("11")
    pki.revoke("node-11")
    pki.issue_node("11")
    [issued] = pki.list()
    assert issued.state() == "valid"
    assert len(read_crl(pki)) == 1


def test_revoking_an_unknown_identity(pki: Pki) -> None:
    with pytest.raises(NotFound, match="node-11"):
        pki.revoke("node-11")
    with pytest.raises(InvalidArgument):
        pki.revoke("../ca")


def test_revocation_list_sees_a_replaced_crl(pki: Pki) -> None:
    pki.issue_node("11")
    pki.issue_node("53")
    node11 = read_cert(pki.cert_path("node-11"))
    node53 = read_cert(pki.cert_path("node-53"))
    revocation = RevocationList(pki.crl_path, pki.ca_certificate, check_interval=0)
    assert not revocation.is_revoked(node11)

    pki.revoke("node-11")
    assert revocation.is_revoked(node11)
    assert not revocation.is_revoked(node53)

    pki.revoke("node-53")
    assert revocation.is_revoked(node53)


def test_revocation_list_rereads_at_most_once_per_interval(pki: Pki) -> None:
    pki.issue_node("11")
    node11 = read_cert(pki.cert_path("node-11"))
    revocation = RevocationList(pki.crl_path, pki.ca_certificate, check_interval=3600)

    pki.revoke("node-11")
    assert not revocation.is_revoked(node11)  # not looked at yet
    assert revocation.reload()
    assert revocation.is_revoked(node11)


def test_revocation_list_keeps_the_last_good_set(
    pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pki.issue_node("11")
    node11 = read_cert(pki.cert_path("node-11"))
    pki.revoke("node-11")
    good = pki.crl_path.read_bytes()
    revocation = RevocationList(pki.crl_path, pki.ca_certificate, check_interval=0)
    assert revocation.is_revoked(node11)

    with caplog.at_level(logging.WARNING, logger="dmp.pki"):
        pki.crl_path.write_bytes(b"garbage")
        assert revocation.is_revoked(node11)
        assert not revocation.reload()
        assert revocation.is_revoked(node11)

        # Well formed but not signed by our CA: an attacker's empty CRL must not un-revoke.
        pki.crl_path.write_bytes(_foreign_crl(tmp_path, []))
        assert not revocation.reload()
        assert revocation.is_revoked(node11)

        pki.crl_path.unlink()
        assert revocation.is_revoked(node11)
    warnings = [r for r in caplog.records if r.name == "dmp.pki" and r.levelno == logging.WARNING]
    assert any("not a PEM CRL" in r.getMessage() for r in warnings)
    assert any("not signed by the federation CA" in r.getMessage() for r in warnings)
    assert any("cannot be read" in r.getMessage() for r in warnings)

    pki.crl_path.write_bytes(good)
    pki.issue_node("11")  # a new certificate, not revoked
    assert not revocation.is_revoked(read_cert(pki.cert_path("node-11")))
    assert revocation.is_revoked(node11)


def test_revocation_list_needs_a_good_crl_at_start(pki: Pki, tmp_path: Path) -> None:
    pki.crl_path.write_bytes(_foreign_crl(tmp_path, [1]))
    with pytest.raises(FailedPrecondition, match="not signed"):
        RevocationList(pki.crl_path, pki.ca_certificate)
    pki.crl_path.write_bytes(b"garbage")
    with pytest.raises(FailedPrecondition, match="not a PEM CRL"):
        RevocationList(pki.crl_path, pki.ca_certificate)
    pki.crl_path.unlink()
    with pytest.raises(FailedPrecondition, match=r"crl\.pem"):
        RevocationList(pki.crl_path, pki.ca_certificate)
