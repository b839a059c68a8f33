"""Signed checkpoints: a service's signed statement of its log's size and root."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from dmp.audit.events import iso_instant
from dmp.clock import now_us
from dmp.errors import Unauthenticated
from dmp.pki import Credentials, principal_from_certificate
from dmp.signing import Signer

CHECKPOINT_CONTEXT: Final = "dmp-audit-checkpoint"


def checkpoint_message(
    source_id: str, tree_size: int, root_hash: bytes, signed_at_us: int
) -> bytes:
    """The bytes a checkpoint signs."""
    return (
        f"{CHECKPOINT_CONTEXT}\n{source_id}\n{tree_size}\n{root_hash.hex()}\n{signed_at_us}"
    ).encode()


@dataclass(frozen=True)
class Checkpoint:
    """A signed statement: the log of ``source_id`` held ``tree_size`` events with that root."""

    source_id: str
    tree_size: int
    root_hash: bytes
    signed_at_us: int
    signature: bytes
    signer_cert_pem: bytes

    def message(self) -> bytes:
        return checkpoint_message(self.source_id, self.tree_size, self.root_hash, self.signed_at_us)


def sign_checkpoint(
    signer: Credentials,
    tree_size: int,
    root_hash: bytes,
    *,
    signed_at_us: int | None = None,
    source_id: str | None = None,
) -> Checkpoint:
    """Sign a tree head with the signer's ECDSA P-256 key (SHA-256, DER signature), as
    every signed statement of the federation is (:class:`dmp.signing.Signer`). The source
    is the signer's own identity unless given."""
    source = source_id if source_id is not None else signer.principal.uri
    at = signed_at_us if signed_at_us is not None else now_us()
    signature = Signer(signer).sign(checkpoint_message(source, tree_size, root_hash, at))
    return Checkpoint(source, tree_size, root_hash, at, signature, signer.cert_pem)


class CertificateCheck:
    """Checks signer certificates against the CA and the log's source, once per certificate."""

    def __init__(self, ca_cert: x509.Certificate, source_id: str) -> None:
        self._ca = ca_cert
        self._source = source_id
        self._seen: dict[bytes, tuple[x509.Certificate | None, str]] = {}

    def check(self, cert_pem: bytes) -> tuple[x509.Certificate | None, str]:
        """(certificate, "") when it may sign this log, else (certificate or None, why not)."""
        found = self._seen.get(cert_pem)
        if found is None:
            found = self._seen[cert_pem] = self._evaluate(cert_pem)
        return found

    def _evaluate(self, cert_pem: bytes) -> tuple[x509.Certificate | None, str]:
        try:
            cert = x509.load_pem_x509_certificate(cert_pem)
        except ValueError:
            return None, "the signer certificate is not a PEM certificate"
        try:
            cert.verify_directly_issued_by(self._ca)
        except (ValueError, TypeError, InvalidSignature):
            return cert, "the signer certificate was not issued by the federation CA"
        try:
            principal = principal_from_certificate(cert)
        except Unauthenticated as exc:
            return cert, f"the signer certificate names no federation identity ({exc.message})"
        if principal.uri != self._source:
            return cert, f"signed by {principal.uri}, not by the log's owner {self._source}"
        if not isinstance(cert.public_key(), ec.EllipticCurvePublicKey):
            return cert, "the signer certificate holds no ECDSA key"
        return cert, ""


def verify_checkpoint(checkpoint: Checkpoint, ca_cert: x509.Certificate) -> str:
    """Why ``checkpoint`` is not a valid signature of its log's owner, or "" if it is."""
    return verify_with(checkpoint, CertificateCheck(ca_cert, checkpoint.source_id))


def verify_with(checkpoint: Checkpoint, certs: CertificateCheck) -> str:
    cert, why = certs.check(checkpoint.signer_cert_pem)
    if cert is None or why:
        return why
    signed_at = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=checkpoint.signed_at_us)
    if not cert.not_valid_before_utc <= signed_at <= cert.not_valid_after_utc:
        return (
            f"signed at {iso_instant(checkpoint.signed_at_us)},"
            " outside the signer certificate's validity"
        )
    key = cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)  # checked by CertificateCheck
    try:
        key.verify(checkpoint.signature, checkpoint.message(), ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError):
        return "the signature does not verify with the signer certificate"
    return ""
