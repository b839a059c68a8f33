"""Signed statements of people: a payload signed with the key of the signer's own
certificate, verified against the federation CA, its validity and the CRL.

Access assertions and patient directives are both carried this way.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from dmp.errors import Unauthenticated
from dmp.identity import Principal
from dmp.pki import Credentials, RevocationList, load_private_key, principal_from_certificate

_ECDSA = ec.ECDSA(hashes.SHA256())
_SECOND = timedelta(seconds=1)


class Signer:
    """Signs payloads with a person's (or service's) own key."""

    def __init__(self, credentials: Credentials) -> None:
        self.credentials = credentials
        self.principal = credentials.principal
        self._key = load_private_key(credentials.key_pem)
        cert = x509.load_pem_x509_certificate(credentials.cert_pem)
        self.certificate_der = cert.public_bytes(serialization.Encoding.DER)

    def sign(self, payload: bytes) -> bytes:
        return self._key.sign(payload, _ECDSA)


@functools.lru_cache(maxsize=8192)
def _certificate(der: bytes) -> x509.Certificate:
    try:
        return x509.load_der_x509_certificate(der)
    except ValueError:
        raise Unauthenticated("the signer's certificate is not a DER X.509 certificate") from None


@dataclass(frozen=True, slots=True)
class _Issued:
    """What a certificate issued by the CA says, read once per certificate: its chain is
    checked once, its validity dates, revocation and the signature on every statement."""

    principal: Principal
    cert: x509.Certificate
    not_before: datetime
    not_after: datetime
    #: None when it is not an ECDSA key (refused when it signs).
    key: ec.EllipticCurvePublicKey | None


class SignatureVerifier:
    """Checks that a payload was signed by the holder of a valid federation certificate."""

    def __init__(
        self,
        ca_certificate: x509.Certificate,
        revocation: RevocationList,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._ca = ca_certificate
        self._revocation = revocation
        self._clock = clock
        self._issued_by_ca = functools.lru_cache(maxsize=8192)(self._check_issuer)

    def _check_issuer(self, der: bytes) -> _Issued:
        cert = _certificate(der)
        try:
            cert.verify_directly_issued_by(self._ca)
        except (ValueError, TypeError, InvalidSignature):
            raise Unauthenticated(
                "the signer's certificate is not issued by the federation CA"
            ) from None
        key = cert.public_key()
        return _Issued(
            principal=principal_from_certificate(cert),
            cert=cert,
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
            key=key if isinstance(key, ec.EllipticCurvePublicKey) else None,
        )

    def verify(
        self,
        payload: bytes,
        signature: bytes,
        certificate_der: bytes,
        *,
        signed_at: datetime | None = None,
    ) -> Principal:
        """The signer, once the certificate chains to the CA, was valid when it signed (now,
        unless `signed_at` says when a lasting statement was signed), was not revoked then
        and its key made `signature` over `payload`; Unauthenticated otherwise.

        A lasting statement (a patient's directives) signed before its certificate was
        revoked stays valid: the CRL says when the revocation happened, and a lost card
        must not void what the patient decided while it was theirs. Statements taken in
        now (an access assertion, a new directive set) pass no `signed_at` and need a
        certificate valid and not revoked now."""
        issued = self._issued_by_ca(certificate_der)  # the chain: once per certificate
        principal = issued.principal
        now = self._clock()
        when = signed_at or now
        if signed_at is not None and signed_at > now:
            raise Unauthenticated(f"the statement of {principal.uri} is dated in the future")
        if not issued.not_before <= when <= issued.not_after:
            moment = "now" if signed_at is None else "when it signed"
            raise Unauthenticated(f"the certificate of {principal.uri} is not valid {moment}")
        revoked_at = self._revocation.revoked_at(issued.cert)  # every time: the CRL changes
        # A CRL dates revocations to the second: one signed within that second came first.
        if revoked_at is not None and (signed_at is None or revoked_at + _SECOND <= signed_at):
            raise Unauthenticated(
                f"the certificate of {principal.uri} has been revoked"
                + ("" if signed_at is None else f" ({revoked_at.isoformat()}, before it signed)")
            )
        if issued.key is None:
            raise Unauthenticated("the signer's key is not an ECDSA key")
        try:
            issued.key.verify(signature, payload, _ECDSA)
        except InvalidSignature:
            raise Unauthenticated(f"the signature is not by the key of {principal.uri}") from None
        return principal


def signed_by(cert: x509.Certificate, payload: bytes, signature: bytes) -> bool:
    """Whether the key of `cert` (ECDSA P-256) made `signature` over `payload`; the
    certificate's own validity is the caller's to check."""
    key = cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        return False
    try:
        key.verify(signature, payload, _ECDSA)
    except InvalidSignature:
        return False
    return True
