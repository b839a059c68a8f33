"""The federation PKI: CA, certificates of each kind, revocation, CLI."""

from __future__ import annotations

import ipaddress
import logging
import shutil
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from dmp.cli.main import main
from dmp.errors import FailedPrecondition, InvalidArgument, NotFound, Unauthenticated
from dmp.identity import Principal, Role
from dmp.ins import make_ins
from dmp.pki import (
    Pki,
    RevocationList,
    certificate_dns_names,
    certificate_from_pem,
    generate_key,
    load_credentials,
    load_private_key,
    node_tls_name,
    principal_from_certificate,
    principal_from_pem,
)

RPPS = "10003456789"
INS = make_ins("1850275123456")
WRONG_KEY_INS = INS[:-1] + str((int(INS[-1]) + 1) % 10)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki.init(tmp_path / "pki")


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _uris(cert: x509.Certificate) -> list[str]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return san.get_values_for_type(x509.UniformResourceIdentifier)


def _dns_and_ips(cert: x509.Certificate) -> tuple[list[str], list[str]]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    ips = [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    return san.get_values_for_type(x509.DNSName), ips


def _eku(cert: x509.Certificate) -> set[x509.ObjectIdentifier]:
    return set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def _attribute(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> list[str]:
    return [str(a.value) for a in cert.subject.get_attributes_for_oid(oid)]


def _crl(pki: Pki) -> x509.CertificateRevocationList:
    return x509.load_pem_x509_crl(pki.crl_path.read_bytes())


def _ca_public_key(pki: Pki) -> ec.EllipticCurvePublicKey:
    key = _cert(pki.ca_pem_path).public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    return key


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


# -- the CA ---------------------------------------------------------------------------------


def test_init_creates_ca_key_and_empty_signed_crl(tmp_path: Path) -> None:
    pki = Pki.init(tmp_path / "new" / "pki", days=100)

    assert pki.ca_pem_path == tmp_path / "new" / "pki" / "ca.pem"
    assert pki.ca_key_path.is_file() and _mode(pki.ca_key_path) == 0o600
    ca = _cert(pki.ca_pem_path)
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
    assert key.public_key().public_numbers() == _ca_public_key(pki).public_numbers()

    crl = _crl(pki)
    assert len(crl) == 0
    assert crl.is_signature_valid(_ca_public_key(pki))
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
    cert = _cert(cert_path)
    cert.verify_directly_issued_by(_cert(pki.ca_pem_path))
    assert _uris(cert) == ["urn:dmp:node:11"]
    # The region's own name comes with every node certificate (the directory checks it).
    assert _dns_and_ips(cert) == (["localhost", "node-11.dmp.internal"], ["127.0.0.1"])
    assert _eku(cert) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert _attribute(cert, NameOID.ORGANIZATION_NAME) == ["DMP federation"]
    assert _attribute(cert, NameOID.TITLE) == []
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert timedelta(days=824) < lifetime < timedelta(days=826)
    assert _mode(key_path) == 0o600
    key = load_private_key(key_path.read_bytes())
    cert_key = cert.public_key()
    assert isinstance(cert_key, ec.EllipticCurvePublicKey)
    assert isinstance(cert_key.curve, ec.SECP256R1)
    assert key.public_key().public_numbers() == cert_key.public_numbers()


def test_service_hosts_become_dns_and_ip_names(pki: Pki) -> None:
    pki.issue_node("53", hosts=["node-53.example.org", "10.0.0.7", "::1", "node-53"], days=10)
    cert = _cert(pki.cert_path("node-53"))
    assert _dns_and_ips(cert) == (
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
    assert "node-84.dmp.internal" in certificate_dns_names(_cert(pki.cert_path("node-84")))


def test_directory_certificate(pki: Pki) -> None:
    assert pki.issue_directory(hosts=["directory.example.org"]) == Principal(Role.DIRECTORY)
    cert = _cert(pki.cert_path("directory"))
    cert.verify_directly_issued_by(_cert(pki.ca_pem_path))
    assert _uris(cert) == ["urn:dmp:directory"]
    assert _dns_and_ips(cert) == (["directory.example.org"], [])
    assert _eku(cert) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}


def test_practitioner_certificate(pki: Pki) -> None:
    principal = pki.issue_practitioner(RPPS, "pharmacist", "Julie Petit")

    assert principal == Principal(Role.PRACTITIONER, RPPS, "Julie Petit", "pharmacist")
    cert = _cert(pki.cert_path(f"practitioner-{RPPS}"))
    cert.verify_directly_issued_by(_cert(pki.ca_pem_path))
    assert _uris(cert) == [f"urn:dmp:practitioner:{RPPS}"]
    assert _attribute(cert, NameOID.TITLE) == ["pharmacist"]
    assert _attribute(cert, NameOID.COMMON_NAME) == ["Julie Petit"]
    assert _dns_and_ips(cert) == ([], [])
    assert _eku(cert) == {ExtendedKeyUsageOID.CLIENT_AUTH}
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert timedelta(days=364) < lifetime < timedelta(days=366)
    assert _mode(pki.key_path(f"practitioner-{RPPS}")) == 0o600


def test_patient_certificate(pki: Pki) -> None:
    principal = pki.issue_patient(INS, "Jean Dupont")

    assert principal == Principal(Role.PATIENT, INS, "Jean Dupont")
    cert = _cert(pki.cert_path(f"patient-{INS}"))
    cert.verify_directly_issued_by(_cert(pki.ca_pem_path))
    assert _uris(cert) == [f"urn:dmp:patient:{INS}"]
    assert _attribute(cert, NameOID.TITLE) == []
    assert _dns_and_ips(cert) == ([], [])
    assert _eku(cert) == {ExtendedKeyUsageOID.CLIENT_AUTH}


def test_people_never_get_host_names(pki: Pki) -> None:
    pki.issue(Principal(Role.PATIENT, INS, "Jean Dupont"), hosts=["evil.example.org"])
    assert _dns_and_ips(_cert(pki.cert_path(f"patient-{INS}"))) == ([], [])


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


def test_expired_certificate_override(pki: Pki) -> None:
    now = datetime.now(UTC)
    pki.issue(
        Principal(Role.PRACTITIONER, RPPS, "Old Doctor", "doctor"),
        not_before=now - timedelta(days=30),
        not_after=now - timedelta(days=1),
    )
    cert = _cert(pki.cert_path(f"practitioner-{RPPS}"))
    assert cert.not_valid_after_utc < now
    assert cert.not_valid_before_utc < cert.not_valid_after_utc
    [issued] = pki.list()
    assert issued.state() == "expired" and not issued.revoked


def test_a_not_yet_valid_certificate_is_listed_as_such(
    pki: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 9 §11: `dmp pki list` showed a certificate valid from tomorrow as valid."""
    now = datetime.now(UTC)
    pki.issue(
        Principal(Role.PRACTITIONER, RPPS, "Future Doctor", "doctor"),
        not_before=now + timedelta(days=1),
        not_after=now + timedelta(days=30),
    )
    [issued] = pki.list()
    assert issued.state(now) == "not yet valid"
    assert issued.state(now + timedelta(days=2)) == "valid"
    assert main(["pki", "list", "--pki", str(pki.directory)]) == 0
    [_, row] = capsys.readouterr().out.splitlines()
    assert row.split()[0] == f"practitioner-{RPPS}"
    assert row.endswith("not yet valid")


def test_the_revocation_list_tells_when_a_certificate_was_revoked(pki: Pki) -> None:
    pki.issue_node("11")
    pki.issue_node("53")
    node11, node53 = _cert(pki.cert_path("node-11")), _cert(pki.cert_path("node-53"))
    before = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=1)
    pki.revoke("node-11")
    revocation = RevocationList(pki.crl_path, pki.ca_certificate, check_interval=0)
    revoked_at = revocation.revoked_at(node11)
    assert revoked_at is not None and before <= revoked_at <= datetime.now(UTC)
    assert revocation.revoked_at(node53) is None


def test_reissuing_renews_certificate_and_key(pki: Pki) -> None:
    pki.issue_node("11")
    first_cert = _cert(pki.cert_path("node-11"))
    first_key = pki.key_path("node-11").read_bytes()
    pki.issue_node("11")
    assert _cert(pki.cert_path("node-11")).serial_number != first_cert.serial_number
    assert pki.key_path("node-11").read_bytes() != first_key
    assert _mode(pki.key_path("node-11")) == 0o600


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
    assert principal_from_certificate(_cert(cert_path)) == principal
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


# -- credentials ----------------------------------------------------------------------------


def test_load_credentials(pki: Pki) -> None:
    pki.issue_practitioner(RPPS, "nurse", "Marc Robert")
    creds = load_credentials(pki.directory, f"practitioner-{RPPS}")
    assert creds.ca_pem == pki.ca_pem_path.read_bytes()
    assert creds.cert_pem == pki.cert_path(f"practitioner-{RPPS}").read_bytes()
    assert creds.key_pem == pki.key_path(f"practitioner-{RPPS}").read_bytes()
    assert creds.principal == Principal(Role.PRACTITIONER, RPPS, "Marc Robert", "nurse")


def test_load_credentials_names_the_missing_file_and_the_command(pki: Pki) -> None:
    with pytest.raises(FailedPrecondition, match=r"node-11\.pem.*dmp pki issue node --region 11"):
        load_credentials(pki.directory, "node-11")
    pki.issue_node("11")
    pki.key_path("node-11").unlink()
    with pytest.raises(FailedPrecondition, match=r"node-11\.key.*dmp pki issue node"):
        load_credentials(pki.directory, "node-11")


def test_load_credentials_needs_only_the_ca_certificate(pki: Pki, tmp_path: Path) -> None:
    pki.issue_node("11")
    node_dir = tmp_path / "node"
    node_dir.mkdir()
    for path in (pki.ca_pem_path, pki.cert_path("node-11"), pki.key_path("node-11")):
        shutil.copy(path, node_dir / path.name)
    assert load_credentials(node_dir, "node-11").principal == Principal(Role.NODE, "11")

    (node_dir / "ca.pem").unlink()
    with pytest.raises(FailedPrecondition, match=r"ca\.pem"):
        load_credentials(node_dir, "node-11")


def test_load_credentials_refuses_a_key_of_another_certificate(pki: Pki) -> None:
    pki.issue_node("11")
    pki.issue_node("53")
    shutil.copy(pki.key_path("node-53"), pki.key_path("node-11"))
    with pytest.raises(FailedPrecondition, match="does not match"):
        load_credentials(pki.directory, "node-11")


# -- revocation -----------------------------------------------------------------------------


def test_revoke_updates_the_crl_and_the_list(pki: Pki) -> None:
    pki.issue_node("11")
    pki.issue_practitioner(RPPS, "doctor", "Dr Claire Martin")
    pki.issue_patient(INS, "Jean Dupont")
    doctor = _cert(pki.cert_path(f"practitioner-{RPPS}"))
    patient = _cert(pki.cert_path(f"patient-{INS}"))

    pki.revoke(f"practitioner-{RPPS}")
    crl = _crl(pki)
    assert crl.is_signature_valid(_ca_public_key(pki))
    assert [entry.serial_number for entry in crl] == [doctor.serial_number]

    pki.revoke(f"patient-{INS}")
    pki.revoke(f"patient-{INS}")  # twice: harmless
    crl = _crl(pki)
    assert crl.is_signature_valid(_ca_public_key(pki))
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
    assert listed["node-11"].not_after == _cert(pki.cert_path("node-11")).not_valid_after_utc


def test_renewal_after_revocation_is_valid(pki: Pki) -> None:
    pki.issue_node("11")
    pki.revoke("node-11")
    pki.issue_node("11")
    [issued] = pki.list()
    assert issued.state() == "valid"
    assert len(_crl(pki)) == 1


def test_revoking_an_unknown_identity(pki: Pki) -> None:
    with pytest.raises(NotFound, match="node-11"):
        pki.revoke("node-11")
    with pytest.raises(InvalidArgument):
        pki.revoke("../ca")


def test_revocation_list_sees_a_replaced_crl(pki: Pki) -> None:
    pki.issue_node("11")
    pki.issue_node("53")
    node11 = _cert(pki.cert_path("node-11"))
    node53 = _cert(pki.cert_path("node-53"))
    revocation = RevocationList(pki.crl_path, pki.ca_certificate, check_interval=0)
    assert not revocation.is_revoked(node11)

    pki.revoke("node-11")
    assert revocation.is_revoked(node11)
    assert not revocation.is_revoked(node53)

    pki.revoke("node-53")
    assert revocation.is_revoked(node53)


def test_revocation_list_rereads_at_most_once_per_interval(pki: Pki) -> None:
    pki.issue_node("11")
    node11 = _cert(pki.cert_path("node-11"))
    revocation = RevocationList(pki.crl_path, pki.ca_certificate, check_interval=3600)

    pki.revoke("node-11")
    assert not revocation.is_revoked(node11)  # not looked at yet
    assert revocation.reload()
    assert revocation.is_revoked(node11)


def test_revocation_list_keeps_the_last_good_set(
    pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pki.issue_node("11")
    node11 = _cert(pki.cert_path("node-11"))
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
    assert not revocation.is_revoked(_cert(pki.cert_path("node-11")))
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


# -- the command line -----------------------------------------------------------------------


@pytest.fixture
def no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DMP_PKI", raising=False)


def _one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("dmp: ")
    return lines[0]


@pytest.mark.usefixtures("no_env")
def test_cli_init_issue_revoke_list(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = str(tmp_path / "pki")
    assert main(["pki", "init", "--pki", d]) == 0
    assert "ca.key" in capsys.readouterr().out
    assert _mode(tmp_path / "pki" / "ca.key") == 0o600

    assert (
        main(["pki", "issue", "node", "--region", "11", "--host", "n11.example.org", "--pki", d])
        == 0
    )
    out = capsys.readouterr().out
    assert "urn:dmp:node:11" in out and str(tmp_path / "pki" / "node-11.pem") in out
    assert _dns_and_ips(_cert(tmp_path / "pki" / "node-11.pem")) == (
        ["n11.example.org", "node-11.dmp.internal"],
        [],
    )

    assert main(["pki", "issue", "directory", "--pki", d, "--days", "30"]) == 0
    assert "urn:dmp:directory" in capsys.readouterr().out
    assert _dns_and_ips(_cert(tmp_path / "pki" / "directory.pem")) == (["localhost"], ["127.0.0.1"])

    args = ["--rpps", RPPS, "--profession", "midwife", "--name", "Anne Roux", "--pki", d]
    assert main(["pki", "issue", "practitioner", *args]) == 0
    assert f"urn:dmp:practitioner:{RPPS}" in capsys.readouterr().out

    assert main(["pki", "issue", "patient", "--ins", INS, "--name", "Jean Dupont", "--pki", d]) == 0
    assert f"urn:dmp:patient:{INS}" in capsys.readouterr().out

    assert main(["pki", "revoke", "--pki", d, f"patient-{INS}"]) == 0
    capsys.readouterr()

    assert main(["pki", "list", "--pki", d]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["IDENTITY", "URI", "PROFESSION", "EXPIRES", "STATE"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert list(rows) == sorted(rows)
    assert rows["node-11"][1:3] == ["urn:dmp:node:11", "-"]
    assert rows["node-11"][4] == "valid"
    assert rows[f"practitioner-{RPPS}"][2] == "midwife"
    assert rows[f"patient-{INS}"][4] == "revoked"
    expiry = _cert(tmp_path / "pki" / "directory.pem").not_valid_after_utc.date().isoformat()
    assert rows["directory"][3] == expiry


def test_cli_pki_from_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DMP_PKI", str(tmp_path / "env-pki"))
    assert main(["pki", "init"]) == 0
    assert main(["pki", "issue", "node", "--region", "53"]) == 0
    assert (tmp_path / "env-pki" / "node-53.pem").is_file()


@pytest.mark.usefixtures("no_env")
def test_cli_requires_pki_without_environment(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["pki", "list"])
    assert exit_info.value.code == 2
    assert "--pki" in capsys.readouterr().err


@pytest.mark.usefixtures("no_env")
def test_cli_second_init_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = str(tmp_path / "pki")
    assert main(["pki", "init", "--pki", d]) == 0
    capsys.readouterr()
    assert main(["pki", "init", "--pki", d]) == 1
    assert "already holds a federation CA" in _one_line_error(capsys)


@pytest.mark.usefixtures("no_env")
def test_cli_missing_ca(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["pki", "issue", "directory", "--pki", str(tmp_path)]) == 1
    assert f"run `dmp pki init --pki {tmp_path}` first" in _one_line_error(capsys)
    assert main(["pki", "list", "--pki", str(tmp_path)]) == 1
    assert "no federation CA" in _one_line_error(capsys)


@pytest.mark.usefixtures("no_env")
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["node", "--region", "99"], "unknown region code '99'"),
        (
            ["practitioner", "--rpps", "1000345678", "--profession", "doctor", "--name", "X"],
            "11 digits",
        ),
        (
            ["practitioner", "--rpps", RPPS, "--profession", "surgeon", "--name", "X"],
            "unknown profession",
        ),
        (["patient", "--ins", WRONG_KEY_INS, "--name", "X"], "wrong key"),
    ],
)
def test_cli_bad_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    d = str(tmp_path / "pki")
    assert main(["pki", "init", "--pki", d]) == 0
    capsys.readouterr()
    assert main(["pki", "issue", *args, "--pki", d]) == 1
    assert message in _one_line_error(capsys)
    assert sorted(p.name for p in (tmp_path / "pki").glob("*.pem")) == ["ca.pem", "crl.pem"]


@pytest.mark.usefixtures("no_env")
def test_cli_revoke_unknown_identity(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = str(tmp_path / "pki")
    assert main(["pki", "init", "--pki", d]) == 0
    capsys.readouterr()
    assert main(["pki", "revoke", "--pki", d, "node-11"]) == 1
    assert "no certificate for 'node-11'" in _one_line_error(capsys)
