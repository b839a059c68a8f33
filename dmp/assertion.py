"""Signed access assertions: who reads which patient's record, why, until when, for what.

A client signs one per call with the key of its own certificate; it travels as the
metadata ASSERTION_KEY. The directory checks it and forwards it unchanged to every node
it calls; a node checks it again itself. See AccessAssertion in proto/dmp/v1/access.proto.

Each assertion allows one operation (OPERATIONS says which calls take which), and a
record read names its record: a view assertion the directory forwards to a node's list
can never be used there, or anywhere, to read a record's content. Its nonce is single-use,
remembered in the service's database (dmp/nonces.py) until the assertion expires.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from google.protobuf.message import DecodeError

from dmp.clock import from_us, now_us, to_us
from dmp.errors import InvalidArgument, PermissionDenied, Unauthenticated
from dmp.identity import Principal, Role
from dmp.ins import normalize_ins
from dmp.nonces import MAX_NONCE_BYTES, MemoryNonces, NonceLedger, StoredNonces
from dmp.purposes import Purpose
from dmp.signing import SignatureVerifier, Signer
from dmp.v1 import access_pb2

ASSERTION_KEY = "x-dmp-assertion-bin"
AUDIENCE = "urn:dmp:federation"
MAX_LIFETIME_US = 5 * 60 * 1_000_000
DEFAULT_LIFETIME_US = 60 * 1_000_000
#: Tolerated clock difference between signer and verifier, on issue and on expiry alike:
#: a client whose clock is that much behind still has its fresh assertions accepted.
CLOCK_SKEW_US = 120 * 1_000_000
MIN_NONCE_BYTES = 16

Operation = access_pb2.Operation
#: How each operation is named in messages to people.
OPERATION_NAMES = {
    access_pb2.OPERATION_VIEW: "a view of the record",
    access_pb2.OPERATION_LOOKUP: "a patient lookup",
    access_pb2.OPERATION_READ_RECORD: "a read of one record",
    access_pb2.OPERATION_READ_CONTENT: "a read of one record's content",
    access_pb2.OPERATION_ACCESS_HISTORY: "a read of the access history",
    access_pb2.OPERATION_FIND_PRESCRIPTIONS: "a search of the patient's prescriptions",
    access_pb2.OPERATION_READ_PRESCRIPTION: "a read of one prescription",
    access_pb2.OPERATION_DISPENSE: "a dispensing of one prescription",
    access_pb2.OPERATION_CANCEL_PRESCRIPTION: "a cancellation of one prescription",
}
#: Operations that name the one record (or prescription) they act on, in record_id.
RECORD_OPERATIONS = frozenset(
    {
        access_pb2.OPERATION_READ_RECORD,
        access_pb2.OPERATION_READ_CONTENT,
        access_pb2.OPERATION_READ_PRESCRIPTION,
        access_pb2.OPERATION_DISPENSE,
        access_pb2.OPERATION_CANCEL_PRESCRIPTION,
    }
)

#: Operations on one prescription, whose assertion may leave patient_ins empty: a
#: pharmacist who scanned a prescription id does not know the patient's INS; the node
#: that holds the prescription takes the patient from it (and checks a given one).
PRESCRIPTION_OPERATIONS = frozenset(
    {
        access_pb2.OPERATION_READ_PRESCRIPTION,
        access_pb2.OPERATION_DISPENSE,
        access_pb2.OPERATION_CANCEL_PRESCRIPTION,
    }
)

Metadata = Sequence[tuple[str, str | bytes]]


def sign_assertion(
    signer: Signer,
    patient_ins: str,
    purpose: access_pb2.Purpose.ValueType | None = None,
    reason: str = "",
    *,
    operation: access_pb2.Operation.ValueType,
    record_id: str = "",
    lifetime_us: int = DEFAULT_LIFETIME_US,
) -> tuple[tuple[str, bytes], ...]:
    """Metadata carrying a fresh assertion signed by `signer` for one call: `operation`
    (with the `record_id` it reads, for READ_RECORD and READ_CONTENT). The purpose
    defaults to SELF for a patient and CARE for a professional (EMERGENCY when a reason is
    given)."""
    if operation not in OPERATION_NAMES:
        raise InvalidArgument("an access assertion needs an operation")
    if (operation in RECORD_OPERATIONS) != bool(record_id):
        raise InvalidArgument("record_id is given for record reads, and for them only")
    if purpose is None:
        if signer.principal.role is Role.PATIENT:
            purpose = Purpose.SELF.wire
        else:
            purpose = (Purpose.EMERGENCY if reason else Purpose.CARE).wire
    if purpose == Purpose.EMERGENCY.wire and not reason.strip():
        raise InvalidArgument("an emergency access needs a reason")
    issued = now_us()
    assertion = access_pb2.AccessAssertion(
        subject=signer.principal.uri,
        patient_ins=patient_ins,
        purpose=purpose,
        reason=reason,
        issued_at=from_us(issued),
        expires_at=from_us(issued + min(lifetime_us, MAX_LIFETIME_US)),
        nonce=os.urandom(MIN_NONCE_BYTES),
        audience=AUDIENCE,
        operation=operation,
        record_id=record_id,
    )
    payload = assertion.SerializeToString()
    signed = access_pb2.SignedAssertion(
        assertion=payload, signature=signer.sign(payload), certificate=signer.certificate_der
    )
    return ((ASSERTION_KEY, signed.SerializeToString()),)


@dataclass(frozen=True, slots=True)
class VerifiedAssertion:
    subject: Principal
    #: Empty only for an operation on one prescription (PRESCRIPTION_OPERATIONS) whose
    #: signer did not know the patient: the server takes it from the prescription.
    patient_ins: str
    purpose: access_pb2.Purpose.ValueType
    reason: str
    nonce: bytes
    expires_us: int
    operation: access_pb2.Operation.ValueType
    #: The record it allows reading (READ_RECORD, READ_CONTENT); empty otherwise.
    record_id: str
    #: The metadata as received, to forward unchanged.
    raw: bytes
    #: Set when the nonce is only reserved (verify(defer_nonce=True)): until when it must
    #: be remembered. The call's audit commit then inserts it (dmp/audit/calls.py).
    nonce_keep_until_us: int = 0

    @property
    def nonce_due(self) -> tuple[bytes, int] | None:
        """The nonce still to insert durably, with its keep-until, if any."""
        return (self.nonce, self.nonce_keep_until_us) if self.nonce_keep_until_us else None

    @property
    def purpose_name(self) -> str:
        return str(Purpose.of_wire(self.purpose) or "")

    @property
    def emergency(self) -> bool:
        return self.purpose == Purpose.EMERGENCY.wire


def assertion_bytes(metadata: Metadata) -> bytes | None:
    for key, value in metadata:
        if key == ASSERTION_KEY and isinstance(value, bytes):
            return value
    return None


class AssertionVerifier:
    """Everything a server checks of an assertion before giving any patient data."""

    def __init__(
        self,
        signatures: SignatureVerifier,
        clock: Callable[[], int] = now_us,
        nonces: NonceLedger | None = None,
    ) -> None:
        self._signatures = signatures
        self._clock = clock
        self._nonces = nonces if nonces is not None else MemoryNonces()

    def verify(
        self,
        metadata: Metadata,
        operation: access_pb2.Operation.ValueType,
        record_id: str | None = None,
        *,
        defer_nonce: bool = False,
    ) -> VerifiedAssertion:
        """The assertion of this call, once it is valid, allows `operation` (on
        `record_id`, for a record read) and was never used before; Unauthenticated when it
        is not valid, PermissionDenied when it allows something else.

        With `defer_nonce` (and a ledger that can), the nonce is only reserved here: the
        returned assertion's `nonce_due` must then be committed with the call's audit event
        before any data is answered (AuditedCall does), which refuses a replay the memory
        of this process did not catch."""
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
        if now > expires + CLOCK_SKEW_US:
            raise Unauthenticated(
                f"the access assertion expired at {_iso(expires)}, {(now - expires) // 1_000_000}"
                f" s before this server's time {_iso(now)}: sign a new one; if you just did,"
                " check your clock"
            )
        if Purpose.of_wire(assertion.purpose) is None:
            raise Unauthenticated("the access assertion has no purpose")
        if assertion.purpose == Purpose.EMERGENCY.wire and not assertion.reason.strip():
            raise Unauthenticated("an emergency access assertion needs a reason")
        if (assertion.purpose == Purpose.SELF.wire) != (signer.role is Role.PATIENT):
            raise Unauthenticated("patients sign SELF assertions; professionals CARE or EMERGENCY")
        try:
            patient = (
                ""
                if not assertion.patient_ins and assertion.operation in PRESCRIPTION_OPERATIONS
                else normalize_ins(assertion.patient_ins, "assertion.patient_ins")
            )
        except InvalidArgument as exc:
            raise Unauthenticated(exc.message) from None
        if not MIN_NONCE_BYTES <= len(assertion.nonce) <= MAX_NONCE_BYTES:
            raise Unauthenticated(
                f"the access assertion's nonce is malformed ({len(assertion.nonce)} bytes):"
                f" it must be {MIN_NONCE_BYTES} to {MAX_NONCE_BYTES} random bytes"
            )
        _check_operation(assertion, operation, record_id)
        keep_until = expires + CLOCK_SKEW_US
        deferred = defer_nonce and isinstance(self._nonces, StoredNonces)
        if deferred:
            assert isinstance(self._nonces, StoredNonces)
            first = self._nonces.reserve(assertion.nonce, keep_until, now)
        else:
            first = self._nonces.first_time(assertion.nonce, keep_until, now)
        if not first:
            raise replayed()
        return VerifiedAssertion(
            subject=signer,
            patient_ins=patient,
            purpose=assertion.purpose,
            reason=assertion.reason,
            nonce=assertion.nonce,
            expires_us=expires,
            operation=assertion.operation,
            record_id=assertion.record_id,
            raw=raw,
            nonce_keep_until_us=keep_until if deferred else 0,
        )


def replayed() -> Unauthenticated:
    return Unauthenticated("the access assertion was already used: sign a new one per call")


def _check_operation(
    assertion: access_pb2.AccessAssertion,
    operation: access_pb2.Operation.ValueType,
    record_id: str | None,
) -> None:
    wanted = OPERATION_NAMES[operation]
    if assertion.operation not in OPERATION_NAMES:
        raise PermissionDenied(
            f"the access assertion names no operation; this call is {wanted}: sign an"
            f" assertion for it ({access_pb2.Operation.Name(operation)})"
        )
    if assertion.operation != operation:
        raise PermissionDenied(
            f"the access assertion allows {OPERATION_NAMES[assertion.operation]}, not"
            f" {wanted}: sign one for this call ({access_pb2.Operation.Name(operation)})"
        )
    if operation in PRESCRIPTION_OPERATIONS and (
        record_id is None or assertion.record_id != record_id
    ):
        raise PermissionDenied(
            f"the access assertion allows {wanted} on prescription {assertion.record_id!r}"
            " only: sign one naming the prescription of this call (its id in record_id)"
        )
    if operation in RECORD_OPERATIONS and (record_id is None or assertion.record_id != record_id):
        raise PermissionDenied(
            f"the access assertion allows reading record {assertion.record_id!r} only: sign"
            " one naming the record of this call"
        )


def _iso(us: int) -> str:
    return datetime.fromtimestamp(us / 1_000_000, UTC).isoformat(timespec="seconds")
