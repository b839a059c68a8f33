"""The audit event and its vocabulary: event types and their ATNA codes, outcomes."""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from dmp.clock import now_us
from dmp.purposes import Purpose

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
    # e-prescription, at the node that holds the prescription (and the directory's search).
    PRESCRIPTION_CREATE = "prescription-create"
    PRESCRIPTION_READ = "prescription-read"
    PRESCRIPTION_FIND = "prescription-find"
    PRESCRIPTION_CLAIM = "prescription-claim"
    PRESCRIPTION_RELEASE = "prescription-release"
    PRESCRIPTION_DISPENSE = "prescription-dispense"
    PRESCRIPTION_CANCEL = "prescription-cancel"
    # The node's operator destroyed a patient's data key (crypto-shredding).
    SHRED = "shred"
    # The region's records and audit log passed to a successor host (node/handover_*.py).
    HANDOVER = "handover"


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
    EventType.PRESCRIPTION_CREATE: EventCode("110107", DCM, "Import", "C"),
    EventType.PRESCRIPTION_READ: EventCode("110110", DCM, "Patient Record", "R"),
    EventType.PRESCRIPTION_FIND: EventCode("110112", DCM, "Query", "E"),
    EventType.PRESCRIPTION_CLAIM: EventCode(
        "prescription-claim", LOCAL_EVENT_SYSTEM, "Prescription held by a pharmacy", "U"
    ),
    EventType.PRESCRIPTION_RELEASE: EventCode(
        "prescription-release", LOCAL_EVENT_SYSTEM, "Prescription hold released", "U"
    ),
    EventType.PRESCRIPTION_DISPENSE: EventCode(
        "prescription-dispense", LOCAL_EVENT_SYSTEM, "Prescription dispensed", "C"
    ),
    EventType.PRESCRIPTION_CANCEL: EventCode(
        "prescription-cancel", LOCAL_EVENT_SYSTEM, "Prescription cancelled", "U"
    ),
    EventType.HANDOVER: EventCode(
        "handover", LOCAL_EVENT_SYSTEM, "Region handed over to a successor host", "E"
    ),
    EventType.SHRED: EventCode(
        "shred", LOCAL_EVENT_SYSTEM, "Patient's records crypto-shredded", "D"
    ),
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


def iso_instant(us: int) -> str:
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
    #: How many identical events this one stands for (dmp/audit/refusals.py); 1 is not encoded,
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
        return summarize_fields(self.to_dict())


def summarize_fields(values: Mapping[str, Any]) -> str:
    """The summary of an event's fields, tolerant of values no valid event holds (a
    tampered row is described as it now reads)."""

    def field(name: str) -> str:
        value = values.get(name, "")
        return value if isinstance(value, str) else json.dumps(value)

    when = values.get("event_date_time")
    moment = (
        iso_instant(when) if isinstance(when, int) and 0 <= when < 1 << 62 else f"(time {when!r})"
    )
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
