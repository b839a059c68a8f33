"""The audit trail of a node or of the directory: one tamper-evident log per service.

Every access to patient data, allowed or refused, becomes an :class:`AuditEvent` whose
field names follow the IHE ATNA audit message (DICOM PS3.15 A.5, FHIR AuditEvent): event,
active participants, audit source, participant objects. A security officer reads them in
the terms they know; ``dmp audit export`` hands them out as JSON lines or FHIR R4.

Event types and their codes
---------------------------

``event_type`` is our action; ``event_id`` and ``event_action_code`` follow from it
(:data:`EVENT_TYPES`), with the codes IHE gives the matching XDS transaction:

================  =========================================  ======  =========================
event_type        event_id (system)                          action  IHE analogue
================  =========================================  ======  =========================
view              110112 Query (DCM)                         E       ITI-18 registry query
read-record       110110 Patient Record (DCM)                R       record metadata read
read-content      110106 Export (DCM)                        R       ITI-43 repository retrieve
write             110107 Import (DCM)                        C       ITI-41 provide & register
directive-change  directive-change (urn:dmp:audit-event-type)  U     patient's directives
access-history    110101 Audit Log Used (DCM)                R       audit log read
refused           110113 Security Alert (DCM)                E       refused before the action
                                                                     was known
================  =========================================  ======  =========================

A refused access to a known action is best recorded with that action's event_type, an
``event_outcome_indicator`` of 4 (minor failure, :func:`outcome_for_status`) and the gRPC
status (e.g. ``PERMISSION_DENIED``); ``refused`` is for calls turned away before their
action could be told (unauthenticated, revoked, malformed). Another event_type needs its
``event_id`` and ``event_action_code`` given explicitly.

The log
-------

Events are appended to the table ``audit_events`` (:func:`audit_tables`), numbered by
``seq`` = 1, 2, 3... without gaps. They form an RFC 6962 Merkle tree whose entry ``seq`` is
``seq`` (8 bytes, big-endian) followed by the event's canonical JSON: its leaf hash is
``SHA-256(0x00 ‖ seq ‖ json)``, an inner node ``SHA-256(0x01 ‖ left ‖ right)``. Binding the
position into the leaf lets a verifier tell an event that was changed from one that was
moved, and where. At a regular interval and at shutdown the service signs a checkpoint
(tree size, root, time) with its own key; ``dmp audit verify`` (:func:`verify_log`)
recomputes everything and names the first event changed, deleted or moved, any truncation
behind a signed checkpoint and any checkpoint whose signature is not the service's. A log
rewritten with its checkpoints is caught against the heads kept by a witness (dmp/witness.py).
"""

from __future__ import annotations

import enum
import hashlib
import json
import logging
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Literal, get_args

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import (
    BigInteger,
    Column,
    Engine,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    func,
    insert,
    select,
    text,
)
from sqlalchemy.engine import Connection
from sqlalchemy.event import listen
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session

from dmp.clock import now_us
from dmp.db import writer
from dmp.errors import DataLoss, DmpError, FailedPrecondition, Unauthenticated
from dmp.failures import audit_failure
from dmp.pki import Credentials, load_private_key, principal_from_certificate

__all__ = [
    "DCM",
    "EMPTY_ROOT",
    "EVENT_TYPES",
    "AuditEvent",
    "AuditLog",
    "Checkpoint",
    "EventCode",
    "EventType",
    "LoggedEvent",
    "MerkleFrontier",
    "Outcome",
    "Problem",
    "Purpose",
    "VerifyReport",
    "audit_tables",
    "checkpoint_message",
    "event_leaf_hash",
    "export_events",
    "fhir_audit_event",
    "leaf_hash",
    "log_owner",
    "merkle_root",
    "node_hash",
    "outcome_for_status",
    "sign_checkpoint",
    "verify_checkpoint",
    "verify_log",
]

log = logging.getLogger("dmp.audit")

# --------------------------------------------------------------------------- vocabulary

DCM: Final = "http://dicom.nema.org/resources/ontology/DCM"
LOCAL_EVENT_SYSTEM: Final = "urn:dmp:audit-event-type"


class EventType(enum.StrEnum):
    VIEW = "view"
    READ_RECORD = "read-record"
    READ_CONTENT = "read-content"
    WRITE = "write"
    DIRECTIVE_CHANGE = "directive-change"
    ACCESS_HISTORY = "access-history"
    REFUSED = "refused"


class Purpose(enum.StrEnum):
    CARE = "CARE"
    EMERGENCY = "EMERGENCY"
    SELF = "SELF"


class Outcome(enum.IntEnum):
    """ATNA EventOutcomeIndicator."""

    SUCCESS = 0
    MINOR_FAILURE = 4
    SERIOUS_FAILURE = 8
    MAJOR_FAILURE = 12


@dataclass(frozen=True)
class EventCode:
    """The ATNA EventID of an event type, its code system and its EventActionCode."""

    event_id: str
    system: str
    display: str
    action: str


EVENT_TYPES: Final[Mapping[str, EventCode]] = {
    EventType.VIEW: EventCode("110112", DCM, "Query", "E"),
    EventType.READ_RECORD: EventCode("110110", DCM, "Patient Record", "R"),
    EventType.READ_CONTENT: EventCode("110106", DCM, "Export", "R"),
    EventType.WRITE: EventCode("110107", DCM, "Import", "C"),
    EventType.DIRECTIVE_CHANGE: EventCode(
        "directive-change", LOCAL_EVENT_SYSTEM, "Patient directive change", "U"
    ),
    EventType.ACCESS_HISTORY: EventCode("110101", DCM, "Audit Log Used", "R"),
    EventType.REFUSED: EventCode("110113", DCM, "Security Alert", "E"),
}

# DICOM codes usable as an explicit event_id, to name them in exports.
_DCM_DISPLAY: Final[Mapping[str, str]] = {
    "110100": "Application Activity",
    "110101": "Audit Log Used",
    "110106": "Export",
    "110107": "Import",
    "110110": "Patient Record",
    "110112": "Query",
    "110113": "Security Alert",
    "110114": "User Authentication",
}

ACTION_CODES: Final = frozenset({"C", "R", "U", "D", "E"})
OUTCOMES: Final = frozenset(int(o) for o in Outcome)
PURPOSES: Final = frozenset({"", *(p.value for p in Purpose)})

_MINOR_STATUSES: Final = frozenset(
    {
        "CANCELLED",
        "INVALID_ARGUMENT",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "UNAUTHENTICATED",
        "FAILED_PRECONDITION",
        "OUT_OF_RANGE",
        "RESOURCE_EXHAUSTED",
        "ABORTED",
    }
)


def outcome_for_status(status_code: str) -> Outcome:
    """ATNA outcome of a call from its gRPC status name: OK is a success, a refusal or a
    bad request a minor failure (the action was not performed, nothing broke), an error of
    ours (UNAVAILABLE, INTERNAL, DEADLINE_EXCEEDED...) a serious one, DATA_LOSS a major one."""
    if status_code == "OK":
        return Outcome.SUCCESS
    if status_code in _MINOR_STATUSES:
        return Outcome.MINOR_FAILURE
    if status_code == "DATA_LOSS":
        return Outcome.MAJOR_FAILURE
    return Outcome.SERIOUS_FAILURE


# --------------------------------------------------------------------------- the event

# Free text from callers is cut to these lengths (characters) so that an event always fits.
_LIMITS: Final[Mapping[str, int]] = {
    "event_type": 40,
    "event_id": 64,
    "purpose_of_use": 16,
    "emergency_reason": 500,
    "active_participant_user_id": 200,
    "active_participant_user_name": 200,
    "active_participant_role": 64,
    "relaying_participant": 200,
    "audit_source_id": 200,
    "audit_source_region": 8,
    "participant_object_patient_ins": 32,
    "status_code": 32,
    "request_id": 64,
    "detail": 500,
}
_MAX_RECORD_IDS: Final = 1000
_MAX_RECORD_ID: Final = 128


def _clean(value: object, limit: int) -> str:
    text_value = str(value)
    if not text_value.isascii():
        # Lone surrogates cannot be encoded in UTF-8: replace them rather than fail an audit.
        text_value = text_value.encode("utf-8", "replace").decode("utf-8")
    return text_value[:limit]


def _iso(us: int) -> str:
    """An instant in µs as ISO 8601 UTC with microseconds (a FHIR instant)."""
    moment = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=us)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True, kw_only=True)
class AuditEvent:
    """One audited action, with IHE ATNA field names.

    Only ``event_type`` is required: ``event_id`` and ``event_action_code`` follow from it
    (:data:`EVENT_TYPES`), ``event_date_time`` defaults to now, and
    ``audit_source_id``/``audit_source_region`` are filled by the :class:`AuditLog` that
    appends it. ``detail`` is a short free text and must never hold record content.
    """

    event_type: str
    event_id: str = ""
    event_action_code: str = ""
    event_date_time: int = 0
    event_outcome_indicator: int = Outcome.SUCCESS
    purpose_of_use: str = ""
    emergency_reason: str = ""
    active_participant_user_id: str = ""
    active_participant_user_name: str = ""
    active_participant_role: str = ""
    relaying_participant: str = ""
    audit_source_id: str = ""
    audit_source_region: str = ""
    participant_object_patient_ins: str = ""
    participant_object_record_ids: tuple[str, ...] = ()
    status_code: str = "OK"
    request_id: str = ""
    detail: str = ""
    #: How many identical events this one stands for (dmp/refusals.py); 1 is not encoded,
    #: so events without repeats hash as they always did.
    repeat_count: int = 1

    def __post_init__(self) -> None:
        put = object.__setattr__
        if isinstance(self.repeat_count, bool) or not isinstance(self.repeat_count, int):
            raise ValueError(f"repeat_count {self.repeat_count!r} is not a count")
        if self.repeat_count < 1:
            raise ValueError(f"repeat_count {self.repeat_count} must be at least 1")
        for name, limit in _LIMITS.items():
            put(self, name, _clean(getattr(self, name), limit))
        ids = self.participant_object_record_ids
        if isinstance(ids, str):
            raise ValueError("participant_object_record_ids is a sequence of ids, not a string")
        put(
            self,
            "participant_object_record_ids",
            tuple(_clean(i, _MAX_RECORD_ID) for i in list(ids)[:_MAX_RECORD_IDS]),
        )
        code = EVENT_TYPES.get(self.event_type)
        if not self.event_id:
            if code is None:
                raise ValueError(
                    f"event_type {self.event_type!r} has no standard code: give event_id and"
                    f" event_action_code, or use one of {', '.join(EVENT_TYPES)}"
                )
            put(self, "event_id", code.event_id)
        if not self.event_action_code:
            if code is None:
                raise ValueError(f"event_type {self.event_type!r} needs an event_action_code")
            put(self, "event_action_code", code.action)
        put(self, "event_action_code", str(self.event_action_code))
        if self.event_action_code not in ACTION_CODES:
            raise ValueError(
                f"event_action_code {self.event_action_code!r} is not one of C, R, U, D, E"
            )
        outcome = self.event_outcome_indicator
        if isinstance(outcome, bool) or int(outcome) not in OUTCOMES:
            raise ValueError(f"event_outcome_indicator {outcome!r} is not one of 0, 4, 8, 12")
        put(self, "event_outcome_indicator", int(outcome))
        if self.purpose_of_use not in PURPOSES:
            raise ValueError(
                f"purpose_of_use {self.purpose_of_use!r} is not one of CARE, EMERGENCY, SELF"
            )
        when = self.event_date_time
        if isinstance(when, bool) or not isinstance(when, int) or when < 0:
            raise ValueError(f"event_date_time {when!r} is not microseconds since the epoch")
        if when == 0:
            put(self, "event_date_time", now_us())

    # -- serialization

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        out["participant_object_record_ids"] = list(self.participant_object_record_ids)
        if self.repeat_count == 1:
            del out["repeat_count"]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AuditEvent:
        """The event of :meth:`to_dict`; keys it does not know are ignored (later versions)."""
        known = {f.name for f in fields(cls)}
        values = {key: value for key, value in data.items() if key in known}
        values["participant_object_record_ids"] = tuple(
            values.get("participant_object_record_ids", ())
        )
        return cls(**values)

    @classmethod
    def from_json(cls, data: str | bytes) -> AuditEvent:
        parsed = json.loads(data)
        if not isinstance(parsed, dict):
            raise ValueError("an audit event is a JSON object")
        return cls.from_dict(parsed)

    def canonical_bytes(self) -> bytes:
        """Deterministic JSON (sorted keys, no spaces, UTF-8): what the log stores and hashes."""
        return json.dumps(
            self.to_dict(),
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=False,
            allow_nan=False,
        ).encode("utf-8")

    # -- reading

    @property
    def emergency(self) -> bool:
        return self.purpose_of_use == Purpose.EMERGENCY

    @property
    def code(self) -> EventCode:
        """The event's code, its system and display (for exports)."""
        known = EVENT_TYPES.get(self.event_type)
        if known is not None and known.event_id == self.event_id:
            return known
        if self.event_id in _DCM_DISPLAY:
            return EventCode(
                self.event_id, DCM, _DCM_DISPLAY[self.event_id], self.event_action_code
            )
        return EventCode(self.event_id, LOCAL_EVENT_SYSTEM, self.event_id, self.event_action_code)

    def summary(self) -> str:
        """One line for people: when, what, who, on whom, for what, how it ended."""
        return _summarize(self.to_dict())


def _summarize(values: Mapping[str, Any]) -> str:
    """The summary of an event's fields, tolerant of values no valid event holds (a
    tampered row is described as it now reads)."""

    def field(name: str) -> str:
        value = values.get(name, "")
        return value if isinstance(value, str) else json.dumps(value)

    when = values.get("event_date_time")
    moment = _iso(when) if isinstance(when, int) and 0 <= when < 1 << 62 else f"(time {when!r})"
    who = field("active_participant_user_id") or "an unidentified caller"
    details = ", ".join(
        d for d in (field("active_participant_user_name"), field("active_participant_role")) if d
    )
    if details:
        who = f"{who} ({details})"
    line = f"{moment} {field('event_type') or '(no action)'} by {who}"
    if field("participant_object_patient_ins"):
        line += f" on patient {field('participant_object_patient_ins')}"
    if field("purpose_of_use"):
        line += f" for {field('purpose_of_use')}"
        if field("emergency_reason"):
            line += f" ({field('emergency_reason')!r})"
    if field("relaying_participant"):
        line += f" via {field('relaying_participant')}"
    return line + f": {field('status_code') or '(no status)'}"


# --------------------------------------------------------------------------- Merkle tree

EMPTY_ROOT: Final = hashlib.sha256(b"").digest()
_sha256 = hashlib.sha256


def leaf_hash(entry: bytes) -> bytes:
    """RFC 6962 leaf hash: SHA-256(0x00 ‖ entry)."""
    return _sha256(b"\x00" + entry).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """RFC 6962 interior node hash: SHA-256(0x01 ‖ left ‖ right)."""
    return _sha256(b"\x01" + left + right).digest()


def event_leaf_hash(seq: int, canonical: bytes) -> bytes:
    """The leaf of event ``seq``: its position (8 bytes, big-endian) is part of the entry."""
    return _sha256(b"\x00" + seq.to_bytes(8, "big") + canonical).digest()


def merkle_root(leaves: Sequence[bytes]) -> bytes:
    """RFC 6962 §2.1 Merkle Tree Hash of a list of leaf hashes, by its recursive definition
    (the reference the incremental :class:`MerkleFrontier` is tested against)."""
    n = len(leaves)
    if n == 0:
        return EMPTY_ROOT
    if n == 1:
        return leaves[0]
    k = 1 << ((n - 1).bit_length() - 1)  # the largest power of two smaller than n
    return node_hash(merkle_root(leaves[:k]), merkle_root(leaves[k:]))


class MerkleFrontier:
    """The roots of the perfect subtrees that make a tree of ``size`` leaves (the RFC 6962
    "compact range"), largest first: append is amortized one hash, the root at most
    log2(size) hashes, and memory is 32 bytes per bit of ``size``."""

    __slots__ = ("_stack", "size")

    def __init__(self) -> None:
        self._stack: list[bytes] = []
        self.size = 0

    def append(self, leaf: bytes) -> None:
        stack = self._stack
        h = leaf
        n = self.size
        while n & 1:
            h = _sha256(b"\x01" + stack.pop() + h).digest()
            n >>= 1
        stack.append(h)
        self.size += 1

    def root(self) -> bytes:
        stack = self._stack
        if not stack:
            return EMPTY_ROOT
        h = stack[-1]
        for left in reversed(stack[:-1]):
            h = _sha256(b"\x01" + left + h).digest()
        return h


# --------------------------------------------------------------------------- tables

_SeqType = BigInteger().with_variant(Integer(), "sqlite")
EVENTS_TABLE: Final = "audit_events"
CHECKPOINTS_TABLE: Final = "audit_checkpoints"


def audit_tables(metadata: MetaData) -> tuple[Table, Table]:
    """Define (once) ``audit_events`` and ``audit_checkpoints`` on ``metadata``.

    Each service calls it on its own metadata, so the tables live in its database and its
    migrations. ``seq`` is given by :meth:`AuditLog.append` (1, 2, 3... in commit order),
    not by the database. ``event_json`` and ``leaf_hash`` are the log; the other event
    columns are copies for queries, checked against the JSON by :func:`verify_log`.
    """
    if EVENTS_TABLE in metadata.tables and CHECKPOINTS_TABLE in metadata.tables:
        return metadata.tables[EVENTS_TABLE], metadata.tables[CHECKPOINTS_TABLE]
    events = Table(
        EVENTS_TABLE,
        metadata,
        Column("seq", _SeqType, primary_key=True, autoincrement=False),
        Column("event_json", Text, nullable=False),
        Column("leaf_hash", LargeBinary(32), nullable=False),
        Column("event_date_time", BigInteger, nullable=False),
        Column("participant_object_patient_ins", String(32), nullable=False),
        Column("request_id", String(64), nullable=False),
        Index("ix_audit_events_patient_seq", "participant_object_patient_ins", "seq"),
        Index("ix_audit_events_event_date_time", "event_date_time"),
        Index("ix_audit_events_request_id", "request_id"),
    )
    checkpoints = Table(
        CHECKPOINTS_TABLE,
        metadata,
        Column("tree_size", _SeqType, primary_key=True, autoincrement=False),
        Column("root_hash", LargeBinary(32), nullable=False),
        Column("signed_at_us", BigInteger, nullable=False),
        Column("signature", LargeBinary, nullable=False),
        Column("signer_cert_pem", Text, nullable=False),
    )
    return events, checkpoints


# --------------------------------------------------------------------------- checkpoints

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
    """Sign a tree head with the signer's ECDSA P-256 key (SHA-256, DER signature). The
    source is the signer's own identity unless given."""
    source = source_id if source_id is not None else signer.principal.uri
    at = signed_at_us if signed_at_us is not None else now_us()
    key = load_private_key(signer.key_pem)
    message = checkpoint_message(source, tree_size, root_hash, at)
    signature = key.sign(message, ec.ECDSA(hashes.SHA256()))
    return Checkpoint(source, tree_size, root_hash, at, signature, signer.cert_pem)


class _CertificateCheck:
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
    return _verify_checkpoint(checkpoint, _CertificateCheck(ca_cert, checkpoint.source_id))


def _verify_checkpoint(checkpoint: Checkpoint, certs: _CertificateCheck) -> str:
    cert, why = certs.check(checkpoint.signer_cert_pem)
    if cert is None or why:
        return why
    signed_at = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=checkpoint.signed_at_us)
    if not cert.not_valid_before_utc <= signed_at <= cert.not_valid_after_utc:
        return (
            f"signed at {_iso(checkpoint.signed_at_us)}, outside the signer certificate's validity"
        )
    key = cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)  # checked by _CertificateCheck
    try:
        key.verify(checkpoint.signature, checkpoint.message(), ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError):
        return "the signature does not verify with the signer certificate"
    return ""


# --------------------------------------------------------------------------- the log


@dataclass(frozen=True)
class LoggedEvent:
    """An event as read back from the log, with its position and whether its stored leaf
    hash still matches it."""

    seq: int
    event: AuditEvent
    hash_ok: bool


#: An event waiting to be committed, the signal that it was, and its seq or error.
_Waiter = tuple["AuditEvent", threading.Event, list["int | BaseException"]]


class AuditLog:
    """The append-only audit log of one service over its database.

    ``append`` writes in the caller's transaction (a write and its event commit together);
    ``record`` commits the event on its own before returning, so that a read serves data
    only once its trace is durable, and raises :class:`Unavailable` if it cannot. There is
    no way to update or delete an event through this class.

    With a ``signer`` (the service's own credentials, whose identity must be ``source_id``)
    ``checkpoint`` signs the current tree head (and calls each of ``on_checkpoint``);
    ``start`` takes one every ``checkpoint_interval`` seconds when events were added and as
    soon as ``checkpoint_every`` events were, ``close`` a last one.

    Appends are serialized by the database: on SQLite by the write lock (callers pass a
    transaction of :func:`dmp.db.writer`), on PostgreSQL by a transaction-scoped advisory
    lock (READ COMMITTED, the default isolation), so ``seq`` has no gaps and follows commit
    order even across processes (directory replicas share one log).
    """

    def __init__(
        self,
        engine: Engine,
        events_table: Table,
        checkpoints_table: Table,
        *,
        source_id: str,
        region: str = "",
        signer: Credentials | None = None,
        checkpoint_interval: float = 60.0,
        checkpoint_every: int = 1000,
    ) -> None:
        if signer is not None and signer.principal.uri != source_id:
            raise FailedPrecondition(
                f"the audit log of {source_id} cannot be signed by {signer.principal.uri}"
            )
        if checkpoint_interval <= 0 or checkpoint_every <= 0:
            raise ValueError("checkpoint_interval and checkpoint_every must be positive")
        self._engine = engine
        self._writer = writer(engine)
        self._events = events_table
        self._checkpoints = checkpoints_table
        self.source_id = source_id
        self.region = region
        self._signer = signer
        self._interval, self._every = checkpoint_interval, checkpoint_every
        self._due = threading.Event()  # checkpoint_every events since the last checkpoint
        self.on_checkpoint: list[Callable[[Checkpoint], None]] = []
        self._lock_key = int.from_bytes(
            hashlib.sha256(f"dmp-audit:{events_table.name}".encode()).digest()[:8],
            "big",
            signed=True,
        )
        # Tree state, advanced from the table by checkpoint() (appends never touch it: a
        # rolled-back append leaves nothing behind, and other processes' appends count).
        self._tree_lock = threading.Lock()
        self._tree = MerkleFrontier()
        self._last_checkpoint = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # Group commit of record(): the waiting events and the thread writing them.
        self._queue: list[_Waiter] = []
        self._queue_ready = threading.Condition()
        self._committer: threading.Thread | None = None

    @property
    def events_table(self) -> Table:
        return self._events

    @property
    def checkpoints_table(self) -> Table:
        return self._checkpoints

    # -- appending

    def _own(self, event: AuditEvent) -> AuditEvent:
        source = event.audit_source_id or self.source_id
        region = event.audit_source_region or self.region
        if source != self.source_id:
            raise ValueError(
                f"an event of {event.audit_source_id} does not belong in the log of"
                f" {self.source_id}"
            )
        if (source, region) == (event.audit_source_id, event.audit_source_region):
            return event
        values = event.to_dict()
        values["audit_source_id"] = source
        values["audit_source_region"] = region
        return AuditEvent.from_dict(values)

    def append(self, session_or_connection: Session | Connection, event: AuditEvent) -> int:
        """Append ``event`` in the caller's transaction and return its seq. Nothing is kept
        if that transaction rolls back. Raises Unavailable if the database refuses."""
        return self.append_many(session_or_connection, [event])[0]

    def append_many(
        self, session_or_connection: Session | Connection, events: Iterable[AuditEvent]
    ) -> list[int]:
        """Append several events in the caller's transaction (one INSERT); their seqs."""
        seqs = self._insert(session_or_connection, [self._own(event) for event in events])
        self._count(session_or_connection, seqs)
        return seqs

    def _count(self, target: Session | Connection | None, seqs: list[int]) -> None:
        """Wake the checkpoint thread once ``checkpoint_every`` events are committed."""
        if not seqs or seqs[-1] - self._last_checkpoint < self._every:
            return
        if isinstance(target, Session):  # after the caller's commit, which a checkpoint reads
            listen(target, "after_commit", lambda _: self._due.set(), once=True)
        else:
            self._due.set()

    def _insert(self, target: Session | Connection, owned: list[AuditEvent]) -> list[int]:
        if not owned:
            return []
        try:
            conn = target.connection() if isinstance(target, Session) else target
            first = self._next_seq(conn)
            rows = []
            for offset, event in enumerate(owned):
                seq = first + offset
                data = event.canonical_bytes()
                rows.append(
                    {
                        "seq": seq,
                        "event_json": data.decode("utf-8"),
                        "leaf_hash": event_leaf_hash(seq, data),
                        "event_date_time": event.event_date_time,
                        "participant_object_patient_ins": event.participant_object_patient_ins,
                        "request_id": event.request_id,
                    }
                )
            conn.execute(insert(self._events), rows)
        except SQLAlchemyError as exc:
            raise audit_failure(exc, f"audit append to {self.source_id}") from exc
        return list(range(first, first + len(owned)))

    def _next_seq(self, conn: Connection) -> int:
        if conn.dialect.name == "postgresql":
            # Held until the caller's transaction ends: the next appender reads our seq.
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": self._lock_key})
        last = conn.execute(select(func.max(self._events.c.seq))).scalar()
        return int(last or 0) + 1

    def record(self, event: AuditEvent) -> int:
        """Append ``event`` in a transaction of its own, committed before this returns.
        Raises ``Unavailable("audit trail unavailable: ...")`` when it cannot be written
        (``ResourceExhausted`` on a full disk): the caller must then not serve the data.

        Concurrent callers share commits (group commit): one thread writes every event
        waiting at that moment in one transaction, so a busy service pays one durable
        commit for many reads instead of one each."""
        owned = self._own(event)
        waiter: _Waiter = (owned, threading.Event(), [])
        with self._queue_ready:
            self._queue.append(waiter)
            if self._committer is None:
                self._committer = threading.Thread(
                    target=self._commit_waiting, name="audit-commit", daemon=True
                )
                self._committer.start()
            self._queue_ready.notify()
        waiter[1].wait()
        outcome = waiter[2][0]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def record_many(self, events: Sequence[AuditEvent]) -> list[int]:
        """Append several events in one transaction of their own, committed on return."""
        try:
            with self._writer.begin() as conn:
                seqs = self._insert(conn, [self._own(event) for event in events])
        except SQLAlchemyError as exc:
            raise audit_failure(exc, f"audit record in {self.source_id}") from exc
        self._count(None, seqs)
        return seqs

    def _commit_waiting(self) -> None:
        """Write the waiting events, batch after batch, for as long as the process lives."""
        while True:
            with self._queue_ready:
                while not self._queue:
                    self._queue_ready.wait()
                batch, self._queue = self._queue, []
            try:
                with self._writer.begin() as conn:
                    seqs = self._insert(conn, [event for event, _, _ in batch])
                self._count(None, seqs)
                outcomes: list[int | BaseException] = list(seqs)
            except DmpError as exc:
                outcomes = [exc] * len(batch)
            except Exception as exc:
                failure = audit_failure(exc, f"audit record in {self.source_id}")
                outcomes = [failure] * len(batch)
            for (_, done, result), outcome in zip(batch, outcomes, strict=True):
                result.append(outcome)
                done.set()

    # -- reading

    def events_for_patient(
        self,
        ins: str,
        *,
        since_us: int | None = None,
        limit: int = 100,
        before_seq: int | None = None,
    ) -> list[LoggedEvent]:
        """The events about patient ``ins`` (as stored: pass the normalized INS), newest
        first; page on with ``before_seq`` = the seq of the last one returned."""
        if not 1 <= limit <= 10_000:
            raise ValueError("limit must be between 1 and 10000")
        t = self._events
        query = select(t.c.seq, t.c.event_json, t.c.leaf_hash).where(
            t.c.participant_object_patient_ins == ins
        )
        if since_us is not None:
            query = query.where(t.c.event_date_time >= since_us)
        if before_seq is not None:
            query = query.where(t.c.seq < before_seq)
        query = query.order_by(t.c.seq.desc()).limit(limit)
        with self._engine.connect() as conn:
            rows = conn.execute(query).all()
        found: list[LoggedEvent] = []
        for seq, event_json, leaf in rows:
            hash_ok = event_leaf_hash(seq, event_json.encode("utf-8")) == bytes(leaf)
            try:
                event = AuditEvent.from_json(event_json)
            except (ValueError, TypeError):
                # Only a tampered row reads so: say so, and keep serving the others.
                log.error(
                    "audit event %d of %s is not a valid event: run `dmp audit verify`",
                    seq,
                    self.source_id,
                )
                continue
            found.append(LoggedEvent(seq=seq, event=event, hash_ok=hash_ok))
        return found

    def size(self) -> int:
        """How many events the log holds (its largest seq)."""
        with self._engine.connect() as conn:
            return int(conn.execute(select(func.max(self._events.c.seq))).scalar() or 0)

    # -- checkpoints

    def checkpoint(self) -> Checkpoint | None:
        """Sign and store the current tree head; None if no event was added since the
        last checkpoint (or another process just signed the same size). Raises DataLoss if
        the log has a gap (a deleted event): it is then not signed again until verified."""
        signer = self._signer
        if signer is None:
            raise FailedPrecondition(f"the audit log of {self.source_id} has no signing key")
        with self._tree_lock:
            self._catch_up()
            size = self._tree.size
            if size == 0 or size <= self._last_checkpoint:
                return None
            checkpoint = sign_checkpoint(signer, size, self._tree.root(), source_id=self.source_id)
            try:
                with self._writer.begin() as conn:
                    conn.execute(
                        insert(self._checkpoints).values(
                            tree_size=checkpoint.tree_size,
                            root_hash=checkpoint.root_hash,
                            signed_at_us=checkpoint.signed_at_us,
                            signature=checkpoint.signature,
                            signer_cert_pem=checkpoint.signer_cert_pem.decode("ascii"),
                        )
                    )
            except IntegrityError:
                log.info("audit checkpoint at %d already signed by another process", size)
                self._last_checkpoint = size
                return None
            self._last_checkpoint = size
        log.info(
            "audit checkpoint of %s: %d events, root %s",
            self.source_id,
            size,
            checkpoint.root_hash.hex(),
        )
        for listener in self.on_checkpoint:
            listener(checkpoint)
        return checkpoint

    def _catch_up(self) -> None:
        """Add to the tree the events committed since it was last advanced (all of them the
        first time: one pass over the leaf hashes), checking the root against the latest
        checkpoint stored when the tree reaches its size."""
        t, c = self._events, self._checkpoints
        tree = self._tree
        with self._engine.connect() as conn:
            latest = conn.execute(
                select(c.c.tree_size, c.c.root_hash).order_by(c.c.tree_size.desc()).limit(1)
            ).first()
            latest_size = int(latest[0]) if latest is not None else 0
            latest_root = bytes(latest[1]) if latest is not None else b""
            self._last_checkpoint = max(self._last_checkpoint, latest_size)
            rows = conn.execution_options(yield_per=10_000).execute(
                select(t.c.seq, t.c.leaf_hash).where(t.c.seq > tree.size).order_by(t.c.seq)
            )
            for seq, leaf in rows:
                if seq != tree.size + 1:
                    raise DataLoss(
                        f"the audit log of {self.source_id} has no event {tree.size + 1}"
                        f" (next is {seq}): it was tampered with; run `dmp audit verify`"
                    )
                tree.append(bytes(leaf))
                if tree.size == latest_size and tree.root() != latest_root:
                    log.error(
                        "audit log of %s: events 1..%d no longer match their signed"
                        " checkpoint; run `dmp audit verify`",
                        self.source_id,
                        latest_size,
                    )

    def start(self) -> None:
        """Take a checkpoint every ``checkpoint_interval`` seconds in a daemon thread."""
        if self._signer is None:
            raise FailedPrecondition(f"the audit log of {self.source_id} has no signing key")
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._run, name=f"audit-checkpoint {self.source_id}", daemon=True
        )
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._due.wait(self._interval)
            self._due.clear()
            if self._stop.is_set():
                return
            try:
                self.checkpoint()
            except Exception:
                log.exception("audit checkpoint of %s failed", self.source_id)

    def close(self) -> Checkpoint | None:
        """Stop the checkpoint thread and sign a last checkpoint (errors are logged)."""
        self._stop.set()
        self._due.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()
        if self._signer is None:
            return None
        try:
            return self.checkpoint()
        except Exception:
            log.exception("final audit checkpoint of %s failed", self.source_id)
            return None


# --------------------------------------------------------------------------- verification

ProblemKind = Literal[
    "changed",
    "deleted",
    "moved",
    "truncated",
    "bad-checkpoint-signature",
    "checkpoint-root-mismatch",
]


@dataclass(frozen=True)
class Problem:
    """One finding of :func:`verify_log`; ``seq`` is the event's (or the checkpoint's tree
    size for checkpoint problems)."""

    kind: ProblemKind
    seq: int
    message: str

    def __str__(self) -> str:
        return f"{self.kind} at seq {self.seq}: {self.message}"


@dataclass(frozen=True)
class VerifyReport:
    source_id: str
    events: int
    checkpoints: int
    checkpoints_verified: int
    last_checkpoint_size: int
    problems: tuple[Problem, ...]
    problems_omitted: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def unsigned_events(self) -> int:
        """Events after the last verified checkpoint, not yet covered by a signature."""
        return max(0, self.events - self.last_checkpoint_size)


_MAX_LOCATED: Final = 500  # changed rows (and gaps) kept for the moved/changed diagnosis


def _json_string(value: str) -> str:
    """``value`` as canonical_bytes writes it (fast path for the usual plain values)."""
    if '"' not in value and "\\" not in value and value.isprintable():
        return f'"{value}"'
    return json.dumps(value, ensure_ascii=False)


def _describe(event_json: str) -> str:
    try:
        parsed = json.loads(event_json)
    except ValueError:
        return "an event that is no longer valid JSON"
    if not isinstance(parsed, dict):
        return "an event that is no longer a JSON object"
    return _summarize(parsed)


def _first_source(conn: Connection, events: Table) -> str:
    for (event_json,) in conn.execute(select(events.c.event_json).order_by(events.c.seq).limit(10)):
        try:
            parsed = json.loads(event_json)
        except ValueError:
            continue
        if isinstance(parsed, dict) and isinstance(parsed.get("audit_source_id"), str):
            return str(parsed["audit_source_id"])
    return ""


# tree_size, root_hash, signed_at_us, signature, signer_cert_pem
_StoredCheckpoint = tuple[int, bytes, int, bytes, str]


def log_owner(engine: Engine, events_table: Table) -> str:
    """Whose log this is, as its first events say (``audit_source_id``); "" when empty."""
    with engine.connect() as conn:
        return _first_source(conn, events_table)


class _Checkpoints:
    """The stored checkpoints in tree-size order, read in pages in the verifier's snapshot."""

    def __init__(self, conn: Connection, table: Table, page: int = 1000) -> None:
        self._conn = conn
        self._table = table
        self._page = page
        self._buffer: list[_StoredCheckpoint] = []
        self._after = -1
        self._done = False

    def __iter__(self) -> Iterator[_StoredCheckpoint]:
        t = self._table
        while True:
            if not self._buffer:
                if self._done:
                    return
                page = [
                    (int(size), bytes(root), int(at), bytes(sig), str(pem))
                    for size, root, at, sig, pem in self._conn.execute(
                        select(
                            t.c.tree_size,
                            t.c.root_hash,
                            t.c.signed_at_us,
                            t.c.signature,
                            t.c.signer_cert_pem,
                        )
                        .where(t.c.tree_size > self._after)
                        .order_by(t.c.tree_size)
                        .limit(self._page)
                    )
                ]
                if len(page) < self._page:
                    self._done = True
                if not page:
                    return
                self._after = page[-1][0]
                self._buffer = page[::-1]
            yield self._buffer.pop()


def verify_log(
    engine: Engine,
    events_table: Table,
    checkpoints_table: Table,
    ca_pem: bytes,
    *,
    source_id: str | None = None,
    max_problems: int = 1000,
) -> VerifyReport:
    """Check a whole audit log in one pass, in one database snapshot.

    Every event's hash (content and position), the seqs (no gap from 1), the query columns
    against the JSON, every checkpoint's signature (by a certificate of the CA naming the
    log's owner: ``source_id``, by default the ``audit_source_id`` of the first events)
    and root, and that no validly signed checkpoint covers more events than the log holds.
    Problems come sorted by seq: the first is the earliest damage.
    """
    try:
        ca_cert = x509.load_pem_x509_certificate(ca_pem)
    except ValueError:
        raise FailedPrecondition("the CA certificate is not a PEM certificate") from None
    connection = engine.connect()
    if engine.dialect.name == "postgresql":
        connection = connection.execution_options(isolation_level="REPEATABLE READ")
    with connection as conn, conn.begin():
        source = source_id or _first_source(conn, events_table)
        if not source:
            source = _first_signer(conn, checkpoints_table)
        verifier = _Verifier(source, ca_cert, _Checkpoints(conn, checkpoints_table))
        verifier.run(conn, events_table)
    problems = verifier.problems + _diagnose(verifier.mismatched, verifier.gaps)
    rank = {kind: index for index, kind in enumerate(get_args(ProblemKind))}
    problems.sort(key=lambda p: (p.seq, rank[p.kind]))
    return VerifyReport(
        source_id=source,
        events=verifier.events,
        checkpoints=verifier.checkpoints_seen,
        checkpoints_verified=verifier.checkpoints_verified,
        last_checkpoint_size=verifier.last_verified,
        problems=tuple(problems[:max_problems]),
        problems_omitted=max(0, len(problems) - max_problems),
    )


def _first_signer(conn: Connection, checkpoints: Table) -> str:
    pem = conn.execute(
        select(checkpoints.c.signer_cert_pem).order_by(checkpoints.c.tree_size).limit(1)
    ).scalar()
    if pem is None:
        return ""
    try:
        return principal_from_certificate(x509.load_pem_x509_certificate(pem.encode())).uri
    except (ValueError, DmpError):
        return ""


class _Verifier:
    """The state of one pass of :func:`verify_log` over the events and the checkpoints."""

    def __init__(
        self, source: str, ca_cert: x509.Certificate, checkpoints: Iterable[_StoredCheckpoint]
    ) -> None:
        self.source = source
        self.certs = _CertificateCheck(ca_cert, source)
        self.checkpoints = iter(checkpoints)
        self.pending = next(self.checkpoints, None)
        self.problems: list[Problem] = []
        self.mismatched: dict[int, tuple[str, bytes]] = {}
        self.gaps: list[int] = []
        self.events = 0
        self.checkpoints_seen = 0
        self.checkpoints_verified = 0
        self.last_verified = 0

    def settle(self, position: int, root: bytes | None) -> None:
        """Judge the checkpoints up to tree size ``position``; ``root`` is the recomputed
        root at ``position`` (None behind a gap, where it cannot be recomputed)."""
        while self.pending is not None and self.pending[0] <= position:
            size, cp_root, at, signature, pem = self.pending
            self.pending = next(self.checkpoints, None)
            self.checkpoints_seen += 1
            why = _verify_checkpoint(
                Checkpoint(self.source, size, cp_root, at, signature, pem.encode("ascii")),
                self.certs,
            )
            signed = f"the checkpoint of {size} events signed at {_iso(at)}"
            if why:
                self.problems.append(Problem("bad-checkpoint-signature", size, f"{signed}: {why}"))
            elif root is not None and size == position:
                if root == cp_root:
                    self.checkpoints_verified += 1
                    self.last_verified = size
                else:
                    self.problems.append(
                        Problem(
                            "checkpoint-root-mismatch",
                            size,
                            f"events {self.last_verified + 1}..{size} do not hash to the root of"
                            f" {signed}: one of them was altered with its hash recomputed, or"
                            " they were reordered",
                        )
                    )

    def run(self, conn: Connection, t: Table) -> None:
        # The hot loop: locals only, the frontier inlined (MerkleFrontier.append).
        tree = MerkleFrontier()
        stack: list[bytes] = tree._stack
        intact = True  # no gap so far: positions are tree indices
        expected = 1
        previous_time = 0
        source_key = '"audit_source_id":' + _json_string(self.source) if self.source else ""
        sha256 = _sha256
        json_string = _json_string
        no_more = 1 << 63
        if self.pending is not None and self.pending[0] <= 0:
            self.settle(0, EMPTY_ROOT)
        next_checkpoint = self.pending[0] if self.pending is not None else no_more
        result = conn.execution_options(yield_per=20_000).execute(
            select(
                t.c.seq,
                t.c.event_json,
                t.c.leaf_hash,
                t.c.event_date_time,
                t.c.participant_object_patient_ins,
                t.c.request_id,
            ).order_by(t.c.seq)
        )
        for rows in result.partitions():
            self.events += len(rows)
            for seq, event_json, stored, when, ins, request_id in rows:
                if seq != expected:
                    if seq < expected:
                        self.problems.append(Problem("changed", seq, f"{seq} is not a valid seq"))
                        continue
                    self._deleted(expected, seq, previous_time, when)
                    if intact:
                        tree.size = expected - 1
                        self.settle(expected - 1, tree.root())
                        intact = False
                    expected = seq
                expected += 1
                previous_time = when
                leaf = bytes(stored)
                if sha256(b"\x00" + seq.to_bytes(8, "big") + event_json.encode()).digest() != leaf:
                    self._mismatch(seq, event_json, leaf)
                elif (
                    f'"event_date_time":{when},' not in event_json
                    or '"participant_object_patient_ins":' + json_string(ins) not in event_json
                    or '"request_id":' + json_string(request_id) not in event_json
                ):
                    self.problems.append(
                        Problem(
                            "changed",
                            seq,
                            "its query columns (time, patient, request id) were changed and no"
                            f" longer match the event: {_describe(event_json)}",
                        )
                    )
                elif source_key and source_key not in event_json:
                    self.problems.append(
                        Problem(
                            "changed",
                            seq,
                            f"an event of another source in the log of {self.source}:"
                            f" {_describe(event_json)}",
                        )
                    )
                if intact:
                    h = leaf
                    n = seq - 1  # leaves already in the tree
                    while n & 1:
                        h = sha256(b"\x01" + stack.pop() + h).digest()
                        n >>= 1
                    stack.append(h)
                if seq >= next_checkpoint:
                    if intact:
                        tree.size = seq
                    self.settle(seq, tree.root() if intact else None)
                    next_checkpoint = self.pending[0] if self.pending is not None else no_more
        self.finish(expected - 1)

    def _mismatch(self, seq: int, event_json: str, leaf: bytes) -> None:
        if len(self.mismatched) < _MAX_LOCATED:
            self.mismatched[seq] = (event_json, leaf)
        else:
            self.problems.append(
                Problem("changed", seq, f"event changed; it now reads {_describe(event_json)}")
            )

    def finish(self, held: int) -> None:
        """Judge the checkpoints beyond the last event (``held``): a validly signed one
        means the log was truncated."""
        while self.pending is not None:
            size, _, at, _, _ = self.pending
            before = len(self.problems)
            self.settle(size, None)
            if len(self.problems) == before:  # validly signed: the log was cut behind it
                self.problems.append(
                    Problem(
                        "truncated",
                        held + 1,
                        f"the log ends at seq {held} but the checkpoint signed at {_iso(at)}"
                        f" covers {size} events: events {held + 1}..{size} were removed",
                    )
                )

    def _deleted(self, expected: int, seq: int, previous_time: int, when: int) -> None:
        missing = f"event {expected}" if seq == expected + 1 else f"events {expected}..{seq - 1}"
        after = f"seq {expected - 1} ({_iso(previous_time)})" if expected > 1 else "its start"
        self.problems.append(
            Problem(
                "deleted",
                expected,
                f"{missing} deleted: the log jumps from {after} to seq {seq} ({_iso(when)})",
            )
        )
        room = _MAX_LOCATED - len(self.gaps)
        self.gaps.extend(range(expected, min(seq, expected + max(0, room))))


def _diagnose(mismatched: Mapping[int, tuple[str, bytes]], gaps: Sequence[int]) -> list[Problem]:
    """Tell moved events from changed ones: an event whose content hashes correctly at
    another position (a changed row or a gap) is that position's event, moved."""
    candidates = [*mismatched, *gaps]
    problems: list[Problem] = []
    for seq, (event_json, stored) in mismatched.items():
        data = event_json.encode("utf-8")
        origin = 0
        for other in candidates:
            if other == seq:
                continue
            h = event_leaf_hash(other, data)
            if h == stored or (other in mismatched and h == mismatched[other][1]):
                origin = other
                break
        if origin:
            problems.append(
                Problem(
                    "moved",
                    seq,
                    f"the event of seq {origin} was moved to seq {seq}: {_describe(event_json)}",
                )
            )
        else:
            problems.append(
                Problem("changed", seq, f"event changed; it now reads {_describe(event_json)}")
            )
    return problems


# --------------------------------------------------------------------------- export

INS_SYSTEM: Final = "urn:oid:1.2.250.1.213.1.4.8"
URI_SYSTEM: Final = "urn:ietf:rfc:3986"
RECORD_ID_SYSTEM: Final = "urn:dmp:record-id"
PROFESSION_SYSTEM: Final = "urn:dmp:profession"
_ACT_REASON: Final = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
_PURPOSE_CODES: Final[Mapping[str, tuple[str, str]]] = {
    Purpose.CARE: ("TREAT", "treatment"),
    Purpose.EMERGENCY: ("ETREAT", "Emergency Treatment"),
    Purpose.SELF: ("PATRQT", "patient requested"),
}
_ENTITY_TYPE: Final = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
_OBJECT_ROLE: Final = "http://terminology.hl7.org/CodeSystem/object-role"
_BALP_ENTITY_TYPE: Final = "https://profiles.ihe.net/ITI/BALP/CodeSystem/BasicAuditEntityType"
_SECURITY_ROLE: Final = "http://terminology.hl7.org/CodeSystem/extra-security-role-type"
_SOURCE_TYPE: Final = "http://terminology.hl7.org/CodeSystem/security-source-type"


def _fhir_id(source_id: str, seq: int) -> str:
    """A FHIR id ([A-Za-z0-9.-]{1,64}) for event ``seq`` of a log: node-11-42, directory-7."""
    slug = "".join(
        ch if ch.isascii() and (ch.isalnum() or ch in ".-") else "-"
        for ch in source_id.removeprefix("urn:dmp:")
    )
    return f"{slug[:40] or 'audit'}-{seq}"


def fhir_audit_event(event: AuditEvent, *, seq: int | None = None) -> dict[str, Any]:
    """A FHIR R4 AuditEvent resource for ``event`` (``seq`` gives it an id)."""
    code = event.code
    resource: dict[str, Any] = {"resourceType": "AuditEvent"}
    if seq is not None:
        resource["id"] = _fhir_id(event.audit_source_id, seq)
    resource["type"] = {"system": code.system, "code": code.event_id, "display": code.display}
    resource["subtype"] = [
        {"system": LOCAL_EVENT_SYSTEM, "code": event.event_type, "display": event.event_type}
    ]
    resource["action"] = event.event_action_code
    resource["recorded"] = _iso(event.event_date_time)
    resource["outcome"] = str(event.event_outcome_indicator)
    resource["outcomeDesc"] = event.status_code + (f": {event.detail}" if event.detail else "")
    purpose = _PURPOSE_CODES.get(event.purpose_of_use)
    if purpose is not None:
        concept: dict[str, Any] = {
            "coding": [{"system": _ACT_REASON, "code": purpose[0], "display": purpose[1]}]
        }
        if event.emergency_reason:
            concept["text"] = event.emergency_reason
        resource["purposeOfEvent"] = [concept]
    user: dict[str, Any] = {
        "type": {
            "coding": [{"system": _SECURITY_ROLE, "code": "humanuser", "display": "human user"}]
        },
    }
    if event.active_participant_role:
        user["role"] = [
            {
                "coding": [{"system": PROFESSION_SYSTEM, "code": event.active_participant_role}],
                "text": event.active_participant_role,
            }
        ]
    if event.active_participant_user_id:
        who: dict[str, Any] = {
            "identifier": {"system": URI_SYSTEM, "value": event.active_participant_user_id}
        }
        if event.active_participant_user_name:
            who["display"] = event.active_participant_user_name
        user["who"] = who
    if event.active_participant_user_name:
        user["name"] = event.active_participant_user_name
    user["requestor"] = True
    agents = [user]
    if event.relaying_participant:
        agents.append(
            {
                "type": {
                    "coding": [{"system": DCM, "code": "110153", "display": "Source Role ID"}]
                },
                "who": {
                    "identifier": {"system": URI_SYSTEM, "value": event.relaying_participant},
                    "display": event.relaying_participant,
                },
                "requestor": False,
            }
        )
    resource["agent"] = agents
    source: dict[str, Any] = {}
    if event.audit_source_region:
        source["site"] = event.audit_source_region
    source["observer"] = (
        {
            "identifier": {"system": URI_SYSTEM, "value": event.audit_source_id},
            "display": event.audit_source_id,
        }
        if event.audit_source_id
        else {"display": "unknown audit source"}  # FHIR has no empty strings
    )
    source["type"] = [{"system": _SOURCE_TYPE, "code": "4", "display": "Application Server"}]
    resource["source"] = source
    entities: list[dict[str, Any]] = []
    if event.participant_object_patient_ins:
        entities.append(
            {
                "what": {
                    "identifier": {
                        "system": INS_SYSTEM,
                        "value": event.participant_object_patient_ins,
                    }
                },
                "type": {"system": _ENTITY_TYPE, "code": "1", "display": "Person"},
                "role": {"system": _OBJECT_ROLE, "code": "1", "display": "Patient"},
            }
        )
    for record_id in event.participant_object_record_ids:
        entities.append(
            {
                "what": {"identifier": {"system": RECORD_ID_SYSTEM, "value": record_id}},
                "type": {"system": _ENTITY_TYPE, "code": "2", "display": "System Object"},
                "role": {"system": _OBJECT_ROLE, "code": "3", "display": "Report"},
            }
        )
    if event.request_id:
        entities.append(
            {
                "what": {"identifier": {"value": event.request_id}},
                "type": {
                    "system": _BALP_ENTITY_TYPE,
                    "code": "XrequestId",
                    "display": "transport specific unique identifier",
                },
            }
        )
    if entities:
        resource["entity"] = entities
    return resource


def _compact(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def export_events(
    engine: Engine,
    events_table: Table,
    *,
    since_us: int | None = None,
    fmt: Literal["jsonl", "fhir"] = "jsonl",
) -> Iterator[str]:
    """The events (from ``since_us`` on), in seq order, as text chunks to write in a row.

    ``jsonl``: one line per event, the event's fields plus ``seq``. ``fhir``: one FHIR R4
    Bundle of type ``collection`` holding an AuditEvent per event, streamed an entry at a
    time. Rows are streamed from the database, never all held in memory.
    """
    if fmt not in ("jsonl", "fhir"):
        raise ValueError(f"unknown export format {fmt!r}: jsonl or fhir")
    t = events_table
    query = select(t.c.seq, t.c.event_json).order_by(t.c.seq)
    if since_us is not None:
        query = query.where(t.c.event_date_time >= since_us)
    with engine.connect() as conn:
        rows = conn.execution_options(yield_per=5_000).execute(query)
        if fmt == "jsonl":
            for seq, event_json in rows:
                event = AuditEvent.from_json(event_json)
                yield _compact({"seq": seq, **event.to_dict()}) + "\n"
            return
        yield (
            _compact(
                {
                    "resourceType": "Bundle",
                    "id": str(uuid.uuid4()),
                    "type": "collection",
                    "timestamp": _iso(now_us()),
                }
            )[:-1]
            + ',"entry":['
        )
        separator = "\n"
        for seq, event_json in rows:
            event = AuditEvent.from_json(event_json)
            resource = fhir_audit_event(event, seq=seq)
            name = uuid.uuid5(uuid.NAMESPACE_URL, f"{event.audit_source_id}/{seq}")
            entry = {"fullUrl": f"urn:uuid:{name}", "resource": resource}
            yield separator + _compact(entry)
            separator = ",\n"
        yield "\n]}\n"
