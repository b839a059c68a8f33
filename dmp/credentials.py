"""A process's own credentials for mutual TLS, read and checked from a PKI directory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec

from dmp.certificates import (
    CA_FILE,
    _canonical_identity,
    _issue_command,
    _read_file,
    load_private_key,
    principal_from_certificate,
)
from dmp.errors import FailedPrecondition, InvalidArgument, Unauthenticated
from dmp.identity import (
    Principal,
)

# --------------------------------------------------------------------------- credentials


@dataclass(frozen=True)
class Credentials:
    """What a process needs for mutual TLS: the CA, its certificate and key, who it is."""

    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes
    principal: Principal


def load_credentials(pki_dir: Path, identity: str) -> Credentials:
    """Read DIR/ca.pem and DIR/<identity>.pem/.key and check they belong together.

    Needs neither the CA key nor the CRL, so a node's directory can hold only its own
    files. FailedPrecondition names a missing or wrong file and the command that makes it.
    """
    pki_dir = Path(pki_dir)
    canonical = _canonical_identity(identity)
    issue = _issue_command(canonical, pki_dir)
    ca_path = pki_dir / CA_FILE
    cert_path = pki_dir / f"{canonical}.pem"
    key_path = pki_dir / f"{canonical}.key"
    ca_pem = _read_file(
        ca_path,
        "CA certificate",
        f"copy it from the federation PKI or run `dmp pki init --pki {pki_dir}`",
    )
    cert_pem = _read_file(cert_path, "certificate", f"run {issue}")
    key_pem = _read_file(key_path, "private key", f"run {issue}")
    try:
        ca_cert = x509.load_pem_x509_certificate(ca_pem)
    except ValueError:
        raise FailedPrecondition(f"CA certificate {ca_path} is not a PEM certificate") from None
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        raise FailedPrecondition(f"certificate {cert_path} is not a PEM certificate") from None
    try:
        key = load_private_key(key_pem)
    except InvalidArgument as exc:
        raise FailedPrecondition(f"private key {key_path}: {exc}") from None
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        raise FailedPrecondition(
            f"certificate {cert_path} was not issued by the CA in {ca_path}:"
            f" re-issue it with {issue}"
        ) from None
    cert_key = cert.public_key()
    if (
        not isinstance(cert_key, ec.EllipticCurvePublicKey)
        or cert_key.public_numbers() != key.public_key().public_numbers()
    ):
        raise FailedPrecondition(
            f"private key {key_path} does not match certificate {cert_path}: re-issue with {issue}"
        )
    try:
        principal = principal_from_certificate(cert)
    except Unauthenticated as exc:
        raise FailedPrecondition(f"certificate {cert_path}: {exc}") from None
    if principal.identity != canonical:
        raise FailedPrecondition(
            f"certificate {cert_path} was issued to {principal.uri}, not to {canonical}"
        )
    return Credentials(ca_pem=ca_pem, cert_pem=cert_pem, key_pem=key_pem, principal=principal)
