"""E-prescription, the signed act: ids, lines, building, signing and verifying.

Pure: no transport and no SQL. The prescriber's software (the CLI, through the typed
client) chooses the id, builds the Prescription and signs its serialized bytes with the
prescriber's own certificate key; the owning node (the region the id names) verifies it
with `verify_prescription` before storing it, and anyone can verify a stored copy again.

An id is "RX-<region code>-<20 characters of Crockford base32>", upper case so that a QR
code carries it in alphanumeric mode: 100 random bits, never any personal data.
"""

from __future__ import annotations

import calendar
import re
import secrets
from collections.abc import Sequence
from datetime import UTC, datetime

from google.protobuf.message import DecodeError

from dmp.clock import from_us, to_us
from dmp.errors import DmpError, InvalidArgument, PermissionDenied
from dmp.fields import check_text, check_time
from dmp.identity import Principal, Role, check_rpps
from dmp.ins import normalize_ins, stored_ins
from dmp.policy import PRESCRIBERS
from dmp.regions import REGIONS, check_region
from dmp.signing import SignatureVerifier, Signer
from dmp.v1 import prescription_pb2, record_pb2

#: Code systems of a prescribed product.
CIP13_SYSTEM = "http://data.esante.gouv.fr/ansm/medicament/Presentation"
UCD_SYSTEM = "http://data.esante.gouv.fr/ansm/medicament/UCD"
SUBSTANCE_SYSTEM = "http://data.esante.gouv.fr/ansm/medicament/Substance"

#: The reasons of the FAILED_PRECONDITION refusals of a dispensing (ErrorInfo.reason).
PRESCRIPTION_EXPIRED = "PRESCRIPTION_EXPIRED"
ALREADY_DISPENSED = "ALREADY_DISPENSED"
HELD_BY_ANOTHER_PHARMACY = "HELD_BY_ANOTHER_PHARMACY"
RENEWAL_NOT_YET_DUE = "RENEWAL_NOT_YET_DUE"
QUANTITY_EXCEEDED = "QUANTITY_EXCEEDED"
CANCELLED = "CANCELLED"
#: A node asked about a prescription of another region (FAILED_PRECONDITION): the message
#: names the region whose node holds it.
WRONG_REGION = "WRONG_REGION"
REASONS = (
    PRESCRIPTION_EXPIRED,
    ALREADY_DISPENSED,
    HELD_BY_ANOTHER_PHARMACY,
    RENEWAL_NOT_YET_DUE,
    QUANTITY_EXCEEDED,
    CANCELLED,
)

#: Crockford's base32 alphabet (no I, L, O, U).
CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
ID_RANDOM_CHARS = 20
_ID = re.compile(r"^RX-([0-9]{2})-([0-9A-HJKMNP-TV-Z]{20})$")
_CIP13 = re.compile(r"^[0-9]{13}$")
_EXAMPLE_ID = "RX-11-0123456789ABCDEFGHJK"

#: The first dispensing happens within this many months of authoring, by default.
DEFAULT_VALIDITY_MONTHS = 3
#: No prescription runs longer than this after it was written (renewals included).
MAX_TREATMENT_MONTHS = 12
MAX_LINES = 50
MAX_RENEWALS = 12
MAX_INTERVAL_DAYS = 366
MAX_QUANTITY = 1000
DEFAULT_UNIT = "boîte"
#: The signed bytes of an act, at most: above the largest the limits below allow (50 lines
#: of every text at its limit in 4-byte characters, about 420 KiB), so that no field the
#: contract does not know carries megabytes to every reader.
MAX_PRESCRIPTION_BYTES = 512 * 1024
#: The signature and the signer's certificate around them, at most.
MAX_ENVELOPE_BYTES = 32 * 1024
#: Text limits of a line's and a prescriber's fields, in characters.
TEXT_LIMITS = {
    "dose": 200,
    "route": 100,
    "frequency": 200,
    "duration": 100,
    "unit": 50,
    "instructions": 1000,
    "medication.code.system": 200,
    "medication.code.code": 64,
    "medication.code.display": 200,
    "prescriber.name": 200,
    "prescriber.organization": 200,
}

#: The professions that prescribe (the policy's).
PRESCRIBING_PROFESSIONS = PRESCRIBERS

STATUS_NAMES: dict[prescription_pb2.PrescriptionStatus.ValueType, str] = {
    prescription_pb2.PRESCRIPTION_STATUS_ACTIVE: "active",
    prescription_pb2.PRESCRIPTION_STATUS_PARTIALLY_DISPENSED: "partially-dispensed",
    prescription_pb2.PRESCRIPTION_STATUS_COMPLETED: "completed",
    prescription_pb2.PRESCRIPTION_STATUS_CANCELLED: "cancelled",
    prescription_pb2.PRESCRIPTION_STATUS_EXPIRED: "expired",
}
STATUS_VALUES = {name: value for value, name in STATUS_NAMES.items()}
#: What FindPrescriptions answers when no status is asked: those still dispensable.
DISPENSABLE_STATUSES = (
    prescription_pb2.PRESCRIPTION_STATUS_ACTIVE,
    prescription_pb2.PRESCRIPTION_STATUS_PARTIALLY_DISPENSED,
)

#: The record a node writes for a prescription and for each dispensing (LOINC).
PRESCRIPTION_TYPE = record_pb2.Coding(
    system="http://loinc.org", code="57833-6", display="Prescription for medication"
)
DISPENSATION_TYPE = record_pb2.Coding(
    system="http://loinc.org", code="60593-1", display="Medication dispensed"
)


def status_name(value: int) -> str:
    """The name of a status ("active", ...); InvalidArgument for an unknown value."""
    try:
        return STATUS_NAMES[prescription_pb2.PrescriptionStatus.ValueType(value)]
    except KeyError:
        raise InvalidArgument(f"{value} is not a known prescription status") from None


def status_value(name: str) -> prescription_pb2.PrescriptionStatus.ValueType:
    """The status of a name ("active", "partially-dispensed", ...)."""
    try:
        return STATUS_VALUES[name]
    except KeyError:
        known = ", ".join(STATUS_VALUES)
        raise InvalidArgument(
            f"unknown prescription status {name!r}: expected one of {known}"
        ) from None


# -- ids -------------------------------------------------------------------------------------


def new_prescription_id(region: str) -> str:
    """A fresh id naming `region`: RX-<region>-<20 random Crockford base32 characters>."""
    check_region(region)
    tail = "".join(secrets.choice(CROCKFORD) for _ in range(ID_RANDOM_CHARS))
    return f"RX-{region}-{tail}"


def prescription_region(prescription_id: str, field: str = "prescription_id") -> str:
    """The region code an id names; InvalidArgument when it is not a prescription id."""
    match = _ID.fullmatch(prescription_id)
    if match is None:
        shown = prescription_id if len(prescription_id) <= 80 else prescription_id[:80] + "..."
        raise InvalidArgument(
            f"{field} {shown!r} is not a prescription id: expected RX-<region code>-<20"
            f" characters of Crockford base32, upper case> (e.g. {_EXAMPLE_ID}), as printed"
            " under the prescription's QR code"
        )
    region = match.group(1)
    if region not in REGIONS:
        raise InvalidArgument(
            f"{field} {prescription_id!r} names region {region}, which is not a region of the"
            f" federation ({', '.join(sorted(REGIONS))})"
        )
    return region


# -- lines -----------------------------------------------------------------------------------


def parse_line(text: str) -> prescription_pb2.PrescriptionLine:
    """A line from the command line's "CIP13|quantity|dose|frequency|duration" (dose,
    frequency and duration may be left out). Substitution is allowed, the unit a box."""
    parts = [part.strip() for part in text.split("|")]
    if len(parts) < 2 or len(parts) > 5:
        raise InvalidArgument(
            f"line {text!r}: expected CIP13|quantity|dose|frequency|duration, e.g."
            ' "3400930000001|1|1 comprimé|3 fois par jour|7 jours"'
        )
    parts += [""] * (5 - len(parts))
    code, quantity_text, dose, frequency, duration = parts
    if not _CIP13.fullmatch(code):
        raise InvalidArgument(f"line {text!r}: the CIP 13 code {code!r} must be exactly 13 digits")
    try:
        quantity = int(quantity_text)
    except ValueError:
        raise InvalidArgument(
            f"line {text!r}: the quantity {quantity_text!r} must be a whole number of boxes"
        ) from None
    line = prescription_pb2.PrescriptionLine(
        medication=prescription_pb2.Medication(
            code=record_pb2.Coding(system=CIP13_SYSTEM, code=code)
        ),
        dose=dose,
        frequency=frequency,
        duration=duration,
        quantity=quantity,
        unit=DEFAULT_UNIT,
        substitution_allowed=True,
    )
    check_line(line, f"line {text!r}")
    return line


def check_line(line: prescription_pb2.PrescriptionLine, where: str) -> None:
    """Refuse, naming the field, a line no prescription may carry."""
    code = line.medication.code
    if not code.system.strip() or not code.code.strip():
        raise InvalidArgument(
            f"{where}: medication.code needs a system and a code (CIP 13 presentation"
            f" {CIP13_SYSTEM}, UCD or substance)"
        )
    if code.system == CIP13_SYSTEM and not _CIP13.fullmatch(code.code):
        raise InvalidArgument(f"{where}: the CIP 13 code {code.code!r} must be exactly 13 digits")
    texts = {
        "medication.code.system": code.system,
        "medication.code.code": code.code,
        "medication.code.display": code.display,
        "dose": line.dose,
        "route": line.route,
        "frequency": line.frequency,
        "duration": line.duration,
        "unit": line.unit,
        "instructions": line.instructions,
    }
    for name, value in texts.items():
        check_text(value, f"{where}: {name}", TEXT_LIMITS[name])
    if not 1 <= line.quantity <= MAX_QUANTITY:
        raise InvalidArgument(
            f"{where}: quantity {line.quantity} must be 1 to {MAX_QUANTITY} (per dispensing)"
        )


# -- the act ---------------------------------------------------------------------------------


def add_months(moment: datetime, months: int) -> datetime:
    """The same day and time `months` later (the month's last day when it is shorter)."""
    month = moment.month - 1 + months
    year, month = moment.year + month // 12, month % 12 + 1
    day = min(moment.day, calendar.monthrange(year, month)[1])
    return moment.replace(year=year, month=month, day=day)


def _us(moment: datetime, field: str) -> int:
    if moment.tzinfo is None:
        raise InvalidArgument(f"{field} needs a time zone (UTC)")
    return int(moment.timestamp() * 1_000_000)


def build_prescription(
    *,
    prescription_id: str,
    patient_ins: str,
    prescriber: Principal,
    organization: str,
    lines: Sequence[prescription_pb2.PrescriptionLine],
    renewals: int = 0,
    min_interval_days: int = 0,
    now: datetime,
    dispense_before: datetime | None = None,
    treatment_end: datetime | None = None,
) -> prescription_pb2.Prescription:
    """The act to sign, written now by `prescriber` (their certificate's identity); the
    first dispensing before `dispense_before` (3 months by default)."""
    now = now.astimezone(UTC)
    before = dispense_before or add_months(now, DEFAULT_VALIDITY_MONTHS)
    prescription = prescription_pb2.Prescription(
        id=prescription_id,
        patient_ins=normalize_ins(patient_ins, "prescription.patient_ins"),
        prescriber=prescription_pb2.Prescriber(
            rpps=prescriber.key,
            name=prescriber.name,
            profession=prescriber.profession,
            organization=organization,
        ),
        authored_time=from_us(_us(now, "now")),
        dispense_before=from_us(_us(before, "dispense_before")),
        renewals=renewals,
        min_interval_days=min_interval_days,
        lines=list(lines),
    )
    if treatment_end is not None:
        prescription.treatment_end.CopyFrom(from_us(_us(treatment_end, "treatment_end")))
    if prescriber.role is not Role.PRACTITIONER:
        raise InvalidArgument(f"{prescriber.uri} is not a professional: only they prescribe")
    validate_prescription(prescription)
    return prescription


def validate_prescription(prescription: prescription_pb2.Prescription) -> None:
    """Refuse, naming the field, a prescription that no node stores as it is."""
    prescription_region(prescription.id, "prescription.id")
    stored_ins(prescription.patient_ins, "prescription.patient_ins")
    prescriber = prescription.prescriber
    check_rpps(prescriber.rpps)
    if prescriber.profession not in PRESCRIBING_PROFESSIONS:
        raise InvalidArgument(
            f"prescription.prescriber.profession {prescriber.profession!r}: only"
            f" {', '.join(sorted(PRESCRIBING_PROFESSIONS))} prescribe"
        )
    check_text(prescriber.name, "prescription.prescriber.name", TEXT_LIMITS["prescriber.name"])
    check_text(
        prescriber.organization,
        "prescription.prescriber.organization",
        TEXT_LIMITS["prescriber.organization"],
    )
    if not prescription.HasField("authored_time"):
        raise InvalidArgument("prescription.authored_time is required")
    check_time(prescription.authored_time, "prescription.authored_time")
    authored = to_us(prescription.authored_time)
    if not prescription.HasField("dispense_before"):
        raise InvalidArgument(
            "prescription.dispense_before is required (3 months after authored_time by default)"
        )
    check_time(prescription.dispense_before, "prescription.dispense_before")
    latest = _us(
        add_months(datetime.fromtimestamp(authored / 1_000_000, UTC), MAX_TREATMENT_MONTHS),
        "authored_time",
    )
    if not authored < to_us(prescription.dispense_before) <= latest:
        raise InvalidArgument(
            "prescription.dispense_before must come after authored_time and at most"
            f" {MAX_TREATMENT_MONTHS} months after it"
        )
    if prescription.HasField("treatment_end"):
        check_time(prescription.treatment_end, "prescription.treatment_end")
        if not authored < to_us(prescription.treatment_end) <= latest:
            raise InvalidArgument(
                "prescription.treatment_end must come after authored_time and at most"
                f" {MAX_TREATMENT_MONTHS} months after it"
            )
    if not 0 <= prescription.renewals <= MAX_RENEWALS:
        raise InvalidArgument(
            f"prescription.renewals {prescription.renewals} must be 0 to {MAX_RENEWALS}"
        )
    if not 0 <= prescription.min_interval_days <= MAX_INTERVAL_DAYS:
        raise InvalidArgument(
            f"prescription.min_interval_days {prescription.min_interval_days} must be 0 to"
            f" {MAX_INTERVAL_DAYS}"
        )
    if not 1 <= len(prescription.lines) <= MAX_LINES:
        raise InvalidArgument(
            f"prescription.lines: a prescription has 1 to {MAX_LINES} lines, not"
            f" {len(prescription.lines)}"
        )
    for index, line in enumerate(prescription.lines):
        check_line(line, f"prescription.lines[{index}]")


def prescription_bytes(prescription: prescription_pb2.Prescription) -> bytes:
    """The bytes a prescriber signs (deterministic serialization)."""
    return prescription.SerializeToString(deterministic=True)


def sign_prescription(
    prescription: prescription_pb2.Prescription, signer: Signer
) -> prescription_pb2.SignedPrescription:
    """The act signed with the prescriber's own certificate key."""
    payload = prescription_bytes(prescription)
    return prescription_pb2.SignedPrescription(
        prescription=payload, signature=signer.sign(payload), certificate=signer.certificate_der
    )


def verify_prescription(
    signed: prescription_pb2.SignedPrescription,
    verifier: SignatureVerifier,
    *,
    lasting: bool = False,
) -> tuple[prescription_pb2.Prescription, Principal]:
    """The prescription and its signer, once the signature over its bytes verifies against
    the federation CA and the CRL and the signer is the prescriber it names.

    By default the signer's certificate must be valid and not revoked now (a node storing
    a new prescription). With `lasting`, at the prescription's authored_time instead: a
    prescription signed before its prescriber's certificate expired or was revoked stays
    the act it was (reading a stored copy later).

    InvalidArgument for bytes that are not a prescription or a signature that does not
    verify (tampered bytes, another key, a certificate not of the federation, revoked);
    PermissionDenied when the signer is not the prescriber the act names."""
    size, envelope = len(signed.prescription), signed.ByteSize() - len(signed.prescription)
    if size > MAX_PRESCRIPTION_BYTES or envelope > MAX_ENVELOPE_BYTES:
        raise InvalidArgument(
            f"the signed prescription is {size} bytes (and {envelope} of signature and"
            f" certificate): at most {MAX_PRESCRIPTION_BYTES} (and {MAX_ENVELOPE_BYTES}) are"
            " accepted, more than the largest act the field limits allow"
        )
    try:
        prescription = prescription_pb2.Prescription.FromString(signed.prescription)
    except DecodeError:
        raise InvalidArgument("signed.prescription is not a serialized Prescription") from None
    if not signed.signature or not signed.certificate:
        raise InvalidArgument(
            "the prescription is not signed: signed.signature and signed.certificate (the"
            " prescriber's certificate, DER) are required"
        )
    signed_at = None
    if lasting and prescription.HasField("authored_time"):
        authored = to_us(prescription.authored_time)
        signed_at = datetime.fromtimestamp(authored / 1_000_000, UTC)
    try:
        signer = verifier.verify(
            signed.prescription, signed.signature, signed.certificate, signed_at=signed_at
        )
    except DmpError as exc:
        raise InvalidArgument(
            f"the prescription's signature does not verify: {exc.message} (its bytes were"
            " changed after signing, or it was signed with another key or certificate)"
        ) from None
    named = prescription.prescriber
    if signer.role is not Role.PRACTITIONER or named.rpps != signer.key:
        raise PermissionDenied(
            f"the prescription names prescriber RPPS {named.rpps!r} but is signed by"
            f" {signer.uri}: a prescription is signed by its own prescriber"
        )
    if named.profession != signer.profession or named.name != signer.name:
        raise PermissionDenied(
            f"the prescription's prescriber ({named.name!r}, {named.profession!r}) differs"
            f" from the signer's certificate ({signer.name!r}, {signer.profession!r})"
        )
    validate_prescription(prescription)
    return prescription, signer
