"""Signed access assertions: who reads which patient's record, why, until when.

A client signs one per call with the key of its own certificate; it travels as the
metadata ASSERTION_KEY. The directory checks it and forwards it unchanged to every node
it calls; a node checks it again itself. See AccessAssertion in proto/dmp/v1/access.proto.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from google.protobuf.message import DecodeError

from dmp.clock import from_us, now_us, to_us
from dmp.errors import InvalidArgument, Unauthenticated
from dmp.identity import Principal, Role
from dmp.ins import normalize_ins
from dmp.signing import SignatureVerifier, Signer
from dmp.v1 import access_pb2

ASSERTION_KEY = "x-dmp-assertion-bin"
AUDIENCE = "urn:dmp:federation"
MAX_LIFETIME_US = 5 * 60 * 1_000_000
DEFAULT_LIFETIME_US = 60 * 1_000_000
#: Tolerated clock difference between signer and verifier.
CLOCK_SKEW_US = 30 * 1_000_000

Purpose = access_pb2.Purpose
PURPOSE_NAMES = {
    access_pb2.PURPOSE_CARE: "CARE",
    access_pb2.PURPOSE_EMERGENCY: "EMERGENCY",
    access_pb2.PURPOSE_SELF: "SELF",
}

Metadata = Sequence[tuple[str, str | bytes]]


def sign_assertion(
    signer: Signer,
    patient_ins: str,
    purpose: access_pb2.Purpose.ValueType | None = None,
    reason: str = "",
    *,
    lifetime_us: int = DEFAULT_LIFETIME_US,
) -> tuple[tuple[str, bytes], ...]:
    """Metadata carrying a fresh assertion signed by `signer` for one call. The purpose
    defaults to SELF for a patient and CARE for a professional (EMERGENCY when a reason is
    given)."""
    if purpose is None:
        if signer.principal.role is Role.PATIENT:
            purpose = access_pb2.PURPOSE_SELF
        else:
            purpose = access_pb2.PURPOSE_EMERGENCY if reason else access_pb2.PURPOSE_CARE
    if purpose == access_pb2.PURPOSE_EMERGENCY and not reason.strip():
        raise InvalidArgument("an emergency access needs a reason")
    issued = now_us()
    assertion = access_pb2.AccessAssertion(
        subject=signer.principal.uri,
        patient_ins=patient_ins,
        purpose=purpose,
        reason=reason,
        issued_at=from_us(issued),
        expires_at=from_us(issued + min(lifetime_us, MAX_LIFETIME_US)),
        nonce=os.urandom(16),
        audience=AUDIENCE,
    )
    payload = assertion.SerializeToString()
    signed = access_pb2.SignedAssertion(
        assertion=payload, signature=signer.sign(payload), certificate=signer.certificate_der
    )
    return ((ASSERTION_KEY, signed.SerializeToString()),)


@dataclass(frozen=True, slots=True)
class VerifiedAssertion:
    subject: Principal
    patient_ins: str
    purpose: access_pb2.Purpose.ValueType
    reason: str
    nonce: bytes
    expires_us: int
    #: The metadata as received, to forward unchanged.
    raw: bytes

    @property
    def purpose_name(self) -> str:
        return PURPOSE_NAMES[self.purpose]

    @property
    def emergency(self) -> bool:
        return self.purpose == access_pb2.PURPOSE_EMERGENCY


class NonceCache:
    """Nonces seen within their assertion's lifetime (per process)."""

    def __init__(self) -> None:
        self._seen: dict[bytes, int] = {}
        self._lock = threading.Lock()
        self._next_purge = 0.0

    def first_time(self, nonce: bytes, expires_us: int, now: int) -> bool:
        with self._lock:
            if time.monotonic() >= self._next_purge:
                self._seen = {n: e for n, e in self._seen.items() if e + CLOCK_SKEW_US > now}
                self._next_purge = time.monotonic() + 10
            if nonce in self._seen:
                return False
            self._seen[nonce] = expires_us
            return True


def assertion_bytes(metadata: Metadata) -> bytes | None:
    for key, value in metadata:
        if key == ASSERTION_KEY and isinstance(value, bytes):
            return value
    return None


class AssertionVerifier:
    """Everything a server checks of an assertion before giving any patient data."""

    def __init__(self, signatures: SignatureVerifier, clock: Callable[[], int] = now_us) -> None:
        self._signatures = signatures
        self._clock = clock
        self._nonces = NonceCache()

    def verify(self, metadata: Metadata) -> VerifiedAssertion:
        raw = assertion_bytes(metadata)
        if raw is None:
            raise Unauthenticated(
                "no access assertion: sign one for this patient and purpose with your own"
                " certificate (dmp query and dmp record do it)"
            )
        try:
            signed = access_pb2.SignedAssertion.FromString(raw)
            assertion = access_pb2.AccessAssertion.FromString(signed.assertion)
        except DecodeError:
            raise Unauthenticated("the access assertion is malformed") from None
        signer = self._signatures.verify(signed.assertion, signed.signature, signed.certificate)
        if assertion.subject != signer.uri:
            raise Unauthenticated("the access assertion names someone else than its signer")
        if signer.role not in (Role.PRACTITIONER, Role.PATIENT):
            raise Unauthenticated("only professionals and patients sign access assertions")
        if assertion.audience != AUDIENCE:
            raise Unauthenticated(
                f"the access assertion is for {assertion.audience!r}, not {AUDIENCE}"
            )
        now = self._clock()
        issued, expires = to_us(assertion.issued_at), to_us(assertion.expires_at)
        if expires - issued > MAX_LIFETIME_US:
            raise Unauthenticated("the access assertion lives longer than 5 minutes")
        if issued > now + CLOCK_SKEW_US:
            raise Unauthenticated("the access assertion is issued in the future: check the clock")
        if now > expires:
            raise Unauthenticated("the access assertion has expired: sign a new one")
        if assertion.purpose not in PURPOSE_NAMES:
            raise Unauthenticated("the access assertion has no purpose")
        if assertion.purpose == access_pb2.PURPOSE_EMERGENCY and not assertion.reason.strip():
            raise Unauthenticated("an emergency access assertion needs a reason")
        if (assertion.purpose == access_pb2.PURPOSE_SELF) != (signer.role is Role.PATIENT):
            raise Unauthenticated("patients sign SELF assertions; professionals CARE or EMERGENCY")
        try:
            patient = normalize_ins(assertion.patient_ins, "assertion.patient_ins")
        except InvalidArgument as exc:
            raise Unauthenticated(exc.message) from None
        if len(assertion.nonce) < 16 or not self._nonces.first_time(assertion.nonce, expires, now):
            raise Unauthenticated("the access assertion was already used: sign a new one per call")
        return VerifiedAssertion(
            subject=signer,
            patient_ins=patient,
            purpose=assertion.purpose,
            reason=assertion.reason,
            nonce=assertion.nonce,
            expires_us=expires,
            raw=raw,
        )
