"""Patient directives, signed by the patient: what nodes and the directory enforce."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

from google.protobuf.message import DecodeError

from dmp.clock import from_us, now_us, to_us
from dmp.errors import InvalidArgument, Unauthenticated
from dmp.identity import Role
from dmp.signing import SignatureVerifier, Signer
from dmp.v1 import access_pb2

#: Metadata with which the directory passes the patient's signed directives to nodes.
DIRECTIVES_KEY = "x-dmp-directives-bin"
#: Sent by the directory instead of DIRECTIVES_KEY when the patient never set directives.
NO_DIRECTIVES_KEY = "x-dmp-directives-none"


@dataclass(frozen=True)
class PatientDirectives:
    """A verified directive set (the defaults when the patient never set any)."""

    patient_ins: str
    version: int = 0
    state: int = access_pb2.RECORD_STATE_ACTIVE
    blocked_rpps: frozenset[str] = frozenset()
    treating_rpps: str = ""
    masked_record_ids: frozenset[str] = field(default_factory=frozenset)
    emergency_refused: bool = False

    @property
    def opposed(self) -> bool:
        return self.state == access_pb2.RECORD_STATE_OPPOSED

    @property
    def closed(self) -> bool:
        return self.state == access_pb2.RECORD_STATE_CLOSED

    def to_proto(self) -> access_pb2.Directives:
        return access_pb2.Directives(
            patient_ins=self.patient_ins,
            version=self.version,
            state=self.state,  # type: ignore[arg-type]
            blocked_rpps=sorted(self.blocked_rpps),
            treating_rpps=self.treating_rpps,
            masked_record_ids=sorted(self.masked_record_ids),
            emergency_refused=self.emergency_refused,
        )


def from_proto(message: access_pb2.Directives) -> PatientDirectives:
    return PatientDirectives(
        patient_ins=message.patient_ins,
        version=message.version,
        state=message.state or access_pb2.RECORD_STATE_ACTIVE,
        blocked_rpps=frozenset(message.blocked_rpps),
        treating_rpps=message.treating_rpps,
        masked_record_ids=frozenset(message.masked_record_ids),
        emergency_refused=message.emergency_refused,
    )


def sign_directives(signer: Signer, directives: PatientDirectives) -> access_pb2.SignedDirectives:
    message = directives.to_proto()
    message.issued_at.CopyFrom(from_us(now_us()))
    payload = message.SerializeToString()
    return access_pb2.SignedDirectives(
        directives=payload, signature=signer.sign(payload), certificate=signer.certificate_der
    )


def verify_directives(
    signatures: SignatureVerifier,
    signed: access_pb2.SignedDirectives,
    patient_ins: str | None = None,
    *,
    new: bool = False,
) -> PatientDirectives:
    """The directives, once signed by the patient they are about; Unauthenticated otherwise.

    Directives last: what matters is that the certificate was valid, and not yet revoked,
    when the patient signed them (a lost card locks nobody out; a new certificate for the
    same INS reads and replaces them). A `new` set, sent now to replace the current one,
    needs a certificate valid and not revoked now: the date inside a set is the signer's
    word, so a revoked key cannot bring in a set dated from before its revocation."""
    try:
        message = access_pb2.Directives.FromString(signed.directives)
    except DecodeError:
        raise InvalidArgument("directives are malformed") from None
    signed_at = datetime.fromtimestamp(to_us(message.issued_at) / 1_000_000, UTC)
    if new:
        signatures.verify(signed.directives, signed.signature, signed.certificate)
    signer = signatures.verify(
        signed.directives, signed.signature, signed.certificate, signed_at=signed_at
    )
    if signer.role is not Role.PATIENT or signer.key != message.patient_ins:
        raise Unauthenticated("directives must be signed by the patient they are about")
    if patient_ins is not None and message.patient_ins != patient_ins:
        raise InvalidArgument("these directives are about another patient")
    if message.version < 1:
        raise InvalidArgument("directives.version starts at 1")
    return from_proto(message)
